"""One epoll-based event loop per daemon: the only place that reads the clock.

Theory of operation.  A role (``MobileNode``, ``VpnGateway``, ``HomeAgent``) is a sans-I/O
object; the loop is its whole runtime:

* it waits on every readable source (the TUN device, the net receivers, the netlink watcher, the
  control socket, a signal wake-up socket) and on ONE timer, the role's ``get_timer()`` deadline;
* it reads ``time.monotonic()`` once per wake-up and passes it as ``now`` (the same clock in every
  namespace of the machine, so timelines of MN, GW and HA can be merged); the wall clock the
  roles need for MIPv4 identification is ``time.time``, injected at role construction;
* it feeds packets to ``receive_from_tun`` / ``receive_from_net``, events to ``handle_event``,
  an expired deadline to ``handle_timer``, and carries out the returned actions IN ORDER
  (docs/design.md: the GW's ``RebindSa`` precedes the ``SendToNet`` of the reply);
* an exception escaping a role is a bug in mipsec, never the peer's doing: it is logged with its
  traceback, counted in ``bugs`` and the loop goes on with the next packet.

Daemon-specific reactions (the HA steering a home address into its TUN on ``BindingChanged``,
the key file rewritten on ``RebindSa`` ...) are hooks: ``on_action[ActionType] = callable``.

The data path (``batch=True``, the default).  Each ready descriptor is drained in one go (the
TUN device until it is empty, up to ``TUN_DRAIN_MAX``; receivers read until EAGAIN) and the
clock is read once per drain.  A role may offer ``tun_fast_path(packet, now)``, the same work
as ``receive_from_tun`` without action objects: it returns the packet to send (bytes, on the
role's ``data_interface`` if it has one, else by routing), None (dropped and counted by the
role), or a list of actions for the general path; likewise ``net_fast_path(packet, now)`` for
``receive_from_net`` (its bytes go into the TUN; used unless a hook is registered for
``WriteToTun``).  A result that is exactly one ``SendToNet`` (from the TUN) or one
``WriteToTun`` (from the net) is data: it is carried out directly, without ``dispatch`` (so
its ``admit``, ``steps`` and ``after_dispatch`` see every result but these), unless a hook is
registered for its type.  Packets to send are queued and leave in one batched send per interface
(``sender.send_batch(packets[, interface])``: sendmmsg) at the end of the drain, before a
packet for another interface and before any other action is carried out, so the order on the
wire is that of the single-packet path (``batch=False``), as are the bytes, the drops and
every counter.
"""

from __future__ import annotations

import gc
import logging
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from mipsec.errors import UsageError
from mipsec.node.actions import BindingChanged, Log, RebindSa, SendToNet, WriteToTun

log = logging.getLogger("mipsec.io.loop")


def _no_tun(packet: bytes) -> None:
    raise UsageError("EventLoop: a packet for the TUN device, but this loop has none")

MAX_IDLE_WAIT_S = 1.0          # wake up at least this often (cheap; keeps shutdown responsive)
HURRY_WAIT_S = 0.2             # ... and this often while a logging hook has work pending
TUN_DRAIN_MAX = 1024           # TUN packets read per wake-up at most (then the others' turn)


