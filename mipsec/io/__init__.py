"""The only code with sockets, TUN devices, netlink, the clock and signals (docs/design.md).

``tun`` (Linux TUN + fake), ``transports`` (raw / UDP net side + fake), ``loop`` (the event loop
that drives a sans-I/O role), ``netlink`` (address watcher, routes), ``arp`` (gratuitous ARP),
``control`` (the control socket), ``pcap`` (captures and Wireshark key files), ``daemon``
(``mipsec mn|gw|ha``; IKE reaches the roles through the UDP 500 / 4500 receivers).  User guide:
docs/operations.md.
"""
