"""Mobility security: MN-HA authentication and replay protection (RFC 5944 §3.5.1, §5.4, §5.7).

Theory of operation
-------------------
A *mobility security association* (MSA) is what a mobile node and its home agent share: an SPI,
a key, an algorithm and a replay-protection style (RFC 5944 §1.6 "Mobility Security
Association", §5.1).  Both sides hold their own ``MobilitySecurityAssociation`` object; the HA's
one also remembers the last identification it accepted, the MN's one its clock offset (or the
HA's nonce).

Authentication (§3.5.1, §5.1): the authenticator covers "the UDP payload (that is, the
Registration Request or Reply data), all prior Extensions in their entirety, and the Type,
Length, and SPI of this Extension".  The default algorithm is HMAC-MD5 (RFC 2104) with the
shared key as the HMAC key; it replaced the "prefix+suffix" keyed MD5 of RFC 2002, and it is
what RFC 3344/5944 implementations (and Wireshark's field ``mip.auth.auth``, shown but not
verified) expect.  HMAC-SHA-256 is our stronger per-MSA option (32-byte authenticator, not
interoperable with implementations that only know HMAC-MD5).  Authenticators are compared with
``hmac.compare_digest``; the keyed HMAC state is built once per MSA and copied per message.

Identification (§5.7): with *timestamps* the MN sends a 64-bit NTP timestamp; the HA accepts it
when it is within ``skew_s`` of its own clock AND strictly greater than the last identification
it accepted from this MN.  Otherwise it answers code 133 with its own time in the high 32 bits
and the MN's low 32 bits, and the MN, once that reply authenticates, adopts the offset.  With
*nonces* (§5.7, "Nonces") the high 32 bits carry the HA's nonce (from its last reply) and the
low 32 bits a fresh MN nonce; the HA checks the high half and returns a new nonce in every reply.

Wall-clock time is always an argument (``wallclock``: float seconds since the Unix epoch); this
module never reads a clock.  State changes only in the explicit ``accept_identification`` (HA,
after every check passed) and ``adopt_reply`` (MN, after the reply authenticated).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from collections.abc import Callable

from mipsec.drops import DropReason
from mipsec.errors import ConfigError, ParseError
from mipsec.mip.constants import IDENTIFICATION_SKEW_S, NTP_FRACTION, NTP_UNIX_OFFSET_S
from mipsec.wire.mip import (
    EXT_MN_HA_AUTH,
    HMAC_MD5_BYTES,
    HMAC_SHA256_BYTES,
    MSG_REGISTRATION_REPLY,
    MSG_REGISTRATION_REQUEST,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    auth_extension,
    auth_extension_offset,
    parse_registration_reply,
    parse_registration_request,
)

ALGORITHMS = {"hmac-md5": (hashlib.md5, HMAC_MD5_BYTES),
              "hmac-sha256": (hashlib.sha256, HMAC_SHA256_BYTES)}
REPLAY_STYLES = ("timestamps", "nonces")
LOW32 = 0xFFFFFFFF


# --- NTP timestamps (RFC 5905 §6) ---------------------------------------------------------------

def ntp_from_unix(wallclock: float) -> int:
    """64-bit NTP timestamp (seconds since 1900 << 32 | fraction) for a Unix time."""
    seconds = math.floor(wallclock)
    fraction = int((wallclock - seconds) * NTP_FRACTION) & LOW32
    return (((seconds + NTP_UNIX_OFFSET_S) & LOW32) << 32) | fraction


def unix_from_ntp(ntp: int) -> float:
    """The inverse of ``ntp_from_unix`` (era 0, i.e. until 2036-02-07)."""
    return (ntp >> 32) - NTP_UNIX_OFFSET_S + (ntp & LOW32) / NTP_FRACTION


_HALF64 = 1 << 63
_MOD64 = 1 << 64


def ntp_difference_s(a: int, b: int) -> float:
    """a - b in seconds for two 64-bit NTP timestamps less than 68 years apart.

    Serial-number arithmetic (RFC 1982 §3.2 applied to 64 bits), so the comparison stays right
    across the NTP era rollover of 2036 (RFC 5905 §6).
    """
    return (((a - b) + _HALF64) % _MOD64 - _HALF64) / NTP_FRACTION


# --- the mobility security association -------------------------------------------------------------

class MobilitySecurityAssociation:
    """What an MN and its HA share (RFC 5944 §1.6), plus this side's replay state."""

    def __init__(self, spi: int, key: bytes, algorithm: str = "hmac-md5",
                 replay: str = "timestamps", skew_s: float = IDENTIFICATION_SKEW_S,
                 random: Callable[[int], bytes] = os.urandom):
        if not 0 <= spi <= LOW32:
            raise ConfigError(f"mobility SPI {spi} does not fit 32 bits")
        if 0 <= spi <= 255:
            # RFC 5944 §3.5.1: SPI values 0 through 255 are reserved
            raise ConfigError(f"mobility SPI {spi} is reserved (0-255, RFC 5944 §3.5.1)")
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"mobility algorithm {algorithm!r}: use one of {sorted(ALGORITHMS)}")
        if replay not in REPLAY_STYLES:
            raise ConfigError(f"replay protection {replay!r}: use one of {REPLAY_STYLES}")
        if not key:
            raise ConfigError("mobility key must not be empty")
        if skew_s <= 0:
            raise ConfigError(f"identification skew {skew_s} s must be positive")
        self.spi = spi
        self.algorithm = algorithm
        self.replay = replay
        self.skew_s = float(skew_s)
        digest, self.authenticator_bytes = ALGORITHMS[algorithm]
        self._hmac = hmac.new(key, digestmod=digest)
        self._random = random
        # HA side
        self.last_accepted_id: int | None = None
        self.ha_nonce: int | None = None       # nonces: what we expect in the high half
        # MN side
        self.clock_offset_s = 0.0              # timestamps: HA clock minus ours
        self.peer_nonce: int | None = None     # nonces: the HA's latest nonce
        self._last_sent_id: int | None = None

    def __repr__(self) -> str:  # never the key
        return (f"MobilitySecurityAssociation(spi={self.spi:#x}, algorithm={self.algorithm!r}, "
                f"replay={self.replay!r})")

    # -- authentication (RFC 5944 §3.5.1) ------------------------------------------------------

    def authenticator(self, covered: bytes) -> bytes:
        """HMAC over the covered bytes (message + prior extensions + Type, Length, SPI)."""
        mac = self._hmac.copy()
        mac.update(covered)
        return mac.digest()

    def sign(self, message: bytes) -> bytes:
        """Append the MN-HA authentication extension to a built RRQ/RRP (without one)."""
        ext_head = auth_extension(self.spi, b"\0" * self.authenticator_bytes).encode()
        covered = message + ext_head[:2 + 4]
        return covered + self.authenticator(covered)

    def verify(self, data: bytes) -> RegistrationRequest | RegistrationReply:
        """Parse an RRQ or RRP and check its MN-HA authenticator.

        Raises ParseError with MIP_NO_AUTH, MIP_UNKNOWN_SPI, MIP_AUTH_FAILED (or the parser's
        reason).  Changes no state.
        """
        if data[:1] == bytes((MSG_REGISTRATION_REQUEST,)):
            msg: RegistrationRequest | RegistrationReply = parse_registration_request(data)
        elif data[:1] == bytes((MSG_REGISTRATION_REPLY,)):
            msg = parse_registration_reply(data)
        else:
            raise ParseError("not a registration message", DropReason.MALFORMED)
        found = auth_extension_offset(data, msg.extensions, EXT_MN_HA_AUTH)
        if found is None:
            raise ParseError("no MN-HA authentication extension", DropReason.MIP_NO_AUTH)
        covered_len, ext = found
        if ext.spi != self.spi:
            raise ParseError(f"MN-HA SPI {ext.spi:#x} is not {self.spi:#x}",
                             DropReason.MIP_UNKNOWN_SPI)
        expected = self.authenticator(data[:covered_len])
        if not hmac.compare_digest(expected, ext.authenticator):
            raise ParseError("MN-HA authenticator does not verify", DropReason.MIP_AUTH_FAILED)
        return msg

    # -- identification, MN side (RFC 5944 §5.7) ----------------------------------------------

    def new_identification(self, wallclock: float) -> int:
        """The Identification for the next request; strictly increasing on this MSA."""
        if self.replay == "timestamps":
            ident = ntp_from_unix(wallclock + self.clock_offset_s)
            if (self._last_sent_id is not None
                    and ntp_difference_s(ident, self._last_sent_id) <= 0):
                ident = (self._last_sent_id + 1) % _MOD64
        else:
            # §5.7: high 32 bits the HA's nonce (0 before we know one), low 32 bits our nonce
            ident = ((self.peer_nonce or 0) << 32) | int.from_bytes(self._random(4), "big")
        self._last_sent_id = ident
        return ident

    @staticmethod
    def reply_matches(request_id: int, reply: RegistrationReply) -> bool:
        """§5.7: a reply belongs to a request when the low-order 32 bits agree."""
        return (reply.identification & LOW32) == (request_id & LOW32)

    def adopt_reply(self, request_id: int, reply: RegistrationReply, wallclock: float) -> bool:
        """MN: learn from an AUTHENTICATED reply to ``request_id``.

        Timestamps: a 133 reply gives the HA's time in the high 32 bits; we adopt the offset so
        the next request is accepted (§5.7).  Nonces: every reply carries the HA's next nonce.
        Returns True when our state changed.
        """
        if not self.reply_matches(request_id, reply):
            return False
        if self.replay == "nonces":
            self.peer_nonce = reply.identification >> 32
            return True
        if reply.code == ReplyCode.HA_IDENTIFICATION_MISMATCH:
            ours = ntp_from_unix(math.floor(wallclock)) & ~LOW32
            theirs = reply.identification & ~LOW32
            self.clock_offset_s = ntp_difference_s(theirs, ours)
            self._last_sent_id = None
            return True
        return False

    # -- identification, HA side (RFC 5944 §5.7) ----------------------------------------------

    def check_identification(self, identification: int, wallclock: float) -> None:
        """Raise ParseError(MIP_IDENTIFICATION_MISMATCH or MIP_REPLAYED) if the HA must refuse
        the request with code 133; change nothing."""
        if self.replay == "nonces":
            if self.ha_nonce is None or (identification >> 32) != self.ha_nonce:
                raise ParseError("identification does not carry our nonce",
                                 DropReason.MIP_IDENTIFICATION_MISMATCH)
            return
        if (self.last_accepted_id is not None
                and ntp_difference_s(identification, self.last_accepted_id) <= 0):
            raise ParseError("identification not newer than the last accepted one",
                             DropReason.MIP_REPLAYED)
        if abs(ntp_difference_s(identification, ntp_from_unix(wallclock))) > self.skew_s:
            raise ParseError(f"identification more than {self.skew_s} s from our clock",
                             DropReason.MIP_IDENTIFICATION_MISMATCH)

    def accept_identification(self, identification: int) -> None:
        """HA: the request was accepted (authenticated, checked, binding made)."""
        if self.replay == "timestamps":
            self.last_accepted_id = identification

    def reply_identification(self, request_id: int, wallclock: float, accepted: bool) -> int:
        """HA: the Identification of the reply to ``request_id``.

        Timestamps: an accepted reply echoes the request; a 133 reply carries our time in the
        high 32 bits and the MN's low 32 bits (§5.7).  Nonces: a fresh nonce of ours in the
        high 32 bits (remembered for the next request) and the MN's low 32 bits.
        """
        low = request_id & LOW32
        if self.replay == "nonces":
            self.ha_nonce = int.from_bytes(self._random(4), "big")
            return (self.ha_nonce << 32) | low
        if accepted:
            return request_id
        return (ntp_from_unix(wallclock) & ~LOW32) | low
