#!/usr/bin/env bash
# Set up everything mipsec needs on a fresh Debian machine, as root: Debian packages (iproute2,
# tshark, strongSwan with kernel-libipsec) and a virtual environment .venv with mipsec installed
# in editable mode plus its test extra.  Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# libstrongswan-standard-plugins is only a Recommends of strongswan, but charon needs its openssl
# and gcm plugins for ECP-256, Curve25519 and AES-GCM (the interoperability tests use all three).
# nftables: the GW's second filter layer (docs/security.md §3.1) and the lab's NAT; util-linux's
# unshare and mount come with every Debian.  systemd: systemd-analyze verifies the units
# `mipsec install-units` writes (a container may have no systemd).  etcd-server: the tests of
# the shared binding store run their own 3-member cluster on loopback.
DEBS=(python3 python3-venv python3-dev iproute2 iputils-ping procps tshark strongswan
      libstrongswan-standard-plugins libcharon-extra-plugins nftables gcc libc6-dev systemd
      etcd-server)
missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install Debian packages: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the strongSwan service on install; mipsec's tests run their own charon.
systemctl disable --now strongswan-starter >/dev/null 2>&1 || true
# Debian starts an etcd service on install too; the tests start their own members.
systemctl disable --now etcd >/dev/null 2>&1 || true

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# pip's own chatter (build-backend notices) goes to a log that is shown only when it fails.
log=.venv/setup.log
if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
       .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install failed (log above, kept in $log)" >&2
    exit 1
fi
echo "setup: ready (.venv/bin/mipsec)" >&2
