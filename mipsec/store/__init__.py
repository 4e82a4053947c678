"""Binding stores: what the home agent keeps across a restart, behind one interface.

Theory of operation
-------------------
The HA role (``mipsec.node.home_agent``) is sans-I/O: when a binding changes it returns a
``PersistBinding`` action *before* the Registration Reply (or the SIU that carries it), and the
daemon carries that action out synchronously on a ``BindingStore``; only when the store has
returned (the write is durable) does the reply leave.  If the store fails, the reply is not sent:
the MN retransmits, so no accepted registration is ever lost and none is acknowledged without
being on disk.  At start the daemon loads the unexpired bindings and the small metadata and hands
them to the role (``HomeAgent.restore``), which re-installs its routes and proxy-ARP entries.

What a store holds:

* bindings, one ``BindingRecord`` per home address, keyed by it.  A record carries its
  **absolute** expiry on the wall clock (``expires_wall``, Unix seconds): the HA enforces the
  lifetime itself; a backend may use its own time-to-live (an etcd lease) only to collect
  garbage, never to decide that a binding is alive (etcd resets a lease to its full TTL when the
  leader changes);
* metadata, a few small byte strings under string keys: the MN-HA identification replay state
  (``mn-ha-id/<home address>``), the SIU numbering state; everything that must not go back in
  time when the HA restarts.

The operations (``BindingStore``):

``load(now_wall)``            the unexpired bindings (expired ones are left out, and may be deleted);
``meta()``                    every metadata entry;
``put(record, meta)``         write a binding and metadata entries in one atomic, durable step;
``compare_and_swap(home, expected_care_of, record, meta)``
                              the same, only if the stored binding of ``home`` has care-of
                              ``expected_care_of`` (``None``: no binding stored); ``record=None``
                              deletes.  Returns False, writing nothing, when it does not match.
                              This mirrors the SIU's compare-and-swap at the GW; with one HA it
                              always matches, with several HAs sharing a store it fences a stale
                              one (an etcd transaction: compare the care-of key, then put);
``delete(home, meta)``        remove a binding (and write metadata) durably;
``compare_and_swap_meta(key, expected, value)``
                              write one metadata entry only if it holds ``expected`` (``None``:
                              absent); False, writing nothing, otherwise.  The HA reserves its
                              SIU sequence numbers in blocks this way (``siu-seq/<GW>``, the
                              high-water mark): two HAs sharing a store never reserve the same
                              numbers, so a new active HA never sends one the GW has seen;
``close()``.

Three backends: ``MemoryStore`` (tests, the simulator; "durable" for the life of the object),
``SqliteStore`` (stdlib ``sqlite3``, WAL journal, ``synchronous=FULL``: a committed write
survives a kill -9 and a power cut), and ``EtcdStore`` (``mipsec.store.etcd``: an etcd v3
cluster through its JSON gateway; a write returns once Raft has committed it on a majority, so
it survives the loss of the HA's machine and of a minority of members).
``tests/unit/test_store.py`` runs the same contract on all three (etcd: a real 3-member cluster).

How the etcd backend fits the same interface, without changing the HA (details in its module):

* a binding is two keys under one prefix, ``<prefix>/binding/<home>``
  (``BindingRecord.to_json()``) and ``<prefix>/care-of/<home>`` (the care-of address alone);
  metadata is ``<prefix>/meta/<key>``;
* ``put``: one transaction that puts the record, the care-of key and the metadata;
* ``compare_and_swap``: one transaction whose compare is ``value(care-of) == expected`` (or
  ``create_revision(care-of) == 0`` for "none stored"), whose success branch puts (or deletes)
  the keys and metadata, returning ``succeeded``;
* ``delete``: one transaction deleting both keys and putting the metadata;
* ``load``: a range read of ``<prefix>/binding/`` keeping the records whose ``expires_wall`` is
  in the future (the lease TTL is never trusted: etcd resets it on a leader change);
* garbage collection: each binding's keys are attached to a lease a little longer than the
  lifetime, so a binding nobody refreshes disappears without the HA's help;
* durability: etcd acknowledges a write once a quorum has it on disk, which is what "durable
  before it returns" asks.
"""

from mipsec.store.record import (
    STORE_KINDS,
    BindingRecord,
    BindingStore,
    MemoryStore,
    StoreError,
    open_store,
)

__all__ = ["BindingRecord", "BindingStore", "MemoryStore", "StoreError", "open_store",
           "STORE_KINDS"]
