"""ESP constants in one place: specification values (with their RFC) first, then tunables."""

from __future__ import annotations

from mipsec.constants import IPPROTO_ESP as IPPROTO_ESP
from mipsec.constants import IPPROTO_IPIP as IPPROTO_IPIP
from mipsec.constants import IPPROTO_UDP as IPPROTO_UDP
from mipsec.constants import NAT_KEEPALIVE as NAT_KEEPALIVE
from mipsec.constants import NAT_T_PORT as NAT_T_PORT
from mipsec.constants import NON_ESP_MARKER as NON_ESP_MARKER

# --- specification constants -----------------------------------------------------------------
NEXT_HEADER_NO_NEXT = 59      # RFC 4303 §2.6: "no next header", a dummy (TFC) packet
ESP_HEADER_BYTES = 8          # RFC 4303 §2: SPI (4) + sequence number (4)
ESP_TRAILER_BYTES = 2         # RFC 4303 §2.4-2.6: pad length (1) + next header (1)
SEQ_MAX_32 = 2**32 - 1        # RFC 4303 §3.3.3: the counter must not cycle
SEQ_MAX_64 = 2**64 - 1        # RFC 4303 §2.2.1: extended (64-bit) sequence numbers
SPI_RESERVED_MAX = 255        # RFC 4303 §2.1: SPIs 1-255 are reserved by IANA, 0 is local use

# --- tunables --------------------------------------------------------------------------------
REPLAY_WINDOW_BITS = 1024     # anti-replay window (RFC 4303 §3.4.3 asks for >= 32, 64 default)
OUTER_TTL = 64                # TTL of the outer header we build (RFC 1700 default)
