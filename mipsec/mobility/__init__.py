"""The handover procedure of WO 2004/086718 in one place: three state machines.

* ``registration``: the mobile node's registration (RRQ inside the tunnel, retransmission,
  re-establishment, deregistration at home);
* ``ha_binding``: the home agent's bindings, whose changes the HA reports to the VPN gateway in
  Security Information Updates;
* ``gw_binding``: the VPN gateway's compare-and-swap of the outbound SA's destination.

Each is an enum of states, an enum of events and a transition table that *is* the logic
(``machine.Machine``): the roles in ``mipsec/node/`` parse and check what arrives, name the
event, fire it, and carry out the effect the table names.  docs/claims.md maps every claim and
figure step of the patent to the function, the test and the timeline event.
"""
