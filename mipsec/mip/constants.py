"""Mobile IPv4 and SIU constants: specification values (with their RFC) first, then tunables.

Names carry units (``_S`` seconds, ``_BYTES``).
"""

from __future__ import annotations

from mipsec.constants import IPPROTO_IPIP as IPPROTO_IPIP  # RFC 2003 §3.1
from mipsec.constants import IPPROTO_UDP as IPPROTO_UDP
from mipsec.constants import SIU_PORT as SIU_PORT  # on the GW's inside address (docs/protocol.md)

# --- specification constants ------------------------------------------------------------------
# The wire-format numbers live beside their codecs (mipsec.wire may not import mipsec.mip); they
# are re-exported here so roles have one place to import constants from.
from mipsec.wire.mip import (  # noqa: F401  (re-exported)
    AUTH_SPI_BYTES,
    EXT_CVSE,
    EXT_FA_HA_AUTH,
    EXT_GENERIC_AUTH,
    EXT_MN_FA_AUTH,
    EXT_MN_HA_AUTH,
    EXT_NAI,
    EXT_NVSE,
    EXT_SKIPPABLE_MIN,
    HMAC_MD5_BYTES,
    HMAC_SHA256_BYTES,
    LONG_FORMAT_EXTENSION_TYPES,
    MIP_PORT,
    MSG_REGISTRATION_REPLY,
    MSG_REGISTRATION_REQUEST,
    RRP_FIXED_BYTES,
    RRQ_FIXED_BYTES,
)
from mipsec.wire.siu import (  # noqa: F401  (re-exported)
    SIU_AUTHENTICATOR_BYTES,
    SIU_FIXED_BYTES,
    SIU_VERSION,
)

# RFC 5905 §6: NTP era 0 starts 1900-01-01; the Unix epoch is 2,208,988,800 s later.
NTP_UNIX_OFFSET_S = 2_208_988_800
NTP_FRACTION = 1 << 32


# --- the SIU message (docs/protocol.md) ----------------------------------------------------------


# --- tunables -------------------------------------------------------------------------------------

IDENTIFICATION_SKEW_S = 7.0         # RFC 5944 §5.7 leaves it to configuration; 7 s is our default
SIU_REPLAY_WINDOW = 1024            # SIU sequence numbers per HA that may arrive out of order
IPIP_OUTER_TTL = 64                 # RFC 2003 §3.1: "default TTL" of the encapsulator