class EventLoop:
    def __init__(self, role: Any, *, tun: Any, sender: Any, receivers: Sequence[Any] = (),
                 name: str = "daemon", pcap: Any = None,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time, batch: bool = True):
        self.role = role
        self.batch = batch
        self._pending: list[bytes] = []        # data packets waiting for one batched send
        self._pending_if: str | None = None    # ... all on this interface (None: by routing)
        self._send_batch = getattr(sender, "send_batch", None) if batch else None
        self._tun_fast = getattr(role, "tun_fast_path", None) if batch else None
        self._net_fast = getattr(role, "net_fast_path", None) if batch else None
        self.tun = tun
        self.sender = sender
        self.name = name
        self.pcap = pcap
        self.pcap_filter: Callable[[bytes], bool] | None = None   # which packets to capture
        self.clock = clock
        self.wallclock = wallclock
        self.on_action: dict[type, Callable[[Any], None]] = {}
        # Hooks for which this predicate is true run after the whole batch: kernel bookkeeping
        # (routes, proxy ARP) must not delay the packets the same batch sends (the HA's SIU when
        # an MN leaves home).  Default: a BindingChanged to a care-of address.  A BindingChanged
        # to "home" runs in order: the HA's direct reply must not be routed into its TUN.
        self.defer_hook: Callable[[Any], bool] = (
            lambda a: type(a) is BindingChanged and a.care_of_address is not None)
        self.on_event: list[Callable[[Any], None]] = []   # observers of events fed to the role
        # Steps that must complete before the actions after them (the HA's binding store):
        # ``steps[ActionType] = step(action, after_failure) -> bool`` runs when ``dispatch``
        # reaches such an action, once the actions before it are carried out; False (it failed)
        # drops the actions after it up to the next step, whose ``after_failure`` is then True.
        # ``admit(actions)`` false drops a whole result (a standby HA answers nothing);
        # ``after_dispatch`` hooks run after each result (the IKEv2 key file).
        self.steps: dict[type, Callable[[Any, bool], bool]] = {}
        self.admit: Callable[[list[Any]], bool] | None = None
        self.after_dispatch: list[Callable[[], None]] = []
        # Logging hooks (mipsec.io.logs): ``on_silent(packet)`` for a net packet the role
        # answered with nothing (a drop, usually); ``after_batch(now)`` after every wake-up;
        # while ``hurry()`` is true the loop waits at most ``HURRY_WAIT_S``.
        self.on_silent: Callable[[bytes], None] | None = None
        self.last_received: list[bytes] = []   # the last batch from a net receiver
        self.after_batch: list[Callable[[float], None]] = []
        # ``before_ready`` hooks run after every wait, before any ready source is read (a GW
        # worker applies its control messages first: an SA installed before the packet came)
        self.before_ready: list[Callable[[], None]] = []
        self.hurry: Callable[[], bool] | None = None
        # SIGHUP: ``on_reload()`` runs in the loop (not in the signal handler) after the wake-up
        self.on_reload: Callable[[], object] | None = None
        self._reload_requested = False
        self.stats = {"from_tun": 0, "to_tun": 0, "from_net": 0, "to_net": 0,
                      "send_errors": 0, "timers": 0, "bugs": 0}
        self.max_wait = MAX_IDLE_WAIT_S
        self._handlers: dict[int, tuple[Any, Callable[[Any], None]]] = {}
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._selector = None if self._epoll is not None else selectors.DefaultSelector()
        self._running = False
        self._stop_reason: str | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        if tun is not None:
            self.add_reader(tun, self._on_tun)
        for receiver in receivers:
            self.add_reader(receiver, self._on_net)

    # --- sources --------------------------------------------------------------------------------

    def add_reader(self, source: Any, callback: Callable[[Any], None]) -> None:
        self._register(source.fileno(), source, callback)

    def _register(self, fd: int, source: Any, callback: Callable[[Any], None]) -> None:
        if fd in self._handlers:
            raise KeyError(f"{fd} is already registered")
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            self._fallback_selector().register(fd, selectors.EVENT_READ)
        self._handlers[fd] = (source, callback)

    def remove_reader(self, source: Any) -> None:
        try:
            fd = source.fileno()
        except (OSError, ValueError):
            return
        if self._handlers.pop(fd, None) is None:
            return
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:
                self._fallback_selector().unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def _ready(self, wait: float) -> list[int]:
        if self._epoll is not None:
            try:
                return [fd for fd, _mask in self._epoll.poll(wait)]
            except InterruptedError:
                return []
        return [key.fd for key, _mask in self._fallback_selector().select(wait)]

    def _fallback_selector(self) -> selectors.BaseSelector:
        """The selector used where there is no epoll (it exists exactly then)."""
        if self._selector is None:
            raise UsageError("EventLoop: no selector (this loop uses epoll)")
        return self._selector

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT stop the loop cleanly (the wake-up fd makes select return at once)."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno())
        self._register(self._wake_r.fileno(), None, self._on_wake)

        def handler(signum, _frame):
            self.stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        if self.on_reload is not None:
            def reload_handler(_signum, _frame):
                self._reload_requested = True
            signal.signal(signal.SIGHUP, reload_handler)

    def _on_wake(self, _source: Any) -> None:
        wake = self._wake_r
        if wake is None:
            return
        try:
            while wake.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # --- role calls -----------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable, *args: Any) -> list[Any] | None:
        try:
            actions = fn(*args)
        except Exception:
            self.stats["bugs"] += 1
            log.exception("BUG: %s.%s raised (the packet/event is dropped, the daemon goes on)",
                          type(self.role).__name__, what)
            return None
        if actions:
            self.dispatch(actions)
        return actions

    def _on_tun(self, tun: Any) -> None:
        if not self.batch:
            for _ in range(64):
                packet = tun.read()
                if packet is None:
                    break
                self.stats["from_tun"] += 1
                self._call("receive_from_tun", self.role.receive_from_tun, packet, self.clock())
            return
        read = tun.read
        packets = []
        for _ in range(TUN_DRAIN_MAX):
            packet = read()
            if packet is None:
                break
            packets.append(packet)
        if not packets:
            return
        self.stats["from_tun"] += len(packets)
        now = self.clock()
        direct = SendToNet not in self.on_action
        fast = self._tun_fast if direct else None
        role = self.role
        slow = role.receive_from_tun
        queue = self._queue_send
        for packet in packets:
            try:
                out = fast(packet, now) if fast is not None else slow(packet, now)
            except Exception:
                self.stats["bugs"] += 1
                log.exception("BUG: %s.receive_from_tun raised (the packet is dropped, the "
                              "daemon goes on)", type(self.role).__name__)
                continue
            if not out:
                continue
            if out.__class__ is not list:
                queue(out, getattr(role, "data_interface", None))
            elif direct and len(out) == 1 and out[0].__class__ is SendToNet:
                queue(out[0].packet, out[0].interface)
            else:
                self._flush()
                self.dispatch(out)
        self._flush()

    def _on_net(self, receiver: Any) -> None:
        packets = receiver.receive()
        if not packets:
            return
        now = self.clock()
        self.last_received = packets
        silent = self.on_silent
        entry = getattr(receiver, "role_entry", "receive_from_net")   # the GW's SIU socket
        fn = getattr(self.role, entry)
        if not self.batch:
            for packet in packets:
                self.stats["from_net"] += 1
                if self.pcap is not None and (self.pcap_filter is None
                                              or self.pcap_filter(packet)):
                    self.pcap.write(packet, self.wallclock())
                actions = self._call(entry, fn, packet, now)
                if silent is not None and (not actions or actions[0].__class__ is Log):
                    silent(packet)
            return
        self.stats["from_net"] += len(packets)
        pcap, pcap_filter = self.pcap, self.pcap_filter
        direct = WriteToTun not in self.on_action
        role_call = fn
        if direct and entry == "receive_from_net" and self._net_fast is not None:
            role_call = self._net_fast
        write: Callable[[bytes], Any] = self.tun.write if self.tun is not None else _no_tun
        to_tun = 0
        for packet in packets:
            if pcap is not None and (pcap_filter is None or pcap_filter(packet)):
                pcap.write(packet, self.wallclock())
            try:
                actions = role_call(packet, now)
            except Exception:
                self.stats["bugs"] += 1
                log.exception("BUG: %s.%s raised (the packet is dropped, the daemon goes on)",
                              type(self.role).__name__, entry)
                actions = None
            if actions.__class__ is bytes:         # the fast path's packet for the TUN
                to_tun += 1
                write(actions)
                continue
            if actions:
                if direct and len(actions) == 1 and actions[0].__class__ is WriteToTun:
                    to_tun += 1
                    write(actions[0].packet)
                    continue
                self.stats["to_tun"] += to_tun
                to_tun = 0
                self._flush()
                self.dispatch(actions)
                if actions[0].__class__ is not Log:
                    continue
            if silent is not None:
                silent(packet)
        self.stats["to_tun"] += to_tun
        self._flush()

    def _queue_send(self, packet: bytes, interface: str | None = None) -> None:
        """A data packet to the net (on ``interface``, None: by routing): captured now, sent
        in the batch (a packet for another interface sends the queued ones first)."""
        if self.pcap is not None and (self.pcap_filter is None or self.pcap_filter(packet)):
            self.pcap.write(packet, self.wallclock())
        if self._send_batch is None:
            if self.sender.send(packet, interface):
                self.stats["to_net"] += 1
            else:
                self.stats["send_errors"] += 1
            return
        if interface != self._pending_if:
            self._flush()
            self._pending_if = interface
        self._pending.append(packet)

    def _flush(self) -> None:
        """Send the queued data packets (one sendmmsg per up to 64); counted as one by one."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        send_batch = self._send_batch
        if send_batch is None:          # never: packets queue only when it exists
            raise UsageError("EventLoop: packets queued for a batched send without send_batch")
        interface = self._pending_if
        try:
            results = send_batch(pending) if interface is None else send_batch(pending, interface)
        except Exception:
            self.stats["bugs"] += 1
            log.exception("BUG: batched send of %d packets failed", len(pending))
            results = [False] * len(pending)
        ok = sum(1 for r in results if r)
        self.stats["to_net"] += ok
        self.stats["send_errors"] += len(pending) - ok

    def feed_event(self, event: Any) -> None:
        """Hand an event (CareOfAddressChanged, ReturnedHome ...) to the role."""
        for observer in self.on_event:
            try:
                observer(event)
            except Exception:
                self.stats["bugs"] += 1
                log.exception("BUG: event observer failed on %r", event)
        self._call("handle_event", self.role.handle_event, event, self.clock())

    # --- actions --------------------------------------------------------------------------------

    def dispatch(self, actions: list[Any]) -> None:
        """Carry out a role's result in order, through ``admit``, ``steps`` and
        ``after_dispatch`` when they are set."""
        if self.admit is not None and not self.admit(actions):
            return
        steps = self.steps
        if steps:
            segment: list[Any] = []
            failed = False
            for action in actions:
                step = steps.get(type(action))
                if step is not None:
                    if segment:
                        self._carry_out_all(segment)
                        segment = []
                    failed = not step(action, failed)
                elif not failed:
                    segment.append(action)
            if segment:
                self._carry_out_all(segment)
        else:
            self._carry_out_all(actions)
        for hook in self.after_dispatch:
            hook()

    def _carry_out_all(self, actions: list[Any]) -> None:
        self._flush()
        later = []
        for action in actions:
            try:
                if self._carry_out(action):
                    later.append(action)
            except Exception:
                self.stats["bugs"] += 1
                log.exception("BUG: carrying out %s failed", type(action).__name__)
        for action in later:
            try:
                self.on_action[type(action)](action)
            except Exception:
                self.stats["bugs"] += 1
                log.exception("BUG: hook for %s failed", type(action).__name__)

    def _carry_out(self, action: Any) -> bool:
        """Carry out one action; True when its hook is deferred to the end of the batch."""
        kind = type(action)
        if kind is SendToNet:
            if self.pcap is not None and (self.pcap_filter is None
                                          or self.pcap_filter(action.packet)):
                self.pcap.write(action.packet, self.wallclock())
            if self.sender.send(action.packet, action.interface):
                self.stats["to_net"] += 1
            else:
                self.stats["send_errors"] += 1
        elif kind is WriteToTun:
            self.stats["to_tun"] += 1
            self.tun.write(action.packet)
        elif kind is Log:
            level = logging.getLevelName(str(action.level).upper())
            log.log(level if isinstance(level, int) else logging.INFO, "%s: %s",
                    self.name, action.message)
        elif kind is RebindSa:
            log.info("%s: SA 0x%08x re-pointed: local=%s remote=%s", self.name, action.spi,
                     action.local, action.remote)
        elif kind is BindingChanged:
            log.info("%s: binding %s -> %s", self.name, action.home_address,
                     action.care_of_address or "home")
        elif kind.__name__ == "ReestablishRequested":
            # The MN gave up registering (RFC 5944 §3.6.3 retransmissions exhausted): with
            # manually keyed SAs there is nothing to re-establish, so say it loudly.
            log.warning("%s: registration keeps failing (%r): the tunnel needs re-establishing",
                        self.name, action)
        else:
            log.debug("%s: action %r", self.name, action)
        hook = self.on_action.get(kind)
        if hook is not None:
            if self.defer_hook(action):
                return True
            hook(action)
        return False

    # --- running --------------------------------------------------------------------------------

    def stop(self, reason: str = "stop") -> None:
        self._stop_reason = reason
        self._running = False

    def run_once(self, max_wait: float | None = None) -> None:
        if max_wait is None:
            max_wait = self.max_wait
        now = self.clock()
        deadline = self._deadline()
        if self.hurry is not None and self.hurry():
            max_wait = min(max_wait, HURRY_WAIT_S)
        wait = max_wait if deadline is None else min(max_wait, max(0.0, deadline - now))
        handlers = self._handlers
        ready = self._ready(wait)
        for before in self.before_ready:
            try:
                before()
            except Exception:
                self.stats["bugs"] += 1
                log.exception("BUG: before-ready hook failed")
        for fd in ready:
            entry = handlers.get(fd)
            if entry is None:
                continue
            source, callback = entry
            try:
                callback(source)
            except Exception:
                # An I/O glitch (a socket error, a netlink overflow) must not end the daemon.
                self.stats["bugs"] += 1
                log.exception("BUG: reading %s failed", getattr(source, "name", source))
        if self._reload_requested:
            self._reload_requested = False
            try:
                if self.on_reload is not None:
                    self.on_reload()
            except Exception:
                self.stats["bugs"] += 1
                log.exception("BUG: reload failed")
        if self.pcap is not None:
            self.pcap.flush()
        deadline = self._deadline()
        now = self.clock()
        if deadline is not None and now >= deadline:
            self.stats["timers"] += 1
            self._call("handle_timer", self.role.handle_timer, now)
        for hook in self.after_batch:
            try:
                hook(now)
            except Exception:
                self.stats["bugs"] += 1
                log.exception("BUG: after-batch hook failed")

    def _deadline(self) -> float | None:
        try:
            return self.role.get_timer()
        except Exception:
            self.stats["bugs"] += 1
            log.exception("BUG: %s.get_timer raised", type(self.role).__name__)
            return None

    def run(self, until: Callable[[], bool] | None = None) -> str:
        """Run until ``stop()`` (a signal) or until ``until()`` is true; returns the reason."""
        self._running = True
        # Start-up objects (configs, SAs, tables) live as long as the daemon: take them out of
        # the collector's generations, so its passes only look at what the data path allocates.
        gc.collect()
        gc.freeze()
        while self._running:
            self.run_once()
            if until is not None and until():
                self._stop_reason = self._stop_reason or "done"
                break
        return self._stop_reason or "stopped"

    def close(self) -> None:
        if self._wake_r is not None:
            signal.set_wakeup_fd(-1)
            self._wake_r.close()
        if self._wake_w is not None:
            self._wake_w.close()
        if self._epoll is not None:
            self._epoll.close()
        if self._selector is not None:
            self._selector.close()
