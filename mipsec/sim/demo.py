"""``mipsec demo --sim``: a handover demonstration in the in-memory network (no root needed).

The MN attaches to visited network A, negotiates its ESP SAs with the GW by IKEv2 (RFC 7296,
as the lab demo does; ``manual_keys=True`` for pre-shared ESP keys) and registers; the demo
prints the IKE set-up (time to the IKE SA and to the first child SA) and that first
registration.  A CN <-> MN UDP stream starts (one datagram per millisecond each way), then: a
break-before-make handover A -> B, a make-before-break handover B -> A, and a return home.
For each move it prints the merged timeline of MN, GW and HA and what the stream saw: packets
lost and the longest interruption per direction.
"""

from __future__ import annotations

from typing import Any, TextIO

from mipsec.node import timeline as tl
from mipsec.node.mobile_node import RegState
from mipsec.sim.scenario import merged_timeline, start_streams, wait_registered
from mipsec.sim.topology import build_topology

INTERVAL_S = 0.001


def _print_ike_setup(p, topo, attached: float) -> bool:
    """The IKEv2 set-up from visited network A: IKE SA and first child SA, as seen by the MN."""
    mn, gw = topo.mn.role, topo.gw.role
    ike_up = next((e.time for e in mn.timeline if e.kind == "ike-established"), None)
    child = next((e for e in mn.timeline if e.kind == "sas-installed"), None)
    registered = next((e.time for e in mn.timeline if e.kind == "rrp-received"), None)
    if ike_up is None or child is None:
        p("IKEv2 set-up: FAILED (no IKE SA or no child SA)")
        return False
    first = next((c for sa in mn.ike.endpoint.ike_sas for c in sa.children.values()), None)
    esp = (f", ESP {first.encryption} {first.suite.key_bits} bits"
           + (f" + {first.integrity}" if first.integrity else "")) if first is not None else ""
    p("IKEv2 set-up from visited network A (IKE_SA_INIT + IKE_AUTH, PSK, one round trip each):")
    p(f"   IKE SA established after {(ike_up - attached) * 1e3:7.2f} ms")
    p(f"   first child SA after     {(child.time - attached) * 1e3:7.2f} ms: "
      f"MN inbound SPI {child.detail['inbound_spi']:08x}, outbound SPI "
      f"{child.detail['outbound_spi']:08x}{esp}")
    if registered is not None:
        p(f"   registered after         {(registered - attached) * 1e3:7.2f} ms")
    installed = [e for e in gw.timeline if e.kind == "gw-sas-installed"]
    if installed:
        d = installed[0].detail
        p(f"   GW installed the pair for {d['home_address']} ({d['ike_id']}) from {d['peer']}")
    p("")
    return True


