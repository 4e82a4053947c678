"""What a role asks its runtime to do, and what it tells the world happened.

Roles never perform I/O.  Every entry point (``receive_from_net``, ``receive_from_tun``,
``handle_event``, ``handle_timer``) returns a list of *actions* in the order they must be carried
out: the GW's ``RebindSa`` precedes the ``SendToNet`` with the Registration Reply, and the runtime
(in-memory network or daemon) must preserve that order.

Actions are imperative (``SendToNet``), events past tense (``CareOfAddressChanged``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --- actions ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SendToNet:
    """Put a complete IPv4 packet (outer header included) on the network side.

    ``interface`` names the local interface / address it must leave from when the role cares
    (the MN with two care-of addresses); ``None`` lets routing decide.
    """
    packet: bytes
    interface: str | None = None


@dataclass(frozen=True, slots=True)
class WriteToTun:
    """Hand a complete inner IPv4 packet to the local IP stack (the TUN device)."""
    packet: bytes


@dataclass(frozen=True, slots=True)
class RebindSa:
    """An SA's outer address changed in place (informational: the role already did it).

    The runtime uses it to log, to update capture key files and to move sockets if needed.
    """
    spi: int
    local: str | None
    remote: str | None


@dataclass(frozen=True, slots=True)
class BindingChanged:
    """HA: a home address is now bound to ``care_of_address`` (``None``: deregistered or expired).

    The daemon uses it to steer the home address's host route into its TUN device while the MN is
    away and back to the home link when it is at home; with several GWs it also routes the
    care-of address via ``gateway``, so the tunnelled downlink reaches the GW with the MN's SAs.
    """
    home_address: str
    care_of_address: str | None
    gateway: str | None = None       # the inside address of the GW that serves it (GW pools)


@dataclass(frozen=True, slots=True)
class PersistBinding:
    """HA: make this binding change durable before the actions after it are carried out.

    The runtime writes it to its binding store (``mipsec.store``) synchronously: ``record`` is
    the binding now (``None``: deleted), ``meta`` small state that must survive with it (the
    MN-HA identification).  With ``conditional`` the write is a compare-and-swap: it applies
    only if the stored binding's care-of address is ``expected_care_of`` (``None``: none
    stored).  If the write fails or does not apply, the runtime does NOT carry out the actions
    that follow it up to the next ``PersistBinding`` (the reply is not sent, the MN
    retransmits) and tells the role with ``BindingNotStored``.
    """
    home_address: str
    record: Any                        # mipsec.store.BindingRecord | None
    expected_care_of: str | None = None
    conditional: bool = False
    meta: tuple[tuple[str, bytes], ...] = ()
    required: bool = True              # False: the actions after it may go on regardless


@dataclass(frozen=True, slots=True)
class ReserveSiuSequence:
    """HA: reserve SIU sequence numbers up to ``end`` (exclusive) for the GW ``gateway`` before
    the actions after it (the SIU that uses the first of them) are carried out.

    The runtime writes the high-water mark ``end`` to the binding store's metadata
    (``key``) with a compare-and-swap from ``expected`` (8 bytes big-endian; ``None``: absent),
    synchronously.  If it fails or does not apply (another HA reserved meanwhile), the runtime
    drops the actions that follow it up to the next store action and tells the role with
    ``SiuSequenceNotReserved``: no SIU ever carries a number that is not reserved, so an HA that
    takes over from another never sends a number the GW has already seen.
    """
    gateway: str
    key: str
    expected: bytes | None
    end: int
    required: bool = True


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the daemon's log (level is a ``logging`` level name)."""
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class UseHomeLink:
    """MN: the HA's authenticated reply to the deregistration arrived on the home link: take the
    home address off the TUN device and reach the home network directly through ``interface``.

    Until the MN returns this, its home-network traffic stays in the tunnel (a home-prefix
    address alone proves nothing: any network's DHCP can hand one out).
    """
    interface: str | None


# --- events from the outside world into a role -------------------------------------------------

@dataclass(frozen=True, slots=True)
class CareOfAddressChanged:
    """The MN has a new care-of address (``None`` when it lost every address)."""
    care_of_address: str | None
    interface: str | None = None
    make_before_break: bool = False   # the old address still works while registering


@dataclass(frozen=True, slots=True)
class ReturnedHome:
    """The MN is attached to its home network again: deregister (RFC 5944 §3.6.1.1)."""
    interface: str | None = None


@dataclass(frozen=True, slots=True)
class BindingNotStored:
    """HA: the runtime could not carry out a ``PersistBinding`` (store error, or the
    compare-and-swap found another care-of address); the actions after it were dropped."""
    home_address: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SiuSequenceNotReserved:
    """HA: the runtime could not carry out a ``ReserveSiuSequence``; ``stored`` is the
    high-water mark the store holds now when it could read it (``None``: unknown or absent)."""
    gateway: str
    stored: bytes | None = None
    reason: str = ""


# --- events a role reports (handover timeline, docs/design.md) --------------------------------

@dataclass(frozen=True, slots=True)
class ReestablishRequested:
    """MN: registration failed ``attempts`` times in a row; the tunnel must be re-established.

    Returned among the actions, in order.  The runtime hands it to whoever can make new SAs
    (IKEv2, or an operator) and then calls ``MobileNode.install_sas``; carrying it out needs no
    I/O and ignoring it is safe (the MN stays in its FAILED state until then).
    """
    home_address: str
    care_of_address: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One step of a handover, stamped with the role's ``now``."""
    time: float
    node: str
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


# --- a GW with worker processes (mipsec.node.gateway_worker) -----------------------------------

@dataclass(frozen=True, slots=True)
class SendOnWorker:
    """GW control process: have the worker holding the MN's outbound SA encrypt and send
    ``packet`` (``to``: this one packet to that address and UDP port instead)."""
    home_address: str
    packet: bytes
    to: tuple[str, int | None] | None = None


@dataclass(frozen=True, slots=True)
class ForwardRrq:
    """GW worker: an authenticated Registration Request (inner ``packet``) of inbound SA
    ``spi`` from ``source`` (and UDP ``port``), for the control process."""
    spi: int
    source: str
    port: int | None
    packet: bytes


@dataclass(frozen=True, slots=True)
class HandOff:
    """GW worker: a downlink packet for the worker that holds its MN's SA."""
    worker: int
    packet: bytes


Action = (SendToNet | WriteToTun | RebindSa | BindingChanged | PersistBinding | ReserveSiuSequence
          | Log
          | ReestablishRequested | UseHomeLink | SendOnWorker | ForwardRrq | HandOff)
