"""A soak run's figures and verdict (``analyse``, ``verdict``, ``format_report``), from the raw
record ``mipsec.lab.soak.run_soak`` returns:

* per MN and in all: loss inside that MN's handover windows (from a move to its registration,
  plus ``HANDOVER_TAIL_S``) and outside them (another MN's handover does not excuse a loss); a
  lost datagram's time is interpolated from the arrivals of its neighbours;
* loss per child SA re-key (the GW's ``gw-sas-rekeyed`` events of that MN; its IKE SA re-keys
  too), counted in ``[t - REKEY_BEFORE_S, t + REKEY_AFTER_S]`` outside handover windows;
* the RSS slope of each daemon after the warm-up (least squares, MB/h);
* every table size after the warm-up: growing if its smallest value in the last third of the
  samples is above its largest in the first third (timelines are bounded by their cap);
* SPIs left behind: replayed SPIs that the receiver still knew, other than its current one.

Times are CLOCK_MONOTONIC, which the daemons' timelines and the stream reports share.

Why a handover window is [move - HANDOVER_BEFORE_S, registration + HANDOVER_TAIL_S] and no
wider.  What a move may lose is what was on its way to, or queued for, the old path until the
GW's SA and the HA's binding point at the new one; both happen before the MN's registration
completes (the GW forwards the reply only after the HA's SIU re-pointed its SA), so nothing a
move excuses can be sent after the registration.  The margins are for the clocks, not the
path: a lost datagram's time is interpolated from the arrival stamps of its neighbours, and a
stream process stamps a datagram when it reads it, which on a busy machine is late by however
long it waited for a CPU (tenths of a second; the samples' CPU waits show it) - so the end of
a handover gap can be stamped after the registration, and a datagram lost just before the move
command can be stamped before it.  A loss stamped a second or more after the registration is
not the move's: it counts outside, and the report sets it beside the kernel's drops and the
processes' CPU waits of its sample interval.
"""

from __future__ import annotations

import bisect
from typing import Any

HANDOVER_BEFORE_S = 0.2      # a handover window opens this long before the move command
HANDOVER_TAIL_S = 1.0        # and closes this long after the registration completed
REKEY_BEFORE_S = 0.5         # a re-key's window around its GW timeline event
REKEY_AFTER_S = 1.5
EDGE_S = 2.0                 # datagrams sent in the first / last seconds are not judged
RSS_SLOPE_LIMIT_MB_H = 2.0
INTERVALS_SHOWN = 12         # sample intervals with loss or kernel drops, in the report
GROWN_LINES = 6              # under tracemalloc: the source lines that grew most, per daemon


def lost_with_times(sender: dict[str, Any], receiver: dict[str, Any], rate: float
                    ) -> tuple[list[tuple[int, float]], int]:
    """(lost (seq, estimated time)..., judged count) for datagrams sent between EDGE_S after
    the start and EDGE_S before the end.  A lost datagram's time is interpolated between the
    arrivals of the nearest received sequence numbers around it."""
    sent = sender["sent"]
    span = max(1e-9, sender["end"] - sender["start"])
    first = int(EDGE_S * sent / span)
    last = max(first, sent - int(EDGE_S * sent / span) - int(rate * 0.5))
    got: dict[int, float] = {}
    for seq, t in receiver["received"]:
        got.setdefault(seq, t)
    seqs = sorted(got)
    lost = []
    for seq in range(first, last):
        if seq in got:
            continue
        i = bisect.bisect_left(seqs, seq)
        lo = seqs[i - 1] if i > 0 else None
        hi = seqs[i] if i < len(seqs) else None
        if lo is not None and hi is not None:
            t = got[lo] + (got[hi] - got[lo]) * (seq - lo) / (hi - lo)
        elif lo is not None:
            t = got[lo] + (seq - lo) / rate
        elif hi is not None:
            t = got[hi] - (hi - seq) / rate
        else:
            t = sender["start"] + seq / rate
        lost.append((seq, t))
    return lost, last - first


def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx * 3600.0


