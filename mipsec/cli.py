"""The ``mipsec`` command line (docs/operations.md is the user guide)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from mipsec import __version__

DESCRIPTION = """\
mipsec: a userspace IPsec ESP + Mobile IPv4 stack over Linux TUN devices.

It runs the three roles of a roaming VPN as daemons: the mobile node (mn), the VPN gateway (gw)
and the home agent (ha).  When the MN's care-of address changes, its Registration Request crosses
the GW's wildcard-source SA and the HA's Security Information Update re-points the GW's SA before
the Registration Reply goes back: one signalling round trip, no key exchange."""

EPILOG = """\
examples:
  mipsec demo                       live handovers in network namespaces (root), else simulated
  mipsec keys --out /etc/mipsec --mobiles 2
  mipsec gw --config /etc/mipsec/gw.toml
  mipsec status --role gw --json
  mipsec lab up --prefix t1- --delay-ms 20 && mipsec lab handover b --prefix t1-

User guide: docs/operations.md."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _add_daemon(sub: Any, role: str, title: str, detail: str) -> None:
    p = sub.add_parser(role, help=f"run the {title} daemon (foreground)", formatter_class=_Formatter,
                       description=f"Run the {title} in the foreground.\n\n{detail}\n\n"
                       "Logs go to stderr.  SIGTERM or SIGINT stop it cleanly: it removes the TUN\n"
                       "device, the routes, rules and proxy-ARP entries it added, its sockets and\n"
                       "its control socket.  A bad configuration stops it at start-up with one\n"
                       "message naming the file, the key and the problem (exit status 2).")
    p.add_argument("--config", "-c", required=True, metavar="FILE.toml",
                   help=f"TOML configuration with role = \"{role}\" (see `mipsec keys`)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="override [daemon] log_level")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="override [daemon] log_format (json: one object per line)")
    p.set_defaults(func=_cmd_daemon, role=role)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mipsec", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"mipsec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_daemon(sub, "mn", "mobile node",
                "Watches the [daemon] interfaces through netlink: a new IPv4 address there is a new\n"
                "care-of address and starts a handover (re-point the SAs, register through the\n"
                "tunnel); an address in the home prefix means it is home (deregister).  While away\n"
                "the home address lives on the TUN device and the home network is routed into it.")
    _add_daemon(sub, "gw", "VPN gateway",
                "Terminates each MN's ESP tunnel (wildcard-source inbound SA), forwards the inner\n"
                "packets into the home network, protects home-side traffic for care-of addresses\n"
                "(policy routing from the inside interface into its TUN) and re-points an MN's\n"
                "outbound SA only on an authenticated Security Information Update from its HA.")
    _add_daemon(sub, "ha", "home agent",
                "Accepts Registration Requests (UDP 434), keeps the binding cache, sends the\n"
                "Security Information Update with the Registration Reply to the GW, intercepts\n"
                "packets for home addresses of MNs away (proxy ARP) and tunnels them (IP-in-IP).")

    p = sub.add_parser("status", help="show a running daemon's SAs, bindings, drops and timeline",
                       formatter_class=_Formatter,
                       description="Ask a running daemon over its control socket and print its state:\n"
                       "SAs (addresses, SPIs, counters, drops by reason, time and source of the last\n"
                       "authenticated packet), bindings with lifetimes, the last handover's timeline.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-s", metavar="PATH", help="control socket path")
    where.add_argument("--role", choices=("mn", "gw", "ha"),
                       help="use the default socket /run/mipsec/<role>.sock")
    where.add_argument("--instance", "-i", metavar="NAME",
                       help="one of several daemons on this machine: /run/mipsec/NAME.sock "
                            "(the names `mipsec keys` gives: ha, gw, mn1, mn2 ...)")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.add_argument("--watch", "-w", nargs="?", type=float, const=1.0, metavar="SECONDS",
                   help="redraw every SECONDS (1) until Ctrl-C")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("reload", help="make a running daemon re-read its configuration file",
                       formatter_class=_Formatter,
                       description="Like SIGHUP: the daemon re-reads its file and applies what changed,\n"
                       "and only that (an MN added, removed or re-keyed at the GW and the HA, a\n"
                       "lifetime, the log level).  A file that does not load, or a change that\n"
                       "needs a restart (addresses, interfaces, the TUN ...), is refused with its\n"
                       "message and the running configuration stays (exit status 1).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-s", metavar="PATH", help="control socket path")
    where.add_argument("--role", choices=("mn", "gw", "ha"),
                       help="use the default socket /run/mipsec/<role>.sock")
    where.add_argument("--instance", "-i", metavar="NAME", help="/run/mipsec/NAME.sock")
    p.set_defaults(func=_cmd_reload)

    p = sub.add_parser("install-units", help="write systemd units for this installation",
                       formatter_class=_Formatter,
                       description="Write mipsec-mn@.service, mipsec-gw@.service and mipsec-ha@.service\n"
                       "whose ExecStart runs this Python with -m mipsec (the venv's, on Debian 12),\n"
                       "one instance per /etc/mipsec/<instance>.toml.  Then: systemctl daemon-reload;\n"
                       "systemctl enable --now mipsec-gw@gw.")
    p.add_argument("--dir", default="/etc/systemd/system", help="where (/etc/systemd/system)")
    p.add_argument("--config-dir", default="/etc/mipsec", help="the configuration files (/etc/mipsec)")
    p.set_defaults(func=_cmd_install_units)

    p = sub.add_parser("check", help="check a set of configuration files against each other",
                       formatter_class=_Formatter,
                       description="Load each file as its daemon would, then compare what must agree\n"
                       "between the machines: keys and SPIs (ESP, MN-HA, HA-GW), IKE PSKs and\n"
                       "identities, addresses and prefixes, one GW and one HA per MN.  Each\n"
                       "mismatch names both files and both keys (keys themselves are never\n"
                       "printed).  Exit status 0 when they agree, 2 otherwise.")
    p.add_argument("files", nargs="+", metavar="FILE.toml", help="ha.toml gw.toml mn*.toml ...")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("handover", help="tell a running MN daemon it has a new care-of address",
                       formatter_class=_Formatter,
                       description="Trigger a handover by hand (the MN daemon normally sees the new\n"
                       "address through netlink by itself).  `home` instead of an address: the MN is\n"
                       "back on its home link and deregisters.")
    p.add_argument("care_of", metavar="COA|home", help="the new care-of address, or 'home'")
    p.add_argument("--interface", "-i", help="the interface that address is on")
    p.add_argument("--socket", "-s", metavar="PATH", help="control socket (default: MN's default)")
    p.set_defaults(func=_cmd_handover)

    p = sub.add_parser("keys", help="write a matching set of config files with fresh keys",
                       formatter_class=_Formatter,
                       description="Write ha.toml, gw.toml and one file per MN (mn.toml, or mn1.toml ...\n"
                       "with --mobiles > 1) on the docs/design.md addressing plan, with fresh random\n"
                       "MN-HA and HA-GW keys and one IKEv2 PSK per MN (the MN and the GW negotiate\n"
                       "their ESP SAs), or with --manual-keys fixed ESP keys (AES-CBC + HMAC; AEAD\n"
                       "transforms are refused with manual keys: docs/security.md).  Files are mode\n"
                       "0600; existing files are not overwritten without --force.  Edit addresses\n"
                       "and interface names for your machines (docs/operations.md).")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    p.add_argument("--mobiles", "-n", type=int, default=1, metavar="N", help="number of MNs (1)")
    p.add_argument("--encryption", default=None,
                   choices=("ENCR_AES_GCM_16", "ENCR_CHACHA20_POLY1305", "ENCR_AES_CBC", "ENCR_NULL"),
                   help="ESP encryption transform (IANA name; default ENCR_AES_GCM_16 with "
                        "IKEv2, ENCR_AES_CBC with --manual-keys)")
    p.add_argument("--integrity", default=None,
                   choices=("AUTH_HMAC_SHA1_96", "AUTH_HMAC_SHA2_256_128", "AUTH_HMAC_SHA2_384_192",
                            "AUTH_HMAC_SHA2_512_256"),
                   help="ESP integrity for non-AEAD encryption (default AUTH_HMAC_SHA2_256_128)")
    p.add_argument("--udp-encap", action="store_true", help="UDP-encapsulated ESP (RFC 3948)")
    keysrc = p.add_mutually_exclusive_group()
    keysrc.add_argument("--ikev2", action="store_true",
                        help="no ESP keys: the MN and the GW negotiate them with IKEv2 (a PSK "
                             "per MN); the default")
    keysrc.add_argument("--manual-keys", action="store_true",
                        help="fixed ESP keys in the files instead of IKEv2 (no AEAD transform; "
                             "sequence numbers are kept across restarts, docs/security.md)")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing files in --out (by default they are left alone)")
    p.add_argument("--handover-mode", default="siu", choices=("siu", "mobike"),
                   help="siu (the HA's SIU moves the GW's SA) or mobike (also RFC 4555 "
                        "UPDATE_SA_ADDRESSES; needs --ikev2)")
    p.add_argument("--msa-algorithm", default="hmac-md5", choices=("hmac-md5", "hmac-sha256"),
                   help="MN-HA authenticator (RFC 5944 default hmac-md5)")
    p.add_argument("--run-dir", default="/run/mipsec", help="where control sockets go")
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser("demo", help="run the handover demo (lab as root, else the simulator)",
                       formatter_class=_Formatter,
                       description="As root with network namespaces: `mipsec lab demo` (real daemons,\n"
                       "TUN devices, a UDP stream across two handovers and a return home).  Otherwise\n"
                       "it says so and runs the same scenario in mipsec's in-memory network.")
    p.add_argument("--sim", action="store_true", help="always use the in-memory simulator")
    p.add_argument("--delay-ms", type=float, default=None,
                   help="one-way Internet delay (default 10 in the lab, 20 in the simulator)")
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="write a sequence chart per move and the packet arrivals (PNG) to DIR")
    _sa_options(p)
    p.set_defaults(func=_cmd_demo)

    lab = sub.add_parser("lab", help="the network-namespace lab (root)", formatter_class=_Formatter,
                         description="Build the whole topology in network namespaces (home switch with CN,\n"
                         "HA and GW inside; GW outside; an Internet router; visited networks a and b;\n"
                         "the MN with one interface in each and one at home), start the three daemons\n"
                         "from generated configs, move the MN, and remove it all again.")
    labsub = lab.add_subparsers(dest="lab_command", metavar="LABCOMMAND", required=True)

    def lab_parser(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        lp = labsub.add_parser(name, help=help_text, description=description,
                               formatter_class=_Formatter)
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
    lp.add_argument("--ha-standbys", type=int, default=0, metavar="K",
                    help="K standby HAs (ha2 ...) beside ha, one active by election through a "
                         "3-member etcd cluster the lab starts (needs etcd; default 0: one HA, "
                         "no etcd)")
    lp.add_argument("--encryption", default=None,
                    choices=("ENCR_AES_GCM_16", "ENCR_CHACHA20_POLY1305", "ENCR_AES_CBC"),
                    help="ESP transform (default ENCR_AES_GCM_16 with IKEv2, ENCR_AES_CBC with "
                         "--manual-keys; manual keys with an AEAD transform are refused)")
    lp.add_argument("--udp-encap", action="store_true", help="UDP-encapsulated ESP")
    _sa_options(lp)
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
    _sa_options(lp)
    lp.set_defaults(func=_cmd_lab_demo)
    return parser


def _mobile_option(lp: argparse.ArgumentParser) -> None:
    lp.add_argument("--mobile", type=int, default=1, metavar="K",
                    help="which MN of a lab with several (1-based; default 1)")


def _sa_options(lp: argparse.ArgumentParser) -> None:
    lp.add_argument("--manual-keys", action="store_true",
                    help="ESP keys written into the configs instead of negotiated by IKEv2")
    lp.add_argument("--handover-mode", default="siu", choices=("siu", "mobike"),
                    help="siu (default) or mobike (RFC 4555 as well; IKEv2 only)")


# --- commands ----------------------------------------------------------------------------------

def _cmd_daemon(args: argparse.Namespace) -> int:
    from mipsec.io.daemon import run_daemon
    return run_daemon(args.config, args.role, args.log_level, args.log_format)


def _socket_for(args: argparse.Namespace, role: str | None = None) -> str:
    from mipsec.config import default_socket
    if getattr(args, "socket", None):
        return args.socket
    if getattr(args, "instance", None):
        return default_socket(args.instance)
    return default_socket(getattr(args, "role", None) or role or "mn")


def _quiet_pipe() -> None:
    """`mipsec status | head` ends quietly (only for commands that own nothing to clean up)."""
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _cmd_status(args: argparse.Namespace) -> int:
    from mipsec.io import control
    _quiet_pipe()
    path = _socket_for(args)
    while True:
        try:
            reply = control.request(path, "status")
        except (OSError, ValueError) as exc:
            print(f"mipsec status: cannot reach {path}: {exc}", file=sys.stderr)
            if args.watch is None:
                return 1
            reply = None
        if args.watch is not None:
            sys.stdout.write("\033[H\033[2J")          # home + clear: a live view
        if reply is not None:
            print(json.dumps(reply, indent=2, default=str) if args.json else render_status(reply))
        if args.watch is None:
            return 0 if reply is not None and reply.get("ok") else 1
        sys.stdout.flush()
        try:
            import time
            time.sleep(max(0.1, args.watch))
        except KeyboardInterrupt:
            return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    from mipsec.io import control
    path = _socket_for(args)
    try:
        reply = control.request(path, "reload", timeout=30.0)
    except (OSError, ValueError) as exc:
        print(f"mipsec reload: cannot reach {path}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"mipsec reload: {reply.get('error')}", file=sys.stderr)
        return 1
    print("mipsec reload: " + ("; ".join(reply.get("changes") or []) or "nothing changed"))
    return 0


def _cmd_install_units(args: argparse.Namespace) -> int:
    from mipsec.units import install_units
    try:
        paths = install_units(args.dir, config_dir=args.config_dir)
    except OSError as exc:
        print(f"mipsec install-units: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    print("then: systemctl daemon-reload", file=sys.stderr)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from mipsec.check import check_files
    _quiet_pipe()
    configs, problems = check_files(args.files)
    for problem in problems:
        print(f"mipsec check: {problem}", file=sys.stderr)
    if problems:
        print(f"mipsec check: {len(problems)} problem(s) in {len(args.files)} file(s)",
              file=sys.stderr)
        return 2
    roles = ", ".join(f"{c.role} {c.path}" for c in configs)
    print(f"mipsec check: {len(configs)} file(s) agree ({roles})")
    return 0


def _cmd_handover(args: argparse.Namespace) -> int:
    from mipsec.io import control
    path = _socket_for(args, "mn")
    command = "home" if args.care_of == "home" else f"handover {args.care_of}"
    if args.interface:
        command += f" {args.interface}"
    try:
        reply = control.request(path, command)
    except (OSError, ValueError) as exc:
        print(f"mipsec handover: cannot reach {path}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"mipsec handover: {reply.get('error')}", file=sys.stderr)
        return 1
    print(json.dumps(reply))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from mipsec.config import KeySetLayout, write_key_set
    from mipsec.errors import ConfigError
    from mipsec.lab.lab import IKE_ESP_PROPOSAL
    if args.manual_keys:
        if args.handover_mode != "siu":
            print("mipsec keys: --handover-mode mobike needs IKEv2; drop --manual-keys",
                  file=sys.stderr)
            return 2
        kw: dict[str, Any] = {"encryption": args.encryption or "ENCR_AES_CBC",
                              "integrity": args.integrity, "udp_encap": args.udp_encap}
    else:
        encryption = args.encryption or "ENCR_AES_GCM_16"
        if encryption not in IKE_ESP_PROPOSAL:
            print(f"mipsec keys: IKEv2 negotiates {', '.join(IKE_ESP_PROPOSAL)}, not "
                  f"{encryption} (--manual-keys for fixed keys)", file=sys.stderr)
            return 2
        kw = {"sa_source": "ikev2", "handover_mode": args.handover_mode,
              "ike": {"esp_proposals": (IKE_ESP_PROPOSAL[encryption],),
                      "force_encap": args.udp_encap}}
    try:
        paths = write_key_set(args.out, args.mobiles, KeySetLayout(run_dir=args.run_dir),
                              force=args.force, msa_algorithm=args.msa_algorithm, **kw)
    except ConfigError as exc:
        print(f"mipsec keys: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:      # a file appeared meanwhile, a directory we cannot write ...
        print(f"mipsec keys: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _sa_options_problem(args: argparse.Namespace) -> str | None:
    if args.manual_keys and args.handover_mode == "mobike":
        return "--handover-mode mobike needs IKEv2-negotiated SAs; drop --manual-keys"
    return None


def _cmd_demo(args: argparse.Namespace) -> int:
    from mipsec.lab.lab import requirements_problem
    problem = _sa_options_problem(args)
    if problem:
        print(f"mipsec demo: {problem}", file=sys.stderr)
        return 2
    if not args.sim:
        problem = requirements_problem()
        if problem is None:
            from mipsec.lab.demo import run_lab_demo
            return run_lab_demo(prefix=f"mipsec-demo{os.getpid()}-",
                                delay_ms=10.0 if args.delay_ms is None else args.delay_ms,
                                sa_source="manual" if args.manual_keys else "ikev2",
                                handover_mode=args.handover_mode, plot_dir=args.plot)
        print(f"mipsec demo: {problem}; running the same scenario in the in-memory simulator "
              f"instead (`mipsec demo --sim`).\n", flush=True)
    from mipsec.sim.demo import run_demo
    delay = {} if args.delay_ms is None else {"internet_delay_s": args.delay_ms / 1000}
    return run_demo(sys.stdout, manual_keys=args.manual_keys, handover_mode=args.handover_mode,
                    plot_dir=args.plot, **delay)


def _lab(args: argparse.Namespace):
    from mipsec.lab.lab import Lab
    return Lab(prefix=args.prefix)


def _lab_guard() -> str | None:
    from mipsec.lab.lab import requirements_problem
    return requirements_problem()


def _cmd_lab_up(args: argparse.Namespace) -> int:
    problem = _sa_options_problem(args) or _lab_guard()
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
           gateways=args.gateways, ha_standbys=args.ha_standbys)
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
    _quiet_pipe()
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
    problem = _sa_options_problem(args) or _lab_guard()
    if problem:
        print(f"mipsec lab demo: {problem}", file=sys.stderr)
        return 1
    from mipsec.lab.demo import run_lab_demo
    return run_lab_demo(prefix=args.prefix, delay_ms=args.delay_ms, rate=args.rate,
                        dwell_s=args.dwell, keep=args.keep,
                        sa_source="manual" if args.manual_keys else "ikev2",
                        handover_mode=args.handover_mode, plot_dir=args.plot)


# --- status rendering ------------------------------------------------------------------------------

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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mipsec demo | head`: the reader left; say nothing more (and nothing at exit either).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        from mipsec.lab.topology import LabError
        if isinstance(exc, LabError):
            print(f"mipsec: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
