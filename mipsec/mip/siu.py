"""SIU authentication and replay protection (docs/protocol.md, "Processing rules").

``SiuSigner`` (at the HA) numbers and signs SIUs; ``SiuVerifier`` (at the GW) accepts an SIU only
from a configured HA, only with that HA's key, only once, and (at the GW) only when it echoes
the GW's current epoch.  The order of checks at the verifier is fixed:

1. framing (``parse_siu``): TRUNCATED / MALFORMED;
2. the source address is a configured HA and the message's sender field names that same HA:
   SIU_UNKNOWN_SENDER;
3. key id and HMAC-SHA-256 over everything before the authenticator, compared in constant
   time: SIU_AUTH_FAILED;
4. the sequence number is new: not below the sender's floor, not left of its replay window
   (``SIU_REPLAY_WINDOW`` numbers below the highest accepted one) and not already accepted
   inside it: SIU_REPLAYED.  A window rather than "greater than the last" lets SIUs for many
   MNs overtake each other on the home link without being refused;
5. (GW) the Gateway Epoch is the GW's current one, or 0 ("not known yet": an HA that has not
   heard an ACK since its start) with a Timestamp not before the GW's own start (the SIU was
   built while this GW ran): else SIU_STALE_EPOCH.  This is what makes an SIU
   recorded before a GW restart worthless afterwards (the restarted GW has a new random epoch
   and an empty window), without any state on disk;
6. only now the window records the sequence number (``accept``).

``authenticate`` does 1-3, ``freshness`` 4 (and 5 when given an epoch) without changing
anything, ``accept`` 6; ``verify`` is all of them, for the HA's ACKs.

What the verifier does NOT decide: whether the SIU may move an SA.  That is the GW role's
compare-and-swap (the SIU's old care-of address must be the SA's current outer destination, else
SIU_STALE_CARE_OF), see docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import cast

from mipsec.constants import UNSPECIFIED_ADDRESS
from mipsec.drops import DropReason
from mipsec.errors import ConfigError, ParseError
from mipsec.ipsec.replay import ReplayWindow
from mipsec.mip.constants import SIU_REPLAY_WINDOW
from mipsec.mip.security import ntp_from_unix
from mipsec.wire.siu import (
    SIU_AUTHENTICATOR_BYTES,
    Siu,
    SiuFlags,
    SiuType,
    build_siu_body,
    parse_siu,
    siu_sender,
)

MIN_KEY_BYTES = 16       # RFC 2104 §3: a key shorter than the hash output weakens HMAC; 16+ B
ZERO_ADDRESS = UNSPECIFIED_ADDRESS


def _mac(key: bytes) -> hmac.HMAC:
    return hmac.new(key, digestmod=hashlib.sha256)


class SiuSigner:
    """The HA's side: ``build`` returns the signed bytes of the next SIU.

    ``ha_id`` is the HA's address on the private side (the source address of its SIUs).  The GW
    uses the same class with its own inside address and key to sign ACKs (``build_ack``).
    ``first_sequence``: start from ``ntp_from_unix(wallclock)`` at start-up so that a restarted
    HA keeps sending numbers the GW has not seen (docs/protocol.md, "Sequence numbers").
    """

    def __init__(self, ha_id: str, key: bytes, key_id: int = 1, first_sequence: int = 1):
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"SIU key for {ha_id} is {len(key)} bytes; use at least "
                              f"{MIN_KEY_BYTES}")
        if not 0 <= key_id <= 255:
            raise ConfigError(f"SIU key id {key_id} does not fit 8 bits")
        if not 1 <= first_sequence < (1 << 64):
            raise ConfigError(f"SIU first sequence {first_sequence} out of range")
        self.ha_id = ha_id
        self.key_id = key_id
        self.next_sequence = first_sequence
        self._mac = _mac(key)

    def build(self, type: SiuType = SiuType.UPDATE, *, home_address: str, old_care_of: str,
              new_care_of: str, gateway_spi: int, lifetime: int, rrp: bytes = b"",
              wallclock: float, forward_rrp: bool = True, gateway_epoch: int = 0) -> bytes:
        """Sign and number one SIU.  For DEREGISTER pass ``new_care_of="0.0.0.0"`` and
        ``lifetime=0``; ``forward_rrp=False`` when the RRP went to the MN directly (MN at home).
        ``gateway_epoch``: the GW's epoch from its latest ACK (0 when not known yet).
        """
        if type == SiuType.DEREGISTER and (new_care_of != ZERO_ADDRESS or lifetime != 0):
            raise ValueError("a DEREGISTER SIU carries new care-of 0.0.0.0 and lifetime 0")
        siu = Siu(type=type, sender=self.ha_id, sequence=self.next_sequence,
                  timestamp=ntp_from_unix(wallclock), home_address=home_address,
                  old_care_of=old_care_of, new_care_of=new_care_of, gateway_spi=gateway_spi,
                  lifetime=lifetime, rrp=rrp,
                  flags=SiuFlags.FORWARD_RRP if forward_rrp and rrp else SiuFlags(0),
                  key_id=self.key_id, gateway_epoch=gateway_epoch)
        body = build_siu_body(siu)
        mac = self._mac.copy()
        mac.update(body)
        self.next_sequence += 1
        return body + mac.digest()


    def build_ack(self, acked: Siu, *, sa_remote: str | None, wallclock: float,
                  epoch: int = 0, stale_epoch: bool = False) -> bytes:
        """GW -> HA: acknowledge an applied SIU (docs/protocol.md, "ACK").

        The ACK echoes the acknowledged sequence number (so the HA's verifier, keyed by the
        GW's address, sees strictly increasing numbers) and reports where the GW's outbound SA
        now points (``sa_remote``, ``None`` -> 0.0.0.0) and the GW's current ``epoch``, which
        the HA echoes in its next SIUs; ``stale_epoch`` sets E: the SIU was refused for its
        epoch and nothing of it was applied.  It does not consume a sequence number.
        """
        siu = Siu(type=SiuType.ACK, sender=self.ha_id, sequence=acked.sequence,
                  timestamp=ntp_from_unix(wallclock), home_address=acked.home_address,
                  old_care_of=acked.old_care_of, new_care_of=sa_remote or ZERO_ADDRESS,
                  gateway_spi=acked.gateway_spi, lifetime=acked.lifetime, key_id=self.key_id,
                  gateway_epoch=epoch,
                  flags=SiuFlags.STALE_EPOCH if stale_epoch else SiuFlags(0))
        body = build_siu_body(siu)
        mac = self._mac.copy()
        mac.update(body)
        return body + mac.digest()


class SiuVerifier:
    """The GW's side (and the HA's, for ACKs).  ``keys_by_ha_address``: {HA address: (key id,
    key)}, or a list of such pairs per HA while a key change is under way (docs/protocol.md,
    "Key ID").  ``floor``: no sequence number below it is accepted from anyone (the HA passes
    its own first sequence number: an ACK echoing a number from before its restart is old)."""

    def __init__(self, keys_by_ha_address: Mapping[str, tuple[int, bytes]
                                                    | Sequence[tuple[int, bytes]]], *,
                 floor: int = 0, window: int = SIU_REPLAY_WINDOW):
        self._keys: dict[str, dict[int, hmac.HMAC]] = {}
        for address, entry in keys_by_ha_address.items():
            # one (key id, key) pair is itself a sequence: the first item tells the forms apart
            pairs = ([cast("tuple[int, bytes]", entry)] if isinstance(entry[0], int)
                     else cast("Sequence[tuple[int, bytes]]", entry))
            keys: dict[int, hmac.HMAC] = {}
            for key_id, key in pairs:
                if len(key) < MIN_KEY_BYTES:
                    raise ConfigError(f"SIU key {key_id} for {address} is {len(key)} bytes; use "
                                      f"at least {MIN_KEY_BYTES}")
                if not 0 <= key_id <= 255:
                    raise ConfigError(f"SIU key id {key_id} for {address} does not fit 8 bits")
                if key_id in keys:
                    raise ConfigError(f"SIU key id {key_id} configured twice for {address}")
                keys[key_id] = _mac(key)
            if not keys:
                raise ConfigError(f"no SIU key configured for {address}")
            self._keys[address] = keys
        self.floor = floor
        self._window_bits = window
        # one replay window per sender; the set of senders is the configuration (bounded)
        self.windows: dict[str, ReplayWindow] = {}

    @property
    def last_sequence(self) -> dict[str, int]:
        """The highest sequence number accepted per sender (status)."""
        return {a: w.top for a, w in self.windows.items()}

    def authenticate(self, src_address: str, data: bytes) -> Siu:
        """Steps 1-3 of the module doc: the SIU, or ParseError(reason).  Changes nothing."""
        siu = parse_siu(data)
        entry = self._keys.get(src_address)
        if entry is None or siu_sender(data) != src_address:
            raise ParseError(f"SIU from {src_address} (sender {siu.sender}) is from no "
                             "configured home agent", DropReason.SIU_UNKNOWN_SENDER)
        base = entry.get(siu.key_id)
        if base is None:
            raise ParseError(f"SIU from {src_address} uses unknown key id {siu.key_id}",
                             DropReason.SIU_AUTH_FAILED)
        mac = base.copy()
        mac.update(data[:-SIU_AUTHENTICATOR_BYTES])
        if not hmac.compare_digest(mac.digest(), siu.authenticator):
            raise ParseError(f"SIU from {src_address} does not authenticate",
                             DropReason.SIU_AUTH_FAILED)
        return siu

    def freshness(self, siu: Siu, epoch: int | None = None,
                  unknown_epoch_floor: int = 0) -> DropReason | None:
        """Steps 4-5: None when the authenticated ``siu`` is fresh, else the reason.  The
        sequence check comes first, so a replay is never told the current epoch.  ``epoch``:
        the GW's (None: no epoch check, the HA's ACKs); ``unknown_epoch_floor``: the earliest
        Timestamp an SIU with epoch 0 may carry (the GW's start, NTP format)."""
        seq = siu.sequence
        if seq < self.floor:
            return DropReason.SIU_REPLAYED
        window = self.windows.get(siu.sender)
        if window is not None and window.check(seq) is not None:
            return DropReason.SIU_REPLAYED       # already accepted, or left of the window
        if epoch is not None:
            if siu.gateway_epoch == 0:
                if siu.timestamp < unknown_epoch_floor:
                    return DropReason.SIU_STALE_EPOCH    # built before our start
            elif siu.gateway_epoch != epoch:
                return DropReason.SIU_STALE_EPOCH        # from before our restart
        return None

    def accept(self, siu: Siu) -> None:
        """Step 6: record an authenticated, fresh SIU's sequence number."""
        window = self.windows.get(siu.sender)
        if window is None:
            window = self.windows[siu.sender] = ReplayWindow(self._window_bits)
        window.update(siu.sequence)

    def verify(self, src_address: str, data: bytes, epoch: int | None = None) -> Siu:
        """Return the authenticated, fresh SIU (recorded as accepted) or raise ParseError."""
        siu = self.authenticate(src_address, data)
        reason = self.freshness(siu, epoch)
        if reason is not None:
            raise ParseError(f"SIU sequence {siu.sequence} from {src_address}: {reason}", reason)
        self.accept(siu)
        return siu