def _analyse_mobile(mobile: dict[str, Any], events: list[dict[str, Any]], rate: float,
                    t0: float, end: float) -> dict[str, Any]:
    """One MN's figures: its moves, its streams judged against its own handover windows, and
    its re-keys (events that name its home address)."""
    moves = mobile["moves"]
    windows = []
    for i, mv in enumerate(moves):
        nxt = moves[i + 1]["time"] if i + 1 < len(moves) else end
        stop = (mv["registered"] + HANDOVER_TAIL_S) if mv.get("registered") else nxt
        windows.append((mv["time"] - HANDOVER_BEFORE_S, min(stop, nxt), mv["to"]))

    def in_handover(t: float) -> bool:
        return any(a <= t <= b for a, b, _ in windows)

    home = mobile["home"]
    mine = [e for e in events if (e.get("detail") or {}).get("home_address") == home]
    rekeys = [e for e in mine if e.get("kind") == "gw-sas-rekeyed"]
    ike_rekeys = [e for e in mine if e.get("kind") == "ike-rekeyed"]
    ends = [e for e in mine if e.get("kind") == "ike-ended"]
    fig: dict[str, Any] = {
        "moves": len(moves), "returns_home": sum(1 for m in moves if m["to"] == "home"),
        "failed_moves": sum(1 for m in moves if m.get("error")), "child_rekeys": len(rekeys),
        "ike_rekeys": len(ike_rekeys), "ike_sas_ended": len(ends), "directions": {},
        "per_rekey": []}
    per_rekey = {id(e): 0 for e in rekeys + ike_rekeys}
    for name, snd, rcv in (("downlink", "cn", "mn"), ("uplink", "mn", "cn")):
        sender, receiver = mobile[f"stream_{snd}"], mobile[f"stream_{rcv}"]
        lost, judged = lost_with_times(sender, receiver, rate)
        inside = [t for _s, t in lost if in_handover(t)]
        outside = [t for _s, t in lost if not in_handover(t)]
        for t in outside:
            for e in rekeys + ike_rekeys:
                if e["time"] - REKEY_BEFORE_S <= t <= e["time"] + REKEY_AFTER_S:
                    per_rekey[id(e)] += 1
                    break
        fig["directions"][name] = {
            "judged": judged, "lost": len(lost), "sender_skipped": sender.get("skipped", 0),
            "lost_in_handover": len(inside), "lost_outside_handover": len(outside),
            "outside_at": [round(t - t0, 2) for t in outside[:50]], "_outside": outside}
    for e in rekeys + ike_rekeys:
        fig["per_rekey"].append({"at_s": round(e["time"] - t0, 2), "kind": e["kind"],
                                 "in_handover": in_handover(e["time"]),
                                 "lost": per_rekey[id(e)]})
    fig["rekey_loss"] = sum(per_rekey.values())
    fig["rekeys_in_handover"] = sum(1 for r in fig["per_rekey"] if r["in_handover"])
    return fig


def _traced(samples: list[dict[str, Any]], role: str, warm: float) -> dict[str, Any]:
    """With the daemons under tracemalloc: the traced memory's slope after the warm-up and the
    source lines that grew most over it (each sample's growth since the one before, summed)."""
    rows = [(s["time"], s["roles"][role]["memory"]) for s in samples
            if (s["roles"].get(role) or {}).get("memory", {}).get("tracing")]
    if not rows:
        return {}
    after = [(t, m) for t, m in rows if t >= warm]
    grown: dict[str, float] = {}
    for _t, m in after[1:]:
        for line in m.get("grown", []):
            grown[line["where"]] = grown.get(line["where"], 0.0) + line["kb_diff"]
    top = sorted(grown.items(), key=lambda kv: -kv[1])[:GROWN_LINES]
    return {"traced_slope_mb_h": _slope_per_hour([(t, m["traced_kb"] / 1024.0)
                                                  for t, m in after]),
            "traced_mb_last": rows[-1][1]["traced_kb"] / 1024.0,
            "grown_after_warmup": [{"where": w, "kb": round(kb, 1)} for w, kb in top]}


def _counter_rows(samples: list[dict[str, Any]]) -> list[tuple[float, dict[str, float]]]:
    """Per sample: every counter that only grows, as ``where:name`` (kernel drops by
    socket / interface, CPU and run-queue wait seconds), daemons and other namespaces alike."""
    rows = []
    for s in samples:
        flat: dict[str, float] = {}
        for where, fig in {**s["roles"], **s.get("namespaces", {})}.items():
            for key, n in (fig.get("kernel_drops") or {}).items():
                flat[f"{where}:{key}"] = n
            for key in ("cpu_s", "run_wait_s"):
                if fig.get(key) is not None:
                    flat[f"{where}:{key}"] = fig[key]
        rows.append((s["time"], flat))
    return rows


