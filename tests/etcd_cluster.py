"""A real 3-member etcd cluster on loopback, for the tests of the etcd binding store.

Each member listens on its own free loopback ports and keeps its data under the test's temp
directory; ``--heartbeat-interval=50 --election-timeout=500`` make an election take about a
second.  ``stop`` always ends every member (SIGTERM, then SIGKILL: a member stopped after its
peers are gone can hang) and removes the data.  A missing ``etcd`` fails under CI=true
(tools/setup.sh installs Debian's etcd-server) and skips elsewhere.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field

from needs import need

MEMBERS = 3
START_TIMEOUT_S = 20.0
STOP_WAIT_S = 1.0


def etcd_binary() -> str:
    path = shutil.which("etcd")
    need(None if path else "etcd not installed (Debian package etcd-server)",
         "etcd is required in CI (tools/setup.sh installs Debian's etcd-server)")
    return path  # type: ignore[return-value]


def _die_with_parent() -> None:
    """In the member, before exec: SIGKILL when the test process dies (even by SIGKILL), so
    that a killed test run leaves no members behind (PR_SET_PDEATHSIG, Linux)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _post(endpoint: str, path: str, body: dict, timeout: float = 0.5,
          context: ssl.SSLContext | None = None) -> dict:
    scheme, _, hostport = endpoint.partition("://")
    host, port = hostport.split(":")
    conn = (http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)
            if scheme == "https" else http.client.HTTPConnection(host, int(port), timeout=timeout))
    try:
        conn.request("POST", path, body=json.dumps(body))
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"{}")
        if resp.status != 200:
            raise OSError(f"{endpoint}{path}: HTTP {resp.status} {data}")
        return data
    finally:
        conn.close()


@dataclass
class Member:
    name: str
    client: str            # http://127.0.0.1:port
    peer: str
    data_dir: str
    proc: subprocess.Popen | None = None
    context: ssl.SSLContext | None = None

    def status(self) -> dict:
        return _post(self.client, "/v3/maintenance/status", {}, context=self.context)


@dataclass
class EtcdCluster:
    base: str
    binary: str
    members: list[Member] = field(default_factory=list)
    size: int = MEMBERS
    # TLS on the client URLs: {"cert": server cert, "key": its key, "ca": CA of the clients'
    # certificates (and of the server's)}; members then require client certificates
    tls: dict[str, str] | None = None
    client_context: ssl.SSLContext | None = None

    @property
    def endpoints(self) -> list[str]:
        return [m.client for m in self.members]

    def start(self) -> EtcdCluster:
        os.makedirs(self.base, mode=0o700, exist_ok=True)
        ports = _free_ports(2 * self.size)
        token = f"mipsec-test-{os.getpid()}-{ports[0]}"
        scheme = "https" if self.tls else "http"
        tls_flags = ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                     "--client-cert-auth", "--trusted-ca-file", self.tls["ca"]] if self.tls else []
        for i in range(self.size):
            self.members.append(Member(f"m{i}", f"{scheme}://127.0.0.1:{ports[2 * i]}",
                                       f"http://127.0.0.1:{ports[2 * i + 1]}",
                                       os.path.join(self.base, f"m{i}"),
                                       context=self.client_context))
        initial = ",".join(f"{m.name}={m.peer}" for m in self.members)
        for m in self.members:
            log = open(m.data_dir + ".log", "wb")
            m.proc = subprocess.Popen(
                [self.binary, "--name", m.name, "--data-dir", m.data_dir,
                 "--listen-client-urls", m.client, "--advertise-client-urls", m.client,
                 "--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer,
                 "--initial-cluster", initial, "--initial-cluster-token", token,
                 "--initial-cluster-state", "new",
                 "--heartbeat-interval=50", "--election-timeout=500",
                 "--snapshot-count=10000", "--quota-backend-bytes=67108864", *tls_flags],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)
            log.close()
        self.wait_healthy()
        return self

    def wait_healthy(self, members: list[Member] | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for m in members or self.members:
            while True:
                try:
                    if m.status().get("leader"):
                        # a linearizable read goes through the leader: the member is serving
                        _post(m.client, "/v3/kv/range", {"key": "AA=="}, context=m.context)
                        break
                except (OSError, ValueError, http.client.HTTPException):   # ssl.SSLError too
                    pass
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited: {self.log(m)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {m.name} not healthy: {self.log(m)}")
                time.sleep(0.05)

    def log(self, m: Member) -> str:
        try:
            with open(m.data_dir + ".log", "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def leader(self) -> Member:
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            st = m.status()
            if st.get("leader") and st["leader"] == st["header"]["member_id"]:
                return m
        raise RuntimeError("no leader")

    def kill(self, m: Member) -> None:
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for m in self.members:
            if m.proc is None:
                continue
            try:
                m.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)


def start_cluster(base: str, **kw) -> EtcdCluster:
    binary = etcd_binary()
    cluster = EtcdCluster(base, binary, **kw)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
