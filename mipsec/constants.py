"""Protocol numbers, ports and addresses every layer shares, defined once (with their RFC).

Each package keeps its own specification constants and tunables (``mipsec.ipsec.constants``,
``mipsec.mip.constants``, ``mipsec.ike.constants``); what more than one layer needs is here,
and those modules re-export it, so ``IPPROTO_UDP`` has one value in one place.
"""

from __future__ import annotations

# --- IP protocol numbers (IANA "Assigned Internet Protocol Numbers") ---------------------------
IPPROTO_IPIP = 4              # RFC 2003: IP in IP (the Mobile IP tunnel)
IPPROTO_UDP = 17              # RFC 768
IPPROTO_ESP = 50              # RFC 4303 §2

# --- UDP ports --------------------------------------------------------------------------------
MIP_PORT = 434                # RFC 5944 §3.1: registration messages
IKE_PORT = 500                # RFC 7296 §2
NAT_T_PORT = 4500             # RFC 3948 §2: UDP-encapsulated ESP (and IKE after NAT detection)
SIU_PORT = 4343               # ours: the SIU on the GW's inside address (docs/protocol.md §2)

# --- UDP port 4500 payloads (RFC 3948): what separates IKE and keepalives from ESP -------------
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2: IKE on port 4500 starts with 4 zero octets
NAT_KEEPALIVE = b"\xff"       # RFC 3948 §2.3: a one-octet 0xFF UDP payload

# --- addresses --------------------------------------------------------------------------------
# 0.0.0.0 (RFC 1122 §3.2.1.3: "this host on this network", never a destination): in an SIU's
# Old/New CoA "none", the outer destination of a GW SA no SIU has bound, the outer source of the
# MN's outbound SA before its first care-of address
UNSPECIFIED_ADDRESS = "0.0.0.0"

# --- tunables ----------------------------------------------------------------------------------
# Receive buffer of the daemons' packet sockets (raw ESP, IP-in-IP, UDP): a daemon that the
# machine does not schedule for a while must find its packets queued, not dropped.  In a lab
# soak the GW waited for a CPU 68 % of a 30 s interval and its raw ESP socket (the default
# 208 kB) dropped 253 datagrams.  wireguard-go sets 7 MB (SO_RCVBUFFORCE past rmem_max).
RECEIVE_BUFFER_BYTES = 4 << 20
GW_WORKERS_MAX = 64           # [daemon] workers of a GW at most (one per core is the point)
