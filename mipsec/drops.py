"""Every reason mipsec refuses remote input, in one enum.

Each dropped packet, message or datagram is counted under exactly one of these reasons, per SA
(ESP), per role (Mobile IP, SIU, policy) or per IKE SA.  The value is the name shown by
``mipsec status`` and in logs.  Add a member rather than reuse a vague one: a test asserts the
specific reason for every kind of bad input.
"""

from __future__ import annotations

import enum


class DropReason(str, enum.Enum):
    # --- generic framing ---------------------------------------------------------------------
    MALFORMED = "malformed"                      # a parser refused it (no more specific reason)
    TRUNCATED = "truncated"                      # shorter than a header or a length field says
    BAD_IP_VERSION = "bad-ip-version"            # RFC 791: not IPv4
    BAD_IP_HEADER_LENGTH = "bad-ip-header-length"  # IHL < 5 or past the packet
    BAD_IP_TOTAL_LENGTH = "bad-ip-total-length"  # total length disagrees with the buffer
    BAD_IP_CHECKSUM = "bad-ip-checksum"
    IP_FRAGMENT = "ip-fragment"                  # we do not reassemble (RFC 4303 §3.4.1)
    WRONG_PROTOCOL = "wrong-protocol"            # not the IP protocol this path expects
    BAD_UDP_LENGTH = "bad-udp-length"
    WRONG_UDP_PORT = "wrong-udp-port"            # UDP-encapsulated ESP not to the SA's port
    NAT_KEEPALIVE = "nat-keepalive"              # RFC 3948 §2.3: consumed, not an error

    # --- ESP inbound (RFC 4303 §3.4, in the order of checks) ----------------------------------
    UNKNOWN_SPI = "unknown-spi"                  # §3.4.2: no SA for this SPI
    OUTER_SOURCE_MISMATCH = "outer-source-mismatch"  # SA names a fixed peer and this is not it
    OUTER_DESTINATION_MISMATCH = "outer-destination-mismatch"
    REPLAYED = "replayed"                        # §3.4.3: bit already set in the window
    TOO_OLD = "too-old"                          # §3.4.3: left of the window
    ICV_MISMATCH = "icv-mismatch"                # §3.4.4 (also covers AEAD tag failure)
    BAD_CIPHERTEXT_LENGTH = "bad-ciphertext-length"  # not a multiple of the block size
    BAD_PADDING = "bad-padding"                  # §2.4: padding bytes not 1, 2, 3 ...
    BAD_NEXT_HEADER = "bad-next-header"          # §2.6: not 4 (IPv4) in tunnel mode, or 59 dummy
    DUMMY_PACKET = "dummy-packet"                # §2.6: next header 59, discarded by design
    SELECTOR_MISMATCH = "selector-mismatch"      # RFC 4301 §5.2 step 4: inner packet vs SA policy
    SA_EXPIRED = "sa-expired"                    # hard lifetime reached (RFC 4301 §4.4.2.1)
    SA_EXHAUSTED = "sa-exhausted"                # sequence number would wrap (RFC 4303 §3.3.3)
    INNER_TOO_BIG = "inner-too-big"              # ESP would push the outer packet past 65535 bytes

    # --- SPD (RFC 4301 §4.4.1) -----------------------------------------------------------------
    POLICY_DISCARD = "policy-discard"            # matched a DISCARD policy
    NO_POLICY = "no-policy"                      # no policy matched (default deny)
    NO_SA = "no-sa"                              # PROTECT policy with no SA installed
    FORBIDDEN_DESTINATION = "forbidden-destination"  # GW: MN sent to an address its policy forbids
    FORBIDDEN_SOURCE = "forbidden-source"        # GW: MN's inner packet claims another home-side address

    # --- Mobile IPv4 (RFC 5944) -----------------------------------------------------------------
    MIP_BAD_EXTENSION = "mip-bad-extension"      # §1.9: unknown non-skippable extension
    MIP_NO_AUTH = "mip-no-authentication"        # §3.5.1: MN-HA authentication extension missing
    MIP_AUTH_FAILED = "mip-authentication-failed"  # §3.5.1: authenticator does not verify
    MIP_UNKNOWN_SPI = "mip-unknown-spi"          # no mobility security association for this SPI
    MIP_IDENTIFICATION_MISMATCH = "mip-identification-mismatch"  # §5.7: replay / clock skew
    MIP_REPLAYED = "mip-replayed"                # identification not newer than the last one
    MIP_UNKNOWN_HOME_ADDRESS = "mip-unknown-home-address"
    MIP_HOME_ADDRESS_NOT_OWNED = "mip-home-address-not-owned"  # MN registers another MN's address
    MIP_UNEXPECTED_REPLY = "mip-unexpected-reply"  # reply matches no pending request
    MIP_UNKNOWN_HOME_AGENT = "mip-unknown-home-agent"
    MIP_BAD_CARE_OF = "mip-bad-care-of"          # CoA 0.0.0.0, broadcast, multicast, loopback, ours
    MIP_ENCAPSULATION_UNAVAILABLE = "mip-encapsulation-unavailable"  # §3.8.3: M or G set: 139
    MIP_NOT_CO_LOCATED = "mip-not-co-located"    # D clear: an FA care-of, we have no FA: 134
    MIP_NOT_FOR_US = "mip-not-for-us"
    IPIP_UNKNOWN_TUNNEL = "ipip-unknown-tunnel"  # RFC 2003: outer source is no bound CoA
    IPIP_NO_BINDING = "ipip-no-binding"          # HA: packet for a home address with no binding
    REVERSE_TUNNEL_SOURCE_MISMATCH = "reverse-tunnel-source-mismatch"  # RFC 3024 §4
    # HA: a binding registered from the home link has no reverse tunnel (docs/security.md §3.1)
    REVERSE_TUNNEL_NOT_VIA_GATEWAY = "reverse-tunnel-not-via-gateway"
    IPIP_BAD_INNER = "ipip-bad-inner"            # RFC 2003 §3: the encapsulated datagram is no IPv4

    # --- Security Information Update (docs/protocol.md) ----------------------------------------
    SIU_UNKNOWN_SENDER = "siu-unknown-sender"    # not from a configured HA
    SIU_AUTH_FAILED = "siu-authentication-failed"
    SIU_REPLAYED = "siu-replayed"
    SIU_STALE_CARE_OF = "siu-stale-care-of"      # compare-and-swap: old CoA is not the current one
    SIU_UNKNOWN_SA = "siu-unknown-sa"
    SIU_UNKNOWN_MOBILE = "siu-unknown-mobile"
    SIU_RRP_MISMATCH = "siu-rrp-mismatch"        # embedded RRP is not a reply for the SIU's MN
    SIU_WRONG_INTERFACE = "siu-wrong-interface"  # not received on the GW's inside interface/address
    SIU_STALE_EPOCH = "siu-stale-epoch"          # echoes no current GW epoch (from before a restart)
    SIU_CARE_OF_MISMATCH = "siu-care-of-mismatch"  # new CoA is no outer source of the MN's RRQs
    ESP_MOVE_NOT_BY_SIU = "esp-move-not-by-siu"  # SIU mode: an IKE address change may not move ESP

    # --- IKEv2 (RFC 7296) -------------------------------------------------------------------------
    IKE_BAD_LENGTH = "ike-bad-length"
    IKE_UNKNOWN_CRITICAL_PAYLOAD = "ike-unknown-critical-payload"  # §2.5
    IKE_INTEGRITY_FAILED = "ike-integrity-failed"  # §3.14
    IKE_UNEXPECTED_EXCHANGE = "ike-unexpected-exchange"
    IKE_UNKNOWN_SA = "ike-unknown-sa"
    IKE_BAD_MESSAGE_ID = "ike-bad-message-id"    # §2.2: outside the window
    IKE_RETRANSMISSION = "ike-retransmission"    # §2.1: answered from cache, not an error
    IKE_AUTH_FAILED = "ike-authentication-failed"
    IKE_NO_PROPOSAL_CHOSEN = "ike-no-proposal-chosen"
    IKE_INVALID_KE_PAYLOAD = "ike-invalid-ke-payload"  # RFC 7296 §1.2: asked to use our group
    IKE_INVALID_COOKIE = "ike-invalid-cookie"    # §2.6
    IKE_CHILD_UNUSABLE = "ike-child-unusable"    # a negotiated child SA the role cannot install

    def __str__(self) -> str:  # shown as-is in status output and logs
        return self.value