def _intervals(samples: list[dict[str, Any]], outside: list[float], t0: float
               ) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """(kernel drops over the run by where, the sample intervals that lost datagrams outside
    handover windows or in which the kernel dropped: the loss, the kernel's drops and each
    process's share of the interval spent runnable but waiting for a CPU)."""
    rows = _counter_rows(samples)
    totals: dict[str, int] = {}
    out = []
    for (ta, a), (tb, b) in zip(rows, rows[1:], strict=False):
        span = max(1e-9, tb - ta)
        drops = {k.replace(":", " ", 1): int(v - a.get(k, 0)) for k, v in b.items()
                 if not k.endswith(("cpu_s", "run_wait_s")) and v > a.get(k, 0)}
        for k, n in drops.items():
            totals[k] = totals.get(k, 0) + n
        lost = sum(1 for t in outside if ta <= t < tb)
        if not lost and not drops:
            continue
        waits = {k.split(":")[0]: round((v - a.get(k, v)) / span, 2) for k, v in b.items()
                 if k.endswith(":run_wait_s")}
        out.append({"from_s": round(ta - t0, 1), "to_s": round(tb - t0, 1),
                    "lost_outside_handover": lost, "kernel_drops": drops,
                    "cpu_wait_share": dict(sorted(waits.items(), key=lambda kv: -kv[1])[:4])})
    return totals, out


