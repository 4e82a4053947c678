"""In-memory network for IKE endpoints (shared by the IKE tests and the benchmark; no tests here)."""

from __future__ import annotations

from mipsec.ike.codec import TrafficSelector as TS
from mipsec.ike.config import IkeConfig
from mipsec.ike.endpoint import IkeEndpoint
from mipsec.ike.events import SendDatagram

PSK = b"correct horse battery staple"
MN_ADDR, GW_ADDR = "172.16.1.10", "172.16.0.1"


def configs(**kw):
    ikw = {k[2:]: v for k, v in kw.items() if k.startswith("i_")}
    rkw = {k[2:]: v for k, v in kw.items() if k.startswith("r_")}
    common = {k: v for k, v in kw.items() if not k.startswith(("i_", "r_"))}
    ci = IkeConfig(**{**dict(local_id="mn@example", remote_id="gw.example",
                             psks={"gw.example": PSK},
                             local_ts=(TS.from_network("10.1.0.100/32"),),
                             remote_ts=(TS.from_network("0.0.0.0/0"),)), **common, **ikw})
    cr = IkeConfig(**{**dict(local_id="gw.example", psks={"mn@example": PSK},
                             local_ts=(TS.from_network("0.0.0.0/0"),),
                             remote_ts=(TS.from_network("10.1.0.0/24"),)), **common, **rkw})
    return ci, cr


def ike_sa_of(endpoint: IkeEndpoint, ike_id):
    """The endpoint's IKE SA object an event's ``ike_id`` names (tests poke its internals; a
    runtime only ever uses the identifier)."""
    return next(sa for sa in endpoint.ike_sas if sa.ike_id == ike_id)


class Net:
    """Delivers SendDatagram outputs between endpoints by IP address.

    ``nat``: {(private ip, port): (public ip, port)} rewrites sources on the way out (and the
    reverse on the way in).  ``tap(datagram) -> datagram | None`` may drop or alter anything."""

    def __init__(self, endpoints: dict[str, IkeEndpoint], nat=None):
        self.endpoints = endpoints
        self.nat = dict(nat or {})
        self.events: list[tuple[str, object]] = []
        self.sent: list[SendDatagram] = []
        self.tap = None
        self.now = 0.0

    def name_of(self, ep):
        return next(k for k, v in self.endpoints.items() if v is ep)

    def deliver(self, outputs, origin: str):
        queue = [(origin, o) for o in outputs]
        while queue:
            src, o = queue.pop(0)
            if not isinstance(o, SendDatagram):
                self.events.append((src, o))
                continue
            self.sent.append(o)
            if self.tap is not None:
                o = self.tap(o)
                if o is None:
                    continue
            source = self.nat.get(o.local, o.local)
            dest = o.remote
            for priv, pub in self.nat.items():
                if pub == dest:
                    dest = priv
            target = next((n for n, ep in self.endpoints.items() if n == dest[0]), None)
            if target is None:
                continue
            res = self.endpoints[target].receive_datagram(o.data, dest, source, self.now)
            queue += [(target, r) for r in res]

    def run_timers(self, until: float, step: float = 0.25):
        while self.now < until:
            self.now = min(until, self.now + step)
            for name, ep in self.endpoints.items():
                t = ep.get_timer()
                if t is not None and t <= self.now:
                    self.deliver(ep.handle_timer(self.now), name)

    def of(self, kind, who=None):
        return [e for w, e in self.events if isinstance(e, kind) and (who is None or w == who)]


def establish(ci=None, cr=None, *, nat=None, mn=MN_ADDR, gw=GW_ADDR, tap=None, **kw):
    if ci is None:
        ci, cr = configs(**kw)
    I, R = IkeEndpoint(ci), IkeEndpoint(cr)
    net = Net({mn: I, gw: R}, nat=nat)
    net.tap = tap
    net.deliver(I.initiate((mn, 500), (gw, 500), net.now), mn)
    return net, I, R
