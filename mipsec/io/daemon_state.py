"""The state every part of a role daemon shares (``mipsec.io.daemon``): the objects it opened,
the paths under ``state_dir``, and the manual keys' sequence numbers across restarts.

The daemon is one class assembled from a part per concern, each a subclass of ``DaemonState``:
``daemon_keys`` (the capture's key files), ``daemon_kernel`` (sockets, forwarding, routes),
``daemon_store`` (the HA's binding store and HA group), ``daemon_control`` (status, commands,
reload).  ``mipsec.io.daemon`` puts them together and runs them.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any

from mipsec.config import DaemonConfig
from mipsec.errors import ConfigError, UsageError
from mipsec.io import arp, control, hostguard, instance, logs, netlink, seqstate
from mipsec.io import pcap as pcapmod
from mipsec.io.loop import EventLoop
from mipsec.io.memory import MemoryProbe
from mipsec.store import StoreError, open_store

log = logging.getLogger("mipsec.daemon")

class DaemonState:
    """What a role daemon holds; the parts in the sibling modules act on it."""

    def __init__(self, cfg: DaemonConfig, *, role: Any = None, tun: Any = None,
                 sender: Any = None, receivers: list[Any] | None = None,
                 manage_kernel: bool = True):
        self.cfg = cfg
        self.role = role
        self.tun = tun
        self.sender = sender
        self.receivers = receivers
        self.manage_kernel = manage_kernel   # False in tests with fakes: no routes, no netlink
        self.nl: netlink.Netlink | None = None
        self.watcher: netlink.AddressWatcher | None = None
        self.control: control.ControlServer | None = None
        self.pcap: pcapmod.PcapWriter | None = None
        self.loop: EventLoop | None = None
        self.started_wall = time.time()
        self._tun_home_configured = False
        self._away: set[str] = set()          # HA: home addresses currently steered into the TUN
        self._care_of_routes: dict[str, str] = {}   # HA, GW pool: home -> CoA routed via its GW
        # the key files' lines: every SA whose packets the kept capture files may hold (IKEv2:
        # pruned as the capture rotates, pcap.KeyLines), ESP SAs by SPI, IKE SAs by SPI pair
        self._esp_keys = pcapmod.KeyLines()
        self._key_rotation = 0                # the capture file the keys' tags were last set in
        self._ike_keyfile: str | None = None  # IKEv2: the ikev2_decryption_table beside keyfile
        self._ike_keys = pcapmod.KeyLines()
        self.announcer: arp.Announcer | None = None
        self.events: logs.RoleWatcher | None = None   # the role's records -> log lines
        self.metrics: Any = None                      # the Prometheus endpoint ([metrics])
        self.memory = MemoryProbe()                   # `memory`: RSS, tracemalloc (debugging)
        self.sysctls = hostguard.Sysctls()    # GW / HA: what the daemon set, restored at exit
        self.seqstore: seqstate.SequenceStore | None = None   # manual keys: numbers on disk
        self.forward_filter: hostguard.ForwardFilter | None = None
        self.store: Any = None                # HA: its binding store (mipsec.store)
        self.store_errors = 0
        # HA group (ha_group = true): the election and the warm copy (mipsec.io.hagroup)
        self.group: Any = None                # the ElectionRunner thread
        self.watcher_thread: Any = None       # the StoreWatcher thread
        self.wakeup: Any = None
        self.serving = True                   # False while a standby (or fenced)
        self.standby_dropped = 0              # actions a standby did not carry out
        self.exit_status = 0
        self.worker_pool: Any = None          # GW with workers: mipsec.io.gw_workers
        self._nat_t_bind: tuple[str, int] | None = None   # ... and the UDP 4500 they share
        self.locks = instance.Locks(f"pid {os.getpid()}, config {cfg.path}")
        self.log_level_override: str | None = None      # --log-level / --log-format win over
        self.log_format_override: str | None = None     # the file, also on reload
        self._closed = False

    @property
    def _loop(self) -> EventLoop:
        """The event loop: it exists from ``start()`` on."""
        if self.loop is None:
            raise UsageError("the daemon has not been started")
        return self.loop

    @property
    def _nl(self) -> netlink.Netlink:
        """The netlink socket: it exists from ``start()`` on when the daemon manages the kernel."""
        if self.nl is None:
            raise UsageError("the daemon manages no kernel state (manage_kernel=False)")
        return self.nl

    def _name(self) -> str:
        return getattr(self.cfg.node, "name", self.cfg.role)

    def _uses_ike(self) -> bool:
        return self.cfg.role in ("mn", "gw") and self.cfg.daemon.sa_source == "ikev2"

    def _uses_udp_encap(self) -> bool:
        node = self.cfg.node
        mobiles = [node] if self.cfg.role == "mn" else list(node.mobiles)
        return any(m.esp_in is not None and (m.esp_in.udp_encap or m.esp_out.udp_encap)
                   for m in mobiles)

    # --- manual keys: sequence numbers and replay windows across restarts ---------------------

    def sequence_path(self) -> str:
        return os.path.join(self.cfg.daemon.state_dir, f"{self._name()}.seq.json")

    def worker_sequence_path(self, index: int | str) -> str:
        """A GW worker's own sequence state (manual keys; ``*``: a glob of them all)."""
        return seqstate.worker_path(self.cfg.daemon.state_dir, self._name(), index)

    def _manual_pairs(self) -> list[tuple[Any, Any]]:
        """(SA object, its EspSaConfig) for every SA whose keys come from the file."""
        if self.cfg.role not in ("mn", "gw") or self.cfg.daemon.sa_source != "manual":
            return []
        node, pairs = self.cfg.node, []
        if self.cfg.role == "mn":
            pairs = [(self.role.inbound, node.esp_in), (self.role.outbound, node.esp_out)]
        else:
            for m in node.mobiles:
                mobile = self.role.mobiles.get(m.home_address)
                if mobile is not None and m.esp_in is not None:
                    pairs += [(mobile.inbound, m.esp_in), (mobile.outbound, m.esp_out)]
        return [(sa, esp) for sa, esp in pairs
                if sa is not None and esp is not None and sa.spi == esp.spi]

    def _attach_sequence_state(self) -> None:
        """docs/security.md §3.6: manual SAs continue their sequence numbers and replay windows
        after a restart (mipsec.io.seqstate)."""
        pairs = self._manual_pairs()
        if not pairs:
            return
        if self.seqstore is None:
            path = self.sequence_path()
            try:
                os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{self.cfg.path}: [daemon] state_dir: {exc}") from None
            self.seqstore = seqstate.SequenceStore(path)
            # a GW's workers keep the numbers of the SAs they hold (mipsec.io.gw_worker)
            self.seqstore.merge(sorted(glob.glob(self.worker_sequence_path("*"))))
        self.seqstore.attach(pairs)
        if self.seqstore.write_errors:
            raise ConfigError(f"{self.cfg.path}: [daemon] state_dir: cannot write "
                              f"{self.seqstore.path}: manual keys need it (sequence numbers "
                              f"across restarts)")

    # --- HA: the binding store (mipsec.store) ------------------------------------------------

    def store_path(self) -> str:
        d = self.cfg.daemon
        return os.path.join(d.state_dir, f"{self._name()}.bindings.sqlite3")

    def _open_store(self) -> Any:
        kind = self.cfg.daemon.store
        try:
            d = self.cfg.daemon
            return open_store(kind, self.store_path() if kind == "sqlite" else "", etcd=dict(
                endpoints=d.store_endpoints, prefix=d.store_prefix, ca_file=d.store_ca_file,
                cert_file=d.store_cert_file, key_file=d.store_key_file))
        except StoreError as exc:
            key = "store_endpoints" if kind == "etcd" else "state_dir"
            raise ConfigError(f"{self.cfg.path}: [daemon] {key}: {exc}") from None