def analyse(record: dict[str, Any]) -> dict[str, Any]:
    plan = record["plan"]
    rate = plan["rate"]
    t0 = record["start"]
    warm = t0 + (plan["warmup_s"] if plan.get("warmup_s") is not None
                 else min(300.0, plan["minutes"] * 15.0))
    events = record.get("timeline", [])
    per_mobile = {name: _analyse_mobile(m, events, rate, t0, record["end"])
                  for name, m in record["mobiles"].items()}
    figures: dict[str, Any] = {"mobiles": per_mobile, "directions": {}, "per_rekey": []}
    for key in ("moves", "returns_home", "failed_moves", "child_rekeys", "ike_rekeys",
                "ike_sas_ended", "rekey_loss", "rekeys_in_handover"):
        figures[key] = sum(m[key] for m in per_mobile.values())
    for name in ("downlink", "uplink"):
        rows = [m["directions"][name] for m in per_mobile.values()]
        figures["directions"][name] = {
            key: sum(r[key] for r in rows) for key in
            ("judged", "lost", "sender_skipped", "lost_in_handover", "lost_outside_handover")}
        figures["directions"][name]["outside_at"] = [
            t for r in rows for t in r["outside_at"]][:50]
    for mobile_name, m in per_mobile.items():
        figures["per_rekey"] += [{**r, "mobile": mobile_name} for r in m["per_rekey"]]
    # processes
    samples = record.get("samples", [])
    procs: dict[str, Any] = {}
    for role in record.get("daemons", ("ha", "gw", "mn")):
        pts = [(s["time"], s["roles"][role]["rss_kb"] / 1024.0) for s in samples
               if role in s["roles"] and "rss_kb" in s["roles"][role]]
        after = [p for p in pts if p[0] >= warm]
        anon = [(s["time"], s["roles"][role]["rss_anon_kb"] / 1024.0) for s in samples
                if s["time"] >= warm and "rss_anon_kb" in s["roles"].get(role, {})]
        fds = [s["roles"][role].get("fds") for s in samples if role in s["roles"]]
        cpu = [(s["time"], s["roles"][role].get("cpu_s")) for s in samples
               if role in s["roles"] and s["roles"][role].get("cpu_s") is not None]
        cpu_share = ((cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0])
                     if len(cpu) > 1 and cpu[-1][0] > cpu[0][0] else None)
        sizes = [(s["time"], s["roles"][role].get("sizes", {})) for s in samples
                 if role in s["roles"] and s["time"] >= warm]
        growing, table = [], {}
        if sizes:
            third = max(1, len(sizes) // 3)
            keys = sorted({k for _t, d in sizes for k in d})
            for k in keys:
                vals = [d.get(k, 0) for _t, d in sizes]
                table[k] = {"first": vals[0], "max": max(vals), "last": vals[-1]}
                if k == "timeline":
                    continue                 # bounded by its limit (mipsec.node.timeline)
                if len(vals) >= 3 and min(vals[-third:]) > max(vals[:third]):
                    growing.append(k)
        procs[role] = {
            "rss_mb_first": pts[0][1] if pts else None, "rss_mb_last": pts[-1][1] if pts else None,
            "rss_slope_mb_h": _slope_per_hour(after), "rss_points_after_warmup": len(after),
            "rss_anon_slope_mb_h": _slope_per_hour(anon),
            "fds_first": fds[0] if fds else None, "fds_last": fds[-1] if fds else None,
            "fds_max": max((f for f in fds if f is not None), default=None),
            "cpu_share": cpu_share, "sizes": table, "growing": growing,
            "drops_last": samples[-1]["roles"][role].get("drops", {}) if samples else {},
            "sad_drops_last": samples[-1]["roles"][role].get("sad_drops", {}) if samples else {},
            **_traced(samples, role, warm)}
    figures["processes"] = procs
    replay = record.get("replay", {})
    figures["spis_replayed"] = replay.get("spis", 0)
    figures["spis_known"] = [r["spi"] for r in replay.get("results", []) if r.get("known")]
    figures["spis_left_behind"] = [r["spi"] for r in replay.get("left_behind", [])]
    figures["spis_current"] = replay.get("current", {})
    # the replay tells known from unknown: a current (or retiring) SPI of each receiver was known
    receivers = [r for r in record.get("daemons", ("gw", "mn")) if r != "ha"]
    figures["replay_control"] = {
        role: any(r.get("known") and (r.get("current") or r.get("in_grace"))
                  for r in replay.get("results", []) if r["role"] == role)
        for role in receivers}
    # a control that failed says why: that receiver's replayed SPIs and the control pings
    figures["replay_control_detail"] = {
        role: {"replayed": [{k: r.get(k) for k in ("spi", "known", "current", "in_grace",
                                                   "last", "skipped")}
                            for r in replay.get("results", []) if r["role"] == role][:8],
               "control_pings": record.get("control_pings", [])}
        for role, ok in figures["replay_control"].items() if not ok}
    outside = []
    for m in per_mobile.values():
        for d in m["directions"].values():
            outside += d.pop("_outside")
    figures["kernel_drops"], figures["loss_intervals"] = _intervals(samples, outside, t0)
    figures["duration_s"] = record["end"] - t0
    return figures


def verdict(fig: dict[str, Any]) -> list[tuple[str, bool, str]]:
    out = []
    outside = sum(d["lost_outside_handover"] for d in fig["directions"].values())
    per_mn = "; ".join(f"{name} {sum(d['lost_outside_handover'] for d in m['directions'].values())}"
                       for name, m in fig["mobiles"].items()) if len(fig["mobiles"]) > 1 else ""
    out.append(("zero loss outside handover windows", outside == 0,
                f"{outside} lost" + (f" ({per_mn})" if per_mn else "")))
    out.append(("zero loss at re-keys", fig["rekey_loss"] == 0,
                f"{fig['rekey_loss']} lost over {fig['child_rekeys']} child and "
                f"{fig['ike_rekeys']} IKE SA re-keys"))
    for role, p in fig["processes"].items():
        slope = p["rss_slope_mb_h"]
        out.append((f"{role}: RSS slope after warm-up < {RSS_SLOPE_LIMIT_MB_H:g} MB/h",
                    slope is not None and slope < RSS_SLOPE_LIMIT_MB_H,
                    "n/a" if slope is None else f"{slope:+.2f} MB/h"))
        out.append((f"{role}: no growing structure", not p["growing"],
                    ", ".join(p["growing"]) or "none"))
    left = fig["spis_left_behind"]
    control = fig["replay_control"]
    out.append(("no SPI left behind", not left and all(control.values()),
                f"{fig['spis_replayed']} SPIs replayed, known: {len(fig['spis_known'])} "
                f"(each a current or retiring one), left behind: {', '.join(left) or 'none'}; "
                f"a current SPI known: "
                + ", ".join(f"{role} {ok}" for role, ok in control.items())))
    return out


def format_report(fig: dict[str, Any], plan: dict[str, Any]) -> str:
    n = len(fig["mobiles"])
    lines = [f"soak: {fig['duration_s'] / 60:.1f} min, {n} MN{'s' if n > 1 else ''}, "
             f"{plan['rate']:g} datagrams/s each way per MN, "
             f"child SA {plan['child_lifetime_s']:g} s, IKE SA {plan['ike_lifetime_s']:g} s, "
             f"one-way delay {plan['delay_ms']:g} ms",
             f"  {fig['moves']} moves ({fig['returns_home']} returns home, "
             f"{fig['failed_moves']} not completed), {fig['child_rekeys']} child and "
             f"{fig['ike_rekeys']} IKE SA re-keys ({fig['rekeys_in_handover']} inside a handover "
             f"window), {fig['ike_sas_ended']} IKE SA ends logged"]
    for name, d in fig["directions"].items():
        lines.append(f"  {name}: {d['judged']} judged, lost {d['lost']}: "
                     f"{d['lost_in_handover']} inside handover windows, "
                     f"{d['lost_outside_handover']} outside (the sender, held up by a busy "
                     f"machine, skipped {d['sender_skipped']} send slots)")
    if n > 1:
        for name, m in fig["mobiles"].items():
            dl, ul = m["directions"]["downlink"], m["directions"]["uplink"]
            lines.append(f"    {name}: {m['moves']} moves ({m['returns_home']} home, "
                         f"{m['failed_moves']} not completed), {m['child_rekeys']} child / "
                         f"{m['ike_rekeys']} IKE SA re-keys; downlink lost "
                         f"{dl['lost_in_handover']} in / {dl['lost_outside_handover']} outside "
                         f"handovers of {dl['judged']}, uplink {ul['lost_in_handover']} / "
                         f"{ul['lost_outside_handover']} of {ul['judged']}; at re-keys "
                         f"{m['rekey_loss']}")
    per = [r["lost"] for r in fig["per_rekey"] if not r["in_handover"]]
    if per:
        lines.append(f"  loss per re-key (outside handovers): max {max(per)}, total {sum(per)}, "
                     f"{sum(1 for x in per if x)} of {len(per)} re-keys lost any")
    for role, p in fig["processes"].items():
        slope = p["rss_slope_mb_h"]
        cpu = p["cpu_share"]
        first = "n/a" if p["rss_mb_first"] is None else f"{p['rss_mb_first']:.1f}"
        last = "n/a" if p["rss_mb_last"] is None else f"{p['rss_mb_last']:.1f}"
        anon = p.get("rss_anon_slope_mb_h")
        lines.append(f"  {role}: RSS {first} -> {last} MB, slope "
                     f"after warm-up {'n/a' if slope is None else f'{slope:+.2f} MB/h'}"
                     f"{'' if anon is None else f' (anonymous memory {anon:+.2f} MB/h)'}; fds "
                     f"{p['fds_first']} -> {p['fds_last']} (max {p['fds_max']}); CPU "
                     f"{'n/a' if cpu is None else f'{100 * cpu:.0f} %'}")
        sizes = ", ".join(f"{k} {v['first']}->{v['last']} (max {v['max']})"
                          for k, v in p["sizes"].items())
        if sizes:
            lines.append(f"    sizes: {sizes}")
        if "traced_mb_last" in p:
            slope = p["traced_slope_mb_h"]
            lines.append(f"    traced (tracemalloc) {p['traced_mb_last']:.1f} MB, slope after "
                         f"warm-up {'n/a' if slope is None else f'{slope:+.2f} MB/h'}; grown "
                         "most: " + (", ".join(f"{g['where']} {g['kb']:+.0f} kB"
                                               for g in p["grown_after_warmup"]) or "nothing"))
    drops = fig.get("kernel_drops") or {}
    lines.append("  kernel drops (a reader too slow): " + (", ".join(
        f"{k} {n}" for k, n in sorted(drops.items(), key=lambda kv: -kv[1])) or "none"))
    for iv in (fig.get("loss_intervals") or [])[:INTERVALS_SHOWN]:
        waits = ", ".join(f"{k} {100 * v:.0f} %" for k, v in iv["cpu_wait_share"].items())
        kd = ", ".join(f"{k} {n}" for k, n in iv["kernel_drops"].items()) or "none"
        lines.append(f"    {iv['from_s']:.0f}-{iv['to_s']:.0f} s: {iv['lost_outside_handover']} "
                     f"lost outside handovers; kernel dropped: {kd}; waiting for a CPU: {waits}")
    lines.append("criteria:")
    for name, ok, detail in verdict(fig):
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return "\n".join(lines)

