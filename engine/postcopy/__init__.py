"""Postcopy: QEMU's postcopy-ram.c re-thought for vCPU processes.

The destination's vCPUs run before all of guest RAM has arrived.  Each vCPU
registers its own mapping of the RAM blocks with userfaultfd and hands the
descriptor to the fault handler (a process of its own, so a faulting guest
thread never holds a lock the handler needs); the handler asks the source
for missing pages on the return path and places them atomically.  Where
userfaultfd is not available, vCPUs check a shared "received" bitmap before
they touch memory and ask the handler themselves (software faults).

Modules:

* :mod:`engine.uffd` - userfaultfd through ctypes, hole punching (below ram and postcopy);
* :mod:`engine.ram.faultproto` - the messages between vCPUs and the fault handler;
* :mod:`placer` - atomic page placement (UFFDIO_COPY, or a lock + bitmap);
* :mod:`handler` - the fault handler, seen from the coordinator;
* :mod:`faultloop` - the fault handler process and its poll loop;
* :mod:`control` - the typed messages between the two;
* :mod:`blocktime` - the blocked-time and fault-latency statistics;
* :mod:`lock` - the lock the coordinator and the handler share.
"""
