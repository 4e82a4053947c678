"""What the command line's modules share: the help formatter, the SA options of `demo`, `lab up`
and `lab demo`, and quiet pipes."""

from __future__ import annotations

import argparse


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (their line breaks are kept)."""


def sa_options(lp: argparse.ArgumentParser) -> None:
    lp.add_argument("--manual-keys", action="store_true",
                    help="ESP keys written into the configs instead of negotiated by IKEv2")
    lp.add_argument("--handover-mode", default="siu", choices=("siu", "mobike"),
                    help="siu (default) or mobike (RFC 4555 as well; IKEv2 only)")


def sa_options_problem(args: argparse.Namespace) -> str | None:
    if args.manual_keys and args.handover_mode == "mobike":
        return "--handover-mode mobike needs IKEv2-negotiated SAs; drop --manual-keys"
    return None


def quiet_pipe() -> None:
    """`mipsec status | head` ends quietly (only for commands that own nothing to clean up)."""
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)