def run_demo(out: TextIO, *, internet_delay_s: float = 0.020, seed: int = 1,
             manual_keys: bool = False, handover_mode: str = "siu",
             plot_dir: str | None = None) -> int:
    """Print the demo to ``out``; return 0 when every registration completed and data flowed.

    ``manual_keys``: pre-shared ESP keys instead of SAs negotiated by IKEv2 (the default);
    ``handover_mode``: "siu" or "mobike" (IKEv2 only); ``plot_dir``: write a sequence chart
    per move and the packet arrivals around the moves there (PNG, ``mipsec.plot``)."""
    sa_source = "manual" if manual_keys else "ikev2"
    # manual keys only with CBC + HMAC, as the daemons require (docs/security.md §3.6)
    extra: dict[str, Any] = {"encryption": "ENCR_AES_CBC"} if manual_keys else {}
    topo = build_topology(1, internet_delay_s=internet_delay_s, seed=seed, sa_source=sa_source,
                          handover_mode=handover_mode, **extra)
    mn = topo.mn.role
    a, b = topo.care_of["a"][0], topo.care_of["b"][0]
    p = lambda *s: print(*s, file=out)  # noqa: E731
    p("mipsec demo (in-memory network, virtual clock)")
    p(f"  CN 10.1.0.10, HA {topo.ha.role.address}, GW {topo.gw.role.inside} | {topo.gw.role.outside}, "
      f"MN home {mn.home_address}")
    p(f"  visited A: CoA {a}; visited B: CoA {b}; one-way Internet delay "
      f"{internet_delay_s * 1e3:.1f} ms; MN-GW-HA-GW round trip {topo.round_trip_s * 1e3:.1f} ms")
    how = "manual keys" if manual_keys else "SAs negotiated by IKEv2"
    p(f"  {how}, {'MOBIKE' if handover_mode == 'mobike' else 'SIU'} handovers")
    p("")
    attached = topo.sim.now
    topo.move("a")
    ok = wait_registered(topo, 3.0)
    if not manual_keys:
        ok = _print_ike_setup(p, topo, attached) and ok
    start = topo.sim.now + 0.1
    moves = [(start + 0.5, "b", False, "handover 1: A -> B (break-before-make)"),
             (start + 1.5, "a", True, "handover 2: B -> A (make-before-break)"),
             (start + 2.5, "home", False, "return home (deregistration)")]
    stop = start + 3.5
    start_streams(topo, interval_s=INTERVAL_S, start=start, stop=stop)
    for at, where, mbb, _title in moves:
        topo.sim.run(until=at)
        topo.move(where, make_before_break=mbb)
        if mbb:
            topo.sim.run(until=at + 0.2)
            topo.detach("b")
        ok = wait_registered(topo, 3.0) and ok
    topo.sim.run(until=stop + 0.5)

    events = merged_timeline(topo)
    parts = tl.split_handovers(events)
    p(tl.format_table(parts[0]) if parts else "(no registration)")
    p("")
    cn_app, mn_app = topo.cn.app, topo.mn.application
    send_times = [start + i * INTERVAL_S for i in range(max(cn_app.sent, mn_app.sent))]
    bounds = [m[0] for m in moves] + [stop]
    for k, (at, _where, _mbb, title) in enumerate(moves):
        p(f"== {title} at t={at:.3f} s")
        part = parts[k + 1] if k + 1 < len(parts) else []
        p(tl.format_table(part, t0=at))
        lo = bounds[k] - 0.25
        hi = bounds[k + 1] - 0.25
        for name, receiver, sender in (("downlink CN->MN", mn_app, cn_app),
                                       ("uplink   MN->CN", cn_app, mn_app)):
            r = receiver.report(sender.sent, since=lo, until=hi)
            sent = sum(1 for t in send_times[:sender.sent] if lo <= t < hi)
            got = len({a[1] for a in receiver.arrivals if lo <= a[2] < hi})
            p(f"   {name}: longest interruption {r.longest_interruption_s * 1e3:7.2f} ms, "
              f"lost {max(0, sent - got)} of {sent}")
        p("")
    if plot_dir:
        from mipsec.plot import write_demo_plots
        streams = {"downlink CN->MN": [(a[1], a[3]) for a in mn_app.arrivals],
                   "uplink MN->CN": [(a[1], a[3]) for a in cn_app.arrivals]}
        for path in write_demo_plots(plot_dir, [(at, title) for at, _w, _m, title in moves],
                                     parts[1:], streams, f"simulator, {handover_mode.upper()}"):
            p(f"plot: {path}")
        p("")
    down = mn_app.report(cn_app.sent)
    up = cn_app.report(mn_app.sent)
    p(f"whole run: downlink {down.received}/{down.sent} received ({down.lost} lost), "
      f"uplink {up.received}/{up.sent} received ({up.lost} lost)")
    p(f"final state: MN {mn.state.value}, HA bindings {len(topo.ha.role.bindings)}, "
      f"GW binding {topo.gw.role.mobiles[mn.home_address].care_of}")
    drops = {**topo.gw.role.drops, **topo.ha.role.drops, **mn.drops}
    if drops:
        p(f"drops: {', '.join(f'{k}={v}' for k, v in drops.items())}")
    ok = ok and mn.state is RegState.AT_HOME and down.received > 0 and up.received > 0
    return 0 if ok else 1
