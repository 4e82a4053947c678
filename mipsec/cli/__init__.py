"""The ``mipsec`` command line (docs/operations.md is the user guide).

The daemons, status, reload, handover, keys, check, install-units and demo are here;
``lab_commands`` has `mipsec lab ...`, ``status_text`` renders `mipsec status`, ``common`` has
what they share."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from mipsec import __version__
from mipsec.cli.common import Formatter, quiet_pipe, sa_options, sa_options_problem
from mipsec.cli.lab_commands import add_lab_parser
from mipsec.cli.status_text import last_handover, render_ike, render_sa, render_status

# ``mipsec.cli`` is the entry point (setup.cfg) and what tests call; the renderers live beside it
__all__ = ["build_parser", "last_handover", "main", "render_ike", "render_sa", "render_status"]

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


def _add_socket_choice(p: argparse.ArgumentParser) -> None:
    """Which running daemon a control command talks to (``_socket_for`` reads the choice)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-s", metavar="PATH", help="control socket path")
    where.add_argument("--role", choices=("mn", "gw", "ha"),
                       help="use the default socket /run/mipsec/<role>.sock")
    where.add_argument("--instance", "-i", metavar="NAME",
                       help="one of several daemons on this machine: /run/mipsec/NAME.sock "
                            "(the names `mipsec keys` gives: ha, gw, mn1, mn2 ...)")


def _add_daemon(sub: Any, role: str, title: str, detail: str) -> None:
    p = sub.add_parser(role, help=f"run the {title} daemon (foreground)", formatter_class=Formatter,
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
                                     formatter_class=Formatter)
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
                       formatter_class=Formatter,
                       description="Ask a running daemon over its control socket and print its state:\n"
                       "SAs (addresses, SPIs, counters, drops by reason, time and source of the last\n"
                       "authenticated packet), bindings with lifetimes, the last handover's timeline.")
    _add_socket_choice(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.add_argument("--watch", "-w", nargs="?", type=float, const=1.0, metavar="SECONDS",
                   help="redraw every SECONDS (1) until Ctrl-C")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("reload", help="make a running daemon re-read its configuration file",
                       formatter_class=Formatter,
                       description="Like SIGHUP: the daemon re-reads its file and applies what changed,\n"
                       "and only that (an MN added, removed or re-keyed at the GW and the HA, a\n"
                       "lifetime, the log level).  A file that does not load, or a change that\n"
                       "needs a restart (addresses, interfaces, the TUN ...), is refused with its\n"
                       "message and the running configuration stays (exit status 1).")
    _add_socket_choice(p)
    p.set_defaults(func=_cmd_reload)

    p = sub.add_parser("memory", help="where a running daemon's memory goes (debugging)",
                       formatter_class=Formatter,
                       description="Ask a running daemon for its memory figures (JSON): RSS, allocated\n"
                       "blocks, and, when it was started with MIPSEC_TRACEMALLOC=<frames> in its\n"
                       "environment, the source lines holding the most and those grown most since\n"
                       "the previous `mipsec memory` (mipsec/io/memory.py).")
    _add_socket_choice(p)
    p.add_argument("--top", type=int, default=15, metavar="N", help="lines of each list (15)")
    p.set_defaults(func=_cmd_memory)

    p = sub.add_parser("install-units", help="write systemd units for this installation",
                       formatter_class=Formatter,
                       description="Write mipsec-mn@.service, mipsec-gw@.service and mipsec-ha@.service\n"
                       "whose ExecStart runs this Python with -m mipsec (the venv's, on Debian 12),\n"
                       "one instance per /etc/mipsec/<instance>.toml.  Then: systemctl daemon-reload;\n"
                       "systemctl enable --now mipsec-gw@gw.")
    p.add_argument("--dir", default="/etc/systemd/system", help="where (/etc/systemd/system)")
    p.add_argument("--config-dir", default="/etc/mipsec", help="the configuration files (/etc/mipsec)")
    p.set_defaults(func=_cmd_install_units)

    p = sub.add_parser("check", help="check a set of configuration files against each other",
                       formatter_class=Formatter,
                       description="Load each file as its daemon would, then compare what must agree\n"
                       "between the machines: keys and SPIs (ESP, MN-HA, HA-GW), IKE PSKs and\n"
                       "identities, addresses and prefixes, one GW and one HA per MN.  Each\n"
                       "mismatch names both files and both keys (keys themselves are never\n"
                       "printed).  Exit status 0 when they agree, 2 otherwise.")
    p.add_argument("files", nargs="+", metavar="FILE.toml", help="ha.toml gw.toml mn*.toml ...")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("handover", help="tell a running MN daemon it has a new care-of address",
                       formatter_class=Formatter,
                       description="Trigger a handover by hand (the MN daemon normally sees the new\n"
                       "address through netlink by itself).  `home` instead of an address: the MN is\n"
                       "back on its home link and deregisters.")
    p.add_argument("care_of", metavar="COA|home", help="the new care-of address, or 'home'")
    p.add_argument("--interface", "-i", help="the interface that address is on")
    p.add_argument("--socket", "-s", metavar="PATH", help="control socket (default: MN's default)")
    p.set_defaults(func=_cmd_handover)

    p = sub.add_parser("keys", help="write a matching set of config files with fresh keys",
                       formatter_class=Formatter,
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
                       formatter_class=Formatter,
                       description="As root with network namespaces: `mipsec lab demo` (real daemons,\n"
                       "TUN devices, a UDP stream across two handovers and a return home).  Otherwise\n"
                       "it says so and runs the same scenario in mipsec's in-memory network.")
    p.add_argument("--sim", action="store_true", help="always use the in-memory simulator")
    p.add_argument("--delay-ms", type=float, default=None,
                   help="one-way Internet delay (default 10 in the lab, 20 in the simulator)")
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="write a sequence chart per move and the packet arrivals (PNG) to DIR")
    sa_options(p)
    p.set_defaults(func=_cmd_demo)

    add_lab_parser(sub)
    return parser


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


def _cmd_status(args: argparse.Namespace) -> int:
    from mipsec.io import control
    quiet_pipe()
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


def _cmd_memory(args: argparse.Namespace) -> int:
    import json

    from mipsec.io import control
    path = _socket_for(args)
    try:
        reply = control.request(path, f"memory top {args.top}", timeout=30.0)
    except (OSError, ValueError) as exc:
        print(f"mipsec memory: cannot reach {path}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"mipsec memory: {reply.get('error')}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=1))
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
    quiet_pipe()
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from mipsec.lab.lab import requirements_problem
    problem = sa_options_problem(args)
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

