"""`mipsec status` as text: a daemon's status reply (SAs, IKE SAs, bindings, drops, the last
handover's timeline) rendered for people; `--json` prints the reply itself."""

from __future__ import annotations

from typing import Any


def render_status(reply: dict[str, Any]) -> str:
    """Human-readable form of a daemon's status reply."""
    if not reply.get("ok"):
        return f"error: {reply.get('error')}"
    lines = [f"{reply.get('role')} {reply.get('name')}  pid {reply.get('pid')}  "
             f"tun {reply.get('tun')}  config {reply.get('config')}"]
    now = reply.get("clock", {}).get("monotonic")
    io = reply.get("io", {})
    lines.append("  io: " + ", ".join(f"{k} {v}" for k, v in io.items()))
    if reply.get("pcap"):
        lines.append(f"  capture: {reply['pcap']}  keys: {reply.get('keyfile')}"
                     + (f", {reply['ike_keyfile']}" if reply.get("ike_keyfile") else ""))
    if reply.get("drops"):
        lines.append("  drops: " + ", ".join(f"{k} {v}" for k, v in sorted(reply["drops"].items())))
    group = reply.get("ha_group")
    if group:
        lines.append(f"  ha group: {group.get('state')}"
                     f"{' (serving)' if group.get('serving') else ''}, identity "
                     f"{group.get('identity')}, warm copy {group.get('warm_keys')} keys at "
                     f"revision {group.get('revision')}, watch reconnects "
                     f"{group.get('watch_reconnects')}")
    if reply.get("workers"):
        lines += render_workers(reply["workers"])
    node = {k: v for k, v in (reply.get("node") or {}).items() if k not in ("timeline", "ike")}
    wall = reply.get("clock", {}).get("wall")
    offset = wall - now if isinstance(wall, (int, float)) and isinstance(now, (int, float)) \
        else None
    lines += _render_tree(node, indent=2, now=now, offset=offset)
    if (reply.get("node") or {}).get("ike") is not None:
        lines += render_ike(reply["node"]["ike"], now)
    timeline = reply.get("timeline") or []
    if timeline:
        from mipsec.node.timeline import format_timeline
        lines.append("  last handover timeline:")
        lines += ["    " + line for line in format_timeline(last_handover(timeline),
                                                         omit=("identification",))]
    return "\n".join(lines)


def render_workers(workers: dict[str, Any]) -> list[str]:
    """A GW's worker processes (docs/operations.md §1.3): totals, then one line each."""
    totals = workers.get("totals", {})
    lines = [f"  workers: {workers.get('count')}, " + ", ".join(
        f"{k} {v}" for k, v in totals.items())]
    if workers.get("drops"):
        lines.append("    drops: " + ", ".join(f"{k} {v}"
                                               for k, v in sorted(workers["drops"].items())))
    for row in workers.get("workers", []):
        age = row.get("report_age_s")
        lines.append(
            f"    worker {row.get('index')}: pid {row.get('pid')} "
            f"{'alive' if row.get('alive') else 'DEAD'}, report "
            f"{'never' if age is None else f'{age:.1f} s ago'}, {row.get('mobiles', 0)} MNs, "
            f"up {row.get('packets_up', 0)}, down {row.get('packets_down', 0)}, hand-offs "
            f"{row.get('handoffs_out', 0)} out / {row.get('handoffs_in', 0)} in; inbound SPIs "
            f"{' '.join(row.get('inbound_spis', [])) or '-'}; outbound SPIs "
            f"{' '.join(row.get('outbound_spis', [])) or '-'}")
    return lines


def render_ike(ike: dict[str, Any], now: float | None) -> list[str]:
    """The IKE SAs: SPIs, state, peer, addresses, age, children (SPIs, transform), last re-key."""
    def ago(t: Any) -> str:
        return f"{now - t:.1f} s ago" if isinstance(t, (int, float)) and now is not None else "never"
    sas = ike.get("ike_sas") or []
    lines = [f"  IKE SAs: {len(sas)}; last re-key {ago(ike.get('last_rekey_time'))}"]
    for sa in sas:
        lines.append(f"    IKE {sa.get('spi_i')}_i {sa.get('spi_r')}_r  {sa.get('state')}  "
                     f"{'initiator' if sa.get('initiator') else 'responder'}  peer "
                     f"{sa.get('peer_id')}  {sa.get('local')} -> {sa.get('remote')}"
                     f"{'  MOBIKE' if sa.get('mobike') else ''}"
                     f"{'  NAT-T' if sa.get('nat_local') or sa.get('nat_remote') else ''}"
                     f"  established {ago(sa.get('established_time'))}")
        for ch in sa.get("children") or []:
            transform = ch.get("encryption", "?") + (f"+{ch['integrity']}" if ch.get("integrity")
                                                      else "")
            lines.append(f"      child in {ch.get('spi_in')} out {ch.get('spi_out')}  "
                         f"{transform}/{ch.get('key_bits')}"
                         f"{'  in UDP 4500' if ch.get('udp_encap') else ''}  "
                         f"{','.join(ch.get('local_ts') or [])} <-> "
                         f"{','.join(ch.get('remote_ts') or [])}")
    if ike.get("drops"):
        lines.append("    IKE drops: " + ", ".join(f"{k} {v}" for k, v in
                                                     sorted(ike["drops"].items())))
    return lines


