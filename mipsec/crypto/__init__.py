"""ESP transforms keyed by IANA name (``mipsec.crypto.transforms``)."""
