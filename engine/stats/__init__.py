"""Migration statistics, in three parts as in QEMU:

* :mod:`engine.stats.accumulator` - :class:`StatsAccumulator`, the running
  counters a migration loop feeds and the figures QEMU derives from them
  (migration-stats.c);
* :mod:`engine.stats.view` - :class:`MigrationInfo` and :class:`RamStats`,
  the frozen ``query-migrate`` answer with QEMU's member names and presence
  rules, and the destination's postcopy fault members;
* :mod:`engine.stats.hmp` - :func:`format_info_migrate`, HMP ``info migrate``.

The view is the lowest of the three (the accumulator's snapshots are views;
the HMP text renders one).  Everything is re-exported here.
"""
from __future__ import annotations

from engine.stats.view import (POSTCOPY_BLOCKTIME_FIELDS, POSTCOPY_LATENCY_BUCKETS,
                               MigrationInfo, RamStats, latency_bucket, postcopy_fields)
from engine.stats.accumulator import (BUFFER_DELAY_MS, DIRTY_RATE_PERIOD_MS,
                                      StatsAccumulator)
from engine.stats.hmp import format_info_migrate

__all__ = [
    "RamStats",
    "MigrationInfo",
    "StatsAccumulator",
    "format_info_migrate",
    "postcopy_fields",
    "latency_bucket",
    "BUFFER_DELAY_MS",
    "DIRTY_RATE_PERIOD_MS",
    "POSTCOPY_BLOCKTIME_FIELDS",
    "POSTCOPY_LATENCY_BUCKETS",
]