def last_handover(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events from the last ``coa-changed`` (or the last ten) on."""
    starts = [i for i, ev in enumerate(timeline) if ev.get("kind") in ("coa-changed",
                                                                         "rrq-accepted")]
    return timeline[starts[-1]:] if starts else timeline[-10:]


def _is_sa(value: Any) -> bool:
    return isinstance(value, dict) and {"spi", "direction", "counters"} <= set(value)


def render_sa(sa: dict[str, Any], now: float | None) -> list[str]:
    """Two lines per SA: addressing and transform, then counters, drops, last authenticated."""
    c = sa.get("counters") or {}
    src, dst = ((sa.get("remote"), sa.get("local")) if sa.get("direction") == "inbound"
                else (sa.get("local"), sa.get("remote")))
    transform = sa.get("encryption") or "?"
    if sa.get("integrity"):
        transform += "+" + sa["integrity"]
    if sa.get("udp_encap"):
        transform += " in UDP 4500"
    flags = [f for f in ("needs_rekey", "expired") if sa.get(f)]
    window = sa.get("replay_window") or {}
    # Outbound: the last sequence number sent; inbound: the highest authenticated one and the
    # anti-replay window size (RFC 4303 §3.4.3).
    sequence = (f"highest seq {window.get('top')} (window {window.get('size')})"
                if sa.get("direction") == "inbound" and window else f"seq {sa.get('sequence')}")
    if sa.get("esn"):
        sequence += " ESN"
    first = (f"SA {sa['spi']} {sa.get('direction', ''):<8} {src} -> {dst}  {transform}  "
             f"{sequence}" + (f"  [{', '.join(flags)}]" if flags else ""))
    drops = c.get("drops") or {}
    last = c.get("last_authenticated_time")
    when = (f"{now - last:.1f} s ago" if isinstance(last, (int, float)) and now is not None
            else "never")
    second = (f"  packets {c.get('packets', 0)}, octets {c.get('octets', 0)}, drops "
              + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none")
              + (f"; last authenticated {when} from {c.get('last_authenticated_source')}"
                 if sa.get("direction") == "inbound" else ""))
    return [first, second]


def _render_tree(value: Any, indent: int, now: float | None,
                 offset: float | None = None) -> list[str]:
    pad = " " * indent
    out = []
    if _is_sa(value):
        return [pad + line for line in render_sa(value, now)]
    if isinstance(value, dict):
        for key, item in value.items():
            if _is_sa(item):
                out += [pad + line for line in render_sa(item, now)]
            elif isinstance(item, (dict, list)) and item:
                out.append(f"{pad}{key}:")
                out += _render_tree(item, indent + 2, now, offset)
            else:
                out.append(f"{pad}{key}: {_fmt(key, item, now, offset)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                flat = all(not isinstance(v, (dict, list)) for v in item.values())
                if flat:
                    out.append(pad + "- " + ", ".join(f"{k}={_fmt(k, v, now, offset)}"
                                                      for k, v in item.items()))
                else:
                    sub = _render_tree(item, indent + 2, now, offset)
                    if sub:
                        sub[0] = pad + "- " + sub[0].lstrip()
                    out += sub
            else:
                out.append(f"{pad}- {item}")
    else:
        out.append(f"{pad}{value}")
    return out


def _fmt(key: str, value: Any, now: float | None, offset: float | None = None) -> str:
    """A status value: SPIs in hex; loop-clock times (monotonic) as UTC wall-clock times with
    how long ago / how soon, when the reply carries both clocks (``offset`` = wall - monotonic)."""
    if isinstance(value, int) and "spi" in str(key).lower():
        return f"0x{value:08x}"
    name = str(key).lower()
    if isinstance(value, float) and now is not None and value > 0:
        if "expires" in name or "until" in name:
            return f"{_wall(value, offset)} (in {value - now:.1f} s)"
        if "time" in name:
            return f"{_wall(value, offset)} ({now - value:.1f} s ago)"
    return str(value)


def _wall(monotonic: float, offset: float | None) -> str:
    if offset is None:
        return f"{monotonic:.3f}"
    import datetime
    moment = datetime.datetime.fromtimestamp(monotonic + offset, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
