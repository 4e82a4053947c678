"""What the sans-I/O IKE core hands its runtime: datagrams to send and events, all plain data.

Every call into ``IkeEndpoint`` returns these in order, and the runtime must carry them out in
that order:

* ``SendDatagram(data, local, remote)``: one UDP payload from ``local`` (address, port) to
  ``remote``.  ``data`` is the IKE message itself; on port 4500 the runtime prefixes the RFC 3948
  non-ESP marker (``mipsec.ike.constants.NON_ESP_MARKER``); a NAT keepalive is ``b"\\xff"`` and is
  sent as is (``keepalive=True``).
* events, past tense: ``IkeSaEstablished``, ``ChildSaEstablished``, ``ChildSaRekeyed``,
  ``ChildSaDeleted``, ``IkeSaRekeyed``, ``IkeSaDeleted``, ``IkeSaFailed``, ``PeerAddressChanged``.

An event is a frozen record of what happened, never a handle on the IKE SA it happened to: it
names the IKE SA by ``ike_id``, the 8-octet SPI *we* chose for it (the one RFC 7296 §2.1
demultiplexes by: stable for the SA's life, unique in the endpoint), and carries the peer's
identity, the outer addresses at that moment and, for a child SA, the ``ChildSa`` (SPIs, suite,
keys, traffic selectors).  A runtime that wants something done with an IKE SA asks the endpoint
with that identifier (``IkeEndpoint.delete_child(ike_id, spi, now)``,
``follow_addresses(ike_id, ...)``, ``update_addresses``, ``check_liveness``, ``info``).
``name`` is the SA's SPI pair as text, for logs only.
"""

from __future__ import annotations

from dataclasses import dataclass

from mipsec.ike.child import ChildSa
from mipsec.ike.config import Address

IkeSaId = bytes          # the SPI we chose for the IKE SA (RFC 7296 §2.1)


@dataclass(frozen=True, slots=True)
class SendDatagram:
    data: bytes
    local: Address
    remote: Address
    keepalive: bool = False


@dataclass(frozen=True, slots=True)
class IkeSaEstablished:
    """IKE_AUTH completed (§1.2).  ``initial_contact``: the peer said it has no other IKE SA
    with us (§2.4)."""
    ike_id: IkeSaId
    name: str
    peer_id: str
    local: Address
    remote: Address
    initial_contact: bool = False


@dataclass(frozen=True, slots=True)
class ChildSaEstablished:
    """A new child SA (IKE_AUTH or CREATE_CHILD_SA, §1.3.1); ``local``/``remote`` are the IKE
    SA's outer addresses when it was made (where its IKE_AUTH came from)."""
    ike_id: IkeSaId
    peer_id: str
    local: Address
    remote: Address
    child: ChildSa


@dataclass(frozen=True, slots=True)
class ChildSaRekeyed:
    """``new`` replaces ``old`` (RFC 7296 §2.8).  Install ``new``'s inbound SA now, keep
    ``old``'s until its ``ChildSaDeleted`` (and a grace period after it).  ``send_on_new``: we
    initiated the re-key, so the peer installed ``new`` before it answered: send on it now.
    False: we answered; the initiator installs ``new`` only when our answer arrives, so keep
    sending on ``old`` until its ``ChildSaDeleted`` (the initiator deletes it after installing)."""
    ike_id: IkeSaId
    peer_id: str
    local: Address
    remote: Address
    old: ChildSa | None
    new: ChildSa
    send_on_new: bool = True


@dataclass(frozen=True, slots=True)
class ChildSaDeleted:
    ike_id: IkeSaId
    peer_id: str
    child: ChildSa


@dataclass(frozen=True, slots=True)
class IkeSaRekeyed:
    """The IKE SA ``ike_id`` was re-keyed (§2.18): ``new_id`` takes its children over, at the
    outer addresses ``local``/``remote``."""
    ike_id: IkeSaId
    name: str
    new_id: IkeSaId
    peer_id: str
    local: Address
    remote: Address


@dataclass(frozen=True, slots=True)
class IkeSaDeleted:
    """The IKE SA ended (its children were reported deleted just before, §1.4.1)."""
    ike_id: IkeSaId
    name: str
    peer_id: str
    remote: Address
    reason: str = ""


@dataclass(frozen=True, slots=True)
class IkeSaFailed:
    """The IKE SA could not be set up, or its peer stopped answering."""
    ike_id: IkeSaId
    name: str
    peer_id: str
    remote: Address
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PeerAddressChanged:
    """MOBIKE (RFC 4555 §3.5) or NAT: the IKE SA and its children now use these addresses.
    ``explicit``: moved by UPDATE_SA_ADDRESSES; False: by a NAT-T float (RFC 7296 §2.23)."""
    ike_id: IkeSaId
    peer_id: str
    local: Address
    remote: Address
    explicit: bool = True


@dataclass(frozen=True, slots=True)
class IkeSaInfo:
    """A snapshot of one IKE SA for a runtime's decisions (``IkeEndpoint.info``)."""
    ike_id: IkeSaId
    name: str
    state: str
    established: bool
    initiator: bool
    peer_id: str
    local: Address
    remote: Address
    mobike: bool                     # the peer agreed to MOBIKE and so do we
    children: tuple[int, ...]        # inbound SPIs of its child SAs
    created: float
    last_heard: float


IkeEvent = (IkeSaEstablished | ChildSaEstablished | ChildSaRekeyed | ChildSaDeleted
            | IkeSaRekeyed | IkeSaDeleted | IkeSaFailed | PeerAddressChanged)
