"""The network-namespace lab (``mipsec lab``): ``topology`` (namespaces, links, moves), ``lab``
(daemons, state, up/down), ``delay`` (the delaying forwarder), ``stream`` (UDP stream tool),
``demo`` (``mipsec lab demo``).  See docs/operations.md.
"""
