"""systemd units for the three daemons, written for the ``mipsec`` that is installed.

``mipsec install-units`` writes ``mipsec-mn@.service``, ``mipsec-gw@.service`` and
``mipsec-ha@.service`` whose ``ExecStart`` is the running interpreter with ``-m mipsec`` (the
virtual environment's Python on Debian 12, ``/usr/bin/python3`` elsewhere), so a unit always
starts the mipsec it was written by, wherever pip put it.  One instance per configuration file:
``/etc/mipsec/<instance>.toml`` -> ``systemctl enable --now mipsec-gw@<instance>``.
"""

from __future__ import annotations

import os
import shlex
import sys

ROLE_TITLES = {"mn": "mobile node", "gw": "VPN gateway", "ha": "home agent"}
CONFIG_DIR = "/etc/mipsec"
DEFAULT_UNIT_DIR = "/etc/systemd/system"

_TEMPLATE = """\
# mipsec {title} daemon, one instance per configuration file:
#   {config_dir}/%i.toml  ->  systemctl enable --now mipsec-{role}@%i   (e.g. mipsec-{role}@{role})
# Written by `mipsec install-units` for {python}.
# The daemon runs in the foreground, logs to stderr (the journal), re-reads its file on
# `systemctl reload` (SIGHUP) and removes its TUN device, routes, rules and control socket on
# SIGTERM (systemctl stop).  See {doc}.
[Unit]
Description=mipsec {title} (%i)
Documentation={doc_url}
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={exec_start} {role} --config {config_dir}/%i.toml
Restart=on-failure
RestartSec=2
# A bad configuration exits with status 2: do not restart in a loop, fix the file.
RestartPreventExitStatus=2
ExecReload=/bin/kill -HUP $MAINPID
KillSignal=SIGTERM
TimeoutStopSec=10
RuntimeDirectory=mipsec
RuntimeDirectoryPreserve=yes
StateDirectory=mipsec
# TUN devices, routes, raw sockets: CAP_NET_ADMIN + CAP_NET_RAW are all it needs.
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
ReadWritePaths=/run/mipsec -/var/log/mipsec
DeviceAllow=/dev/net/tun rw
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def docs_path() -> str | None:
    """operations.md as installed with the package (wheel data files), if it is there."""
    for base in (sys.prefix, "/usr/local", "/usr"):
        path = os.path.join(base, "share", "doc", "mipsec", "operations.md")
        if os.path.exists(path):
            return path
    return None


def unit_text(role: str, python: str | None = None, config_dir: str = CONFIG_DIR) -> str:
    python = python or sys.executable
    doc = docs_path()
    return _TEMPLATE.format(
        role=role, title=ROLE_TITLES[role], config_dir=config_dir, python=python,
        exec_start=f"{shlex.quote(python)} -m mipsec",
        doc=doc or "docs/operations.md",
        doc_url=f"file://{doc}" if doc else "https://pypi.org/project/mipsec/")


def install_units(dest: str = DEFAULT_UNIT_DIR, python: str | None = None,
                  config_dir: str = CONFIG_DIR) -> list[str]:
    """Write the three units into ``dest``; returns their paths."""
    os.makedirs(dest, exist_ok=True)
    paths = []
    for role in ROLE_TITLES:
        path = os.path.join(dest, f"mipsec-{role}@.service")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(unit_text(role, python, config_dir))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        paths.append(path)
    return paths
