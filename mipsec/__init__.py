"""mipsec: a userspace IPsec ESP + Mobile IPv4 stack over Linux TUN devices.

Dependency direction (one line): wire -> crypto -> ipsec / mip -> node -> sim / io -> cli.
Nothing below ``mipsec.io`` touches sockets, TUN devices, threads or the clock; see
tests/unit/test_layering.py.
"""

__version__ = "0.1.0"
