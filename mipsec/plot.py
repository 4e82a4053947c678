"""Pictures of a handover (matplotlib, the ``plot`` extra): a sequence chart of the merged
MN / GW / HA timeline and the packet arrivals per direction around each move.

``sequence_chart(events, path, t0)``: one vertical lane per node (MN, GW, HA; the CN's lane
too when the events name it), the events in order downwards with their times in ms after ``t0``; every
timeline event is a dot on its lane with its kind, and the messages the events imply are arrows
from the sending lane to the receiving one, labelled with the message and its one-way time
(RRQ MN -> GW -> HA, the SIU HA -> GW, the RRP GW -> MN, MOBIKE's UPDATE_SA_ADDRESSES MN -> GW
...), drawn like a patent's message sequence figure.

``arrivals_plot(streams, moves, path)``: one panel per move, packet sequence number against
arrival time (ms after the move) for each direction; a gap in a line is the interruption.

Inputs are plain data: events are ``TimelineEvent`` objects or their JSON form (dicts with
``time``, ``node``, ``kind``, ``detail``); streams are ``{direction: [(seq, arrival_time)]}``.
Nothing here reads a clock or touches the network.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# (label, kind at the sender, kind at the receiver): a message leaves with the first event and
# is received with the next second event after it (docs/design.md "Timeline kinds").
MESSAGES = (
    ("RRQ", "rrq-sent", "rrq-forwarded"),
    ("RRQ", "rrq-forwarded", "rrq-accepted"),
    ("RRQ", "rrq-retransmitted", "rrq-forwarded"),
    ("SIU + RRP", "siu-sent", "gw-sa-repointed"),
    ("SIU + RRP", "siu-sent", "gw-siu-confirms-mobike"),
    ("SIU", "siu-sent", "siu-refused"),
    ("RRP", "rrp-forwarded", "rrp-received"),
    ("RRP", "rrq-rejected", "rrp-received"),
    ("UPDATE_SA_ADDRESSES", "mobike-update-sent", "gw-sa-moved-by-mobike"),
    ("IKE_SA_INIT / IKE_AUTH", "ike-initiated", "gw-sas-installed"),
    ("first ESP", "gw-sa-repointed", "first-downlink-at-new-coa"),
    ("first ESP", "gw-sa-moved-by-mobike", "first-downlink-at-new-coa"),
)
LANES = ("cn", "mn", "gw", "ha")
MESSAGE_WINDOW_S = 5.0          # a receive event further than this after the send is not its


def lane_of(node: str) -> str | None:
    """The lane of a node name ("mn", "mn1", "gw", "ha:..." ...)."""
    name = node.lower()
    for lane in LANES:
        if name.startswith(lane):
            return lane
    return None


def _plain(event: Any) -> tuple[float, str, str, dict]:
    if isinstance(event, dict):
        return (float(event["time"]), str(event.get("node", "")), str(event["kind"]),
                dict(event.get("detail") or {}))
    return float(event.time), event.node, event.kind, dict(event.detail)


def messages(events: Sequence[tuple[float, str, str, dict]]) -> list[tuple[str, int, int]]:
    """(label, index of the send event, index of the receive event) for every message."""
    out = []
    used_receives: set[int] = set()
    for label, send_kind, recv_kind in MESSAGES:
        for i, (t, node, kind, _d) in enumerate(events):
            if kind != send_kind:
                continue
            for j in range(i + 1, len(events)):
                tj, node_j, kind_j, _dj = events[j]
                if tj - t > MESSAGE_WINDOW_S:
                    break
                if kind_j == recv_kind and j not in used_receives \
                        and lane_of(node_j) != lane_of(node):
                    out.append((label, i, j))
                    used_receives.add(j)
                    break
    return out


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def sequence_chart(events: Iterable[Any], path: str, t0: float | None = None,
                   title: str = "") -> str:
    """Write the sequence chart of ``events`` to ``path`` (PNG); returns ``path``."""
    evs = sorted((_plain(e) for e in events), key=lambda e: e[0])
    evs = [e for e in evs if lane_of(e[1]) is not None]
    if t0 is None:
        t0 = evs[0][0] if evs else 0.0
    lanes = [lane for lane in LANES if any(lane_of(e[1]) == lane for e in evs)] or ["mn", "gw",
                                                                                   "ha"]
    x = {lane: i for i, lane in enumerate(lanes)}
    ms = [(e[0] - t0) * 1000 for e in evs]
    plt = _pyplot()
    height = max(4.0, min(14.0, 1.5 + 0.42 * len(evs)))
    fig, ax = plt.subplots(figsize=(2.6 * len(lanes) + 3.5, height))
    # events in order, evenly spaced (a message sequence chart): a slow step elsewhere must not
    # squeeze the rest together; the times are in the labels
    ys = [float(i) for i in range(len(evs))]
    lo, hi = -1.0, max(1.0, len(evs) + 0.0)
    for lane in lanes:
        ax.plot([x[lane], x[lane]], [lo + 0.4, hi], color="0.6", lw=1.2, zorder=1)
        ax.text(x[lane], lo, lane.upper(), ha="center", va="center", fontsize=11,
                fontweight="bold", bbox=dict(boxstyle="round", fc="0.92", ec="0.5"))
    # the column of each node's lane (every event left in evs has one)
    column = {e[1]: x[name] for e in evs if (name := lane_of(e[1])) is not None}
    for (_t, node, kind, _d), y, m in zip(evs, ys, ms, strict=True):
        lx = column[node]
        ax.plot([lx], [y], "o", ms=4, color="black", zorder=3)
        right = lx >= len(lanes) - 1
        ax.text(lx + (-0.06 if right else 0.06), y, f"{kind}  {m:.1f} ms", fontsize=7,
                ha="right" if right else "left", va="center", zorder=4)
    for k, (label, i, j) in enumerate(sorted(messages(evs), key=lambda m: m[1])):
        xi, xj = column[evs[i][1]], column[evs[j][1]]
        ax.annotate("", xy=(xj, ys[j]), xytext=(xi, ys[i]), zorder=2,
                    arrowprops=dict(arrowstyle="-|>", color="tab:blue", lw=1.3))
        f = (0.35, 0.5, 0.65)[k % 3]         # labels of neighbouring arrows do not overlap
        ax.text(xi + f * (xj - xi), ys[i] + f * (ys[j] - ys[i]),
                f"{label}\n{(evs[j][0] - evs[i][0]) * 1000:.1f} ms",
                fontsize=7, color="tab:blue", ha="center", va="bottom", rotation=0, zorder=4,
                bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))
    ax.set_ylim(hi, lo - 0.6)
    ax.set_xlim(-0.7, len(lanes) - 0.3)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel("events in order (times: ms after the move)")
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def arrivals_plot(streams: Mapping[str, Sequence[tuple[int, float]]],
                  moves: Sequence[tuple[float, str]], path: str, before_s: float = 0.1,
                  after_s: float = 0.2, title: str = "") -> str:
    """Packet arrivals around each move (``moves``: (time, label)): one row per direction, one
    column per move, sequence number against ms after the move; PNG."""
    plt = _pyplot()
    cols = max(1, len(moves))
    rows = max(1, len(streams))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows + 0.6), squeeze=False,
                             sharex=True)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for r, (direction, arrivals) in enumerate(streams.items() or [("", [])]):
        for k, (at, label) in enumerate(moves or [(0.0, "")]):
            ax = axes[r][k]
            pts = [(s, (t - at) * 1000) for s, t in arrivals if -before_s <= t - at <= after_s]
            if pts:
                seq0 = min(s for s, _ in pts)
                ax.plot([m for _, m in pts], [s - seq0 for s, _ in pts], ".", ms=2.5,
                        color=colors[r % len(colors)])
            ax.axvline(0, color="0.5", lw=0.8)
            if r == 0:
                ax.set_title(label, fontsize=9)
            if r == rows - 1:
                ax.set_xlabel("ms after the move")
            if k == 0:
                ax.set_ylabel(f"{direction}\npacket number", fontsize=8)
            ax.set_xlim(-before_s * 1000, after_s * 1000)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig: Any, path: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)


def write_demo_plots(directory: str, moves: Sequence[tuple[float, str]],
                     timelines: Sequence[Iterable[Any]],
                     streams: Mapping[str, Sequence[tuple[int, float]]], label: str) -> list[str]:
    """The demo's pictures: ``handover-K-sequence.png`` per move (its events, times after the
    move) and ``arrivals.png``; returns the paths written."""
    paths = []
    for k, ((at, title), events) in enumerate(zip(moves, timelines, strict=True), start=1):
        paths.append(sequence_chart(events, os.path.join(directory, f"handover-{k}-sequence.png"),
                                    t0=at, title=f"{title} ({label})"))
    paths.append(arrivals_plot(streams, moves, os.path.join(directory, "arrivals.png"),
                               title=f"packet arrivals around each move ({label})"))
    return paths
