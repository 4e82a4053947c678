"""Mobile IPv4 machinery below the roles: mobility security (``security``), IP-in-IP
(``ipip``), SIU authentication (``siu``) and constants (``constants``).  The wire codecs are in
``mipsec.wire.mip`` and ``mipsec.wire.siu``.
"""
