"""`mipsec lab ...`: the network-namespace lab's sub-commands (mipsec.lab): up, handover, home,
down, status and demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mipsec.cli.common import Formatter, quiet_pipe, sa_options, sa_options_problem
from mipsec.cli.status_text import render_status


def add_lab_parser(sub: Any) -> None:
    """The `lab` command and its sub-commands, on the top-level sub-parsers."""
    lab = sub.add_parser("lab", help="the network-namespace lab (root)", formatter_class=Formatter,
                         description="Build the whole topology in network namespaces (home switch with CN,\n"
                         "HA and GW inside; GW outside; an Internet router; visited networks a and b;\n"
                         "the MN with one interface in each and one at home), start the three daemons\n"
                         "from generated configs, move the MN, and remove it all again.")
    labsub = lab.add_subparsers(dest="lab_command", metavar="LABCOMMAND", required=True)

    def lab_parser(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        lp = labsub.add_parser(name, help=help_text, description=description,
                               formatter_class=Formatter)
        lp.add_argument("--prefix", default="mipsec-",
                        help="namespace name prefix (default 'mipsec-'; tests use a unique one)")
        return lp

    lp = lab_parser("up", "build the lab, start the daemons, attach the MN to network a",
                    "Build the namespaces and links, write configs with fresh keys into\n"
                    "/run/mipsec-lab/<prefix>/, start ha, gw and mn, attach the MN to visited\n"
                    "network a and wait for its registration.  The GW writes gw.pcap and the key\n"
                    "file gw.pcap.esp_sa there.")
    lp.add_argument("--delay-ms", type=float, default=0.0,
                    help="one-way Internet delay, emulated by a forwarder in the router namespace")
    lp.add_argument("--at", default="a", choices=("a", "b", "n", "home"),
                    help="where the MNs start (n: behind the NAT, needs --nat)")
    lp.add_argument("--mobiles", type=int, default=1, metavar="N",
                    help="number of mobile nodes, each in its own namespace (mn1 ... mnN; "
                         "default 1: mn)")
    lp.add_argument("--nat", action="store_true",
                    help="add visited network n: a private network behind the router's NAT "
                         "(nftables masquerade; the MNs there share one public address)")
    lp.add_argument("--gateways", type=int, default=1, metavar="N",
                    help="a GW pool of N GWs (gw, gw2 ...; IKEv2, no --delay-ms): each MN has "
                         "an ordered GW list, their first GWs spread over the pool (default 1)")
    lp.add_argument("--gw-workers", type=int, default=0, metavar="N",
                    help="the GWs' data-plane worker processes ([daemon] workers; default 0: "
                         "one process)")
    lp.add_argument("--ha-standbys", type=int, default=0, metavar="K",
                    help="K standby HAs (ha2 ...) beside ha, one active by election through a "
                         "3-member etcd cluster the lab starts (needs etcd; default 0: one HA, "
                         "no etcd)")
    lp.add_argument("--encryption", default=None,
                    choices=("ENCR_AES_GCM_16", "ENCR_CHACHA20_POLY1305", "ENCR_AES_CBC"),
                    help="ESP transform (default ENCR_AES_GCM_16 with IKEv2, ENCR_AES_CBC with "
                         "--manual-keys; manual keys with an AEAD transform are refused)")
    lp.add_argument("--udp-encap", action="store_true", help="UDP-encapsulated ESP")
    sa_options(lp)
    lp.set_defaults(func=_cmd_lab_up)
    lp = lab_parser("handover", "move the MN to visited network a or b",
                    "Move the MN: remove its other addresses (break-before-make; with\n"
                    "--make-before-break only after the registration), attach it to the visited\n"
                    "network and wait for the registration; prints the timeline.")
    lp.add_argument("where", nargs="?", default=None, choices=("a", "b", "n"),
                    help="target network (default: the other one of a and b; n: behind the NAT)")
    _mobile_option(lp)
    lp.add_argument("--make-before-break", action="store_true",
                    help="keep the old care-of address until the registration is done")
    lp.set_defaults(func=_cmd_lab_move)
    lp = lab_parser("home", "bring the MN back to its home link",
                    "Remove the care-of addresses and put the home address on the MN's home link;\n"
                    "the MN deregisters directly with the HA.")
    _mobile_option(lp)
    lp.set_defaults(func=_cmd_lab_move, where="home")
    lp = lab_parser("down", "remove every namespace, TUN device and process of the lab",
                    "Kill the daemons named by the pid files, then every process left in a\n"
                    "namespace with the prefix, delete those namespaces and the state directory.\n"
                    "Works after a crash and when nothing is there.")
    lp.set_defaults(func=_cmd_lab_down)
    lp = lab_parser("status", "show the three daemons' state",
                    "Print `mipsec status` of the HA, the GW and each MN of this lab.")
    lp.add_argument("--json", action="store_true", help="raw JSON")
    lp.add_argument("--mobile", type=int, default=None, metavar="K",
                    help="of the MNs, only MN K (default: every MN)")
    lp.set_defaults(func=_cmd_lab_status)
    lp = lab_parser("demo", "up, a stream across two handovers and a return home, down",
                    "Build the lab, run a UDP stream CN <-> MN home address (both directions),\n"
                    "move the MN a -> b -> a -> home, print each handover's timeline with the\n"
                    "interruption and loss per direction, keep the GW capture, tear down.")
    lp.add_argument("--delay-ms", type=float, default=10.0, help="one-way Internet delay (10)")
    lp.add_argument("--rate", type=float, default=200.0, help="stream packets/s per direction")
    lp.add_argument("--dwell", type=float, default=2.0, help="seconds between moves")
    lp.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    lp.add_argument("--plot", metavar="DIR", default=None,
                    help="write a sequence chart per move and the packet arrivals (PNG) to DIR")
    sa_options(lp)
    lp.set_defaults(func=_cmd_lab_demo)


def _mobile_option(lp: argparse.ArgumentParser) -> None:
    lp.add_argument("--mobile", type=int, default=1, metavar="K",
                    help="which MN of a lab with several (1-based; default 1)")



def _lab(args: argparse.Namespace):
    from mipsec.lab.lab import Lab
    return Lab(prefix=args.prefix)


def _lab_guard() -> str | None:
    from mipsec.lab.lab import requirements_problem
    return requirements_problem()


def _cmd_lab_up(args: argparse.Namespace) -> int:
    problem = sa_options_problem(args) or _lab_guard()
    if problem:
        print(f"mipsec lab up: {problem}", file=sys.stderr)
        return 1
    if args.at == "n" and not args.nat:
        print("mipsec lab up: --at n needs --nat", file=sys.stderr)
        return 2
    lab = _lab(args)
    lab.up(delay_ms=args.delay_ms, place=args.at, encryption=args.encryption,
           udp_encap=args.udp_encap, sa_source="manual" if args.manual_keys else "ikev2",
           handover_mode=args.handover_mode, mobiles=args.mobiles, nat=args.nat,
           gateways=args.gateways, ha_standbys=args.ha_standbys, gw_workers=args.gw_workers)
    who = "MN" if args.mobiles == 1 else f"{args.mobiles} MNs"
    if args.gateways > 1:
        who += f" over {args.gateways} GWs"
    if args.ha_standbys:
        who += f", HA group {', '.join(lab.has)} (active: {lab.active_ha()})"
    print(f"lab {args.prefix} up: state in {lab.state_dir}; {who} at {args.at}; "
          f"capture {lab.pcap} (keys {lab.keyfile})")
    return 0


def _cmd_lab_move(args: argparse.Namespace) -> int:
    from mipsec.lab.demo import print_timeline
    lab = _lab(args)
    k = args.mobile
    lab.mn(k)                        # an unknown MN number is refused before anything moves
    where = args.where
    if where is None:
        where = "b" if lab.place(k) == "a" else "a"
    result = lab.move(where, make_before_break=getattr(args, "make_before_break", False), k=k)
    who = "MN" if lab.mobiles == 1 else lab.mn(k)
    print(f"{who} moved to {where}; it noticed after "
          f"{(result['noticed'] - result['time']) * 1000:.1f} ms, registration done "
          f"{(result['registered'] - result['noticed']) * 1000:.1f} ms later "
          f"(times below: ms after the move started)")
    print_timeline(lab.timelines(result["time"] - 0.001), result["time"], sys.stdout)
    return 0


def _cmd_lab_down(args: argparse.Namespace) -> int:
    from mipsec.lab.lab import Lab
    removed = Lab(prefix=args.prefix).down()
    print(f"lab {args.prefix} down" + (f": removed {', '.join(removed)}" if removed else
                                       ": nothing was left"))
    return 0


def _cmd_lab_status(args: argparse.Namespace) -> int:
    quiet_pipe()
    lab = _lab(args)
    roles = lab.daemons if args.mobile is None else ("ha", "gw", lab.mn(args.mobile))
    replies = {}
    for role in roles:
        try:
            replies[role] = lab.status(role)
        except (OSError, ValueError) as exc:
            replies[role] = {"ok": False, "error": f"not reachable: {exc}"}
    if args.json:
        print(json.dumps(replies, indent=2, default=str))
    else:
        for role, reply in replies.items():
            print(render_status(reply) if reply.get("ok") else f"{role}: {reply.get('error')}")
            print()
    return 0 if all(r.get("ok") for r in replies.values()) else 1


def _cmd_lab_demo(args: argparse.Namespace) -> int:
    problem = sa_options_problem(args) or _lab_guard()
    if problem:
        print(f"mipsec lab demo: {problem}", file=sys.stderr)
        return 1
    from mipsec.lab.demo import run_lab_demo
    return run_lab_demo(prefix=args.prefix, delay_ms=args.delay_ms, rate=args.rate,
                        dwell_s=args.dwell, keep=args.keep,
                        sa_source="manual" if args.manual_keys else "ikev2",
                        handover_mode=args.handover_mode, plot_dir=args.plot)
