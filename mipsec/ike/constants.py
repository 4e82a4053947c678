"""IKEv2 numbers (RFC 7296 §3 and the IANA "IKEv2 Parameters" registries) and our tunables.

Specification constants first (each with its RFC section), tunables last (names carry units).
"""

from __future__ import annotations

import enum

from mipsec.constants import IKE_PORT as IKE_PORT
from mipsec.constants import NAT_KEEPALIVE as NAT_KEEPALIVE
from mipsec.constants import NAT_T_PORT as NAT_T_PORT
from mipsec.constants import NON_ESP_MARKER as NON_ESP_MARKER

# --- specification constants -------------------------------------------------------------------

IKE_VERSION = 0x20                 # §3.1: major 2, minor 0
IKE_HEADER_LEN = 28                # §3.1
GENERIC_PAYLOAD_HEADER_LEN = 4     # §3.2
KEY_PAD = b"Key Pad for IKEv2"     # §2.15
MIN_NONCE_LEN = 16                 # §2.10
MAX_NONCE_LEN = 256                # §3.9


class Flag(enum.IntFlag):
    """§3.1 header flags."""
    INITIATOR = 0x08
    VERSION = 0x10
    RESPONSE = 0x20


class ExchangeType(enum.IntEnum):
    """§3.1."""
    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37


class PayloadType(enum.IntEnum):
    """§3.2."""
    NONE = 0
    SA = 33
    KE = 34
    IDi = 35
    IDr = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR_ID = 43
    TSi = 44
    TSr = 45
    SK = 46
    CP = 47
    EAP = 48
    SKF = 53                       # RFC 7383


class ProtocolId(enum.IntEnum):
    """§3.3.1."""
    NONE = 0
    IKE = 1
    AH = 2
    ESP = 3


class TransformType(enum.IntEnum):
    """§3.3.2."""
    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4
    ESN = 5


class Encr(enum.IntEnum):
    """Transform type 1 (IANA); we implement CBC and GCM-16."""
    ENCR_AES_CBC = 12
    ENCR_AES_GCM_16 = 20


class Prf(enum.IntEnum):
    """Transform type 2."""
    PRF_HMAC_SHA2_256 = 5


class Integ(enum.IntEnum):
    """Transform type 3."""
    NONE = 0
    AUTH_HMAC_SHA2_256_128 = 12


class DhGroup(enum.IntEnum):
    """Transform type 4."""
    NONE = 0
    MODP_2048 = 14                 # RFC 3526 §3
    ECP_256 = 19                   # RFC 5903
    CURVE25519 = 31                # RFC 8031


class Esn(enum.IntEnum):
    """Transform type 5."""
    NO_ESN = 0
    ESN = 1


ATTR_KEY_LENGTH = 14               # §3.3.5 (TV format, AF=1)
ATTR_FORMAT_TV = 0x8000


class IdType(enum.IntEnum):
    """§3.5."""
    ID_IPV4_ADDR = 1
    ID_FQDN = 2
    ID_RFC822_ADDR = 3
    ID_IPV6_ADDR = 5
    ID_KEY_ID = 11


class AuthMethod(enum.IntEnum):
    """§3.8."""
    RSA_SIG = 1
    SHARED_KEY_MIC = 2
    DSS_SIG = 3


class NotifyType(enum.IntEnum):
    """§3.10.1 (errors below 16384, status above) plus RFC 4555 / RFC 7383 status types."""
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    HTTP_CERT_LOOKUP_SUPPORTED = 16392
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396          # RFC 4555 §4.2.1
    ADDITIONAL_IP4_ADDRESS = 16397
    ADDITIONAL_IP6_ADDRESS = 16398
    NO_ADDITIONAL_ADDRESSES = 16399
    UPDATE_SA_ADDRESSES = 16400       # RFC 4555 §4.2.3
    COOKIE2 = 16401
    NO_NATS_ALLOWED = 16402
    IKEV2_FRAGMENTATION_SUPPORTED = 16430  # RFC 7383
    SIGNATURE_HASH_ALGORITHMS = 16431      # RFC 7427


class TsType(enum.IntEnum):
    """§3.13.1."""
    TS_IPV4_ADDR_RANGE = 7
    TS_IPV6_ADDR_RANGE = 8


# Payload types we understand; any other with the critical bit set is refused (§2.5).
KNOWN_PAYLOADS = frozenset(int(p) for p in PayloadType if p is not PayloadType.NONE)

# --- tunables ------------------------------------------------------------------------------------

NONCE_LEN = 32                      # we send 32-octet nonces (>= half the PRF key size, §2.10)
RETRANSMIT_INITIAL_S = 0.5          # §2.1: first retransmission; doubles each time
RETRANSMIT_TRIES = 6                # then give up the IKE SA (0.5+1+2+4+8+16 = 31.5 s)
SETUP_RETRANSMIT_MAX_S = 2.0        # an initiator's IKE_SA_INIT / IKE_AUTH: at most this apart,
                                    # so a GW back from a restart is reached within 2 s (9.5 s)
WINDOW_SIZE = 1                     # §2.3: we keep one request in flight (SET_WINDOW_SIZE not sent)
COOKIE_THRESHOLD_HALF_OPEN = 32     # §2.6: ask for cookies above this many half-open SAs
COOKIE_SECRET_LIFETIME_S = 300.0    # rotate the cookie secret this often (one old one accepted)
HALF_OPEN_TIMEOUT_S = 30.0          # a responder forgets an SA that never completed IKE_AUTH
DPD_INTERVAL_S = 30.0               # liveness check after this much silence (§2.4)
NAT_KEEPALIVE_INTERVAL_S = 20.0     # RFC 3948 §4
# After the Delete of a re-keyed child SA its inbound ESP SA still decrypts for this long, then
# its SPI is forgotten: ESP the peer sent just before it switched (and before it sent the
# Delete) may still be queued behind the Delete, on the ESP socket or on a slower path (§2.8;
# strongSwan's charon.delete_rekeyed_delay has the same purpose and default)
CHILD_SA_DELETE_GRACE_S = 5.0
MAX_MESSAGE_LEN = 65535
