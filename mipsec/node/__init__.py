"""Sans-I/O roles: MobileNode, VpnGateway, HomeAgent, Correspondent (docs/design.md)."""
