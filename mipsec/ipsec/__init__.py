"""IPsec (RFC 4301 model): anti-replay (``replay``), the ESP SA (``sa``), SPD and SAD.

Import from the submodules, e.g. ``from mipsec.ipsec.sa import SecurityAssociation, Direction``.
"""
