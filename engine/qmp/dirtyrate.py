"""QMP ``calc-dirty-rate`` and ``query-dirty-rate`` (QEMU's migration/dirtyrate.c).

``calc-dirty-rate`` checks its arguments as QEMU does (with QEMU's error
texts), then measures in a background thread of the VM
(:func:`engine.ram.dirtyrate.measure_dirty_rate`) and returns at once;
``query-dirty-rate`` reports the status (``unstarted`` -> ``measuring`` ->
``measured``) and, once measured, the rate: QEMU's DirtyRateInfo.  A new
calculation may start once the previous one is measured; one measuring is
refused.  Each :class:`~engine.qmp.machine.Machine` has one
:class:`DirtyRateCalculation` (its ``dirty_rate``), ended by its ``close``.
"""
from __future__ import annotations

import threading
import time

from engine.errors import EngineError
from engine.qmp.errors import ERROR_CLASS_GENERIC, QMPError
from engine.ram.dirtyrate import (DEFAULT_SAMPLE_PAGES, MAX_CALC_TIME_MS, MAX_SAMPLE_PAGES,
                                  MIN_CALC_TIME_MS, MIN_SAMPLE_PAGES, measure_dirty_rate)

__all__ = ["DirtyRateCalculation", "UNSTARTED", "MEASURING", "MEASURED"]

UNSTARTED, MEASURING, MEASURED = "unstarted", "measuring", "measured"
#: QEMU's TimeUnit, in milliseconds
_UNIT_MS = {"second": 1000, "millisecond": 1}


def _error(desc: str) -> QMPError:
    return QMPError(ERROR_CLASS_GENERIC, desc)


class DirtyRateCalculation:
    """The last (or current) calculation of one guest."""

    def __init__(self, guest):
        self.guest = guest
        self._lock = threading.Lock()
        self.status = UNSTARTED
        self.mode = "page-sampling"
        self.sample_pages = DEFAULT_SAMPLE_PAGES
        self.start_time = 0
        self.calc_time_ms = 0
        self.dirty_rate: int | None = None
        self.vcpu_rates: list[int] | None = None
        self._thread: threading.Thread | None = None
        #: set by close(): a measuring thread ends its wait
        self._cancel = threading.Event()

    def calc(self, calc_time: int, calc_time_unit: str | None = None,
             sample_pages: int | None = None, mode: str | None = None) -> dict:
        """QMP calc-dirty-rate."""
        with self._lock:
            if self.status == MEASURING:
                raise _error("the dirty rate is already being measured.")
            calc_ms = calc_time * _UNIT_MS[calc_time_unit or "second"]
            if not MIN_CALC_TIME_MS <= calc_ms <= MAX_CALC_TIME_MS:
                raise _error(f"Calculation time is out of range "
                             f"[{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms].")
            mode = mode or "page-sampling"
            if sample_pages is not None and mode != "page-sampling":
                raise _error("sample-pages is used only in page-sampling mode")
            if sample_pages is None:
                sample_pages = DEFAULT_SAMPLE_PAGES
            elif not MIN_SAMPLE_PAGES <= sample_pages <= MAX_SAMPLE_PAGES:
                raise _error(f"sample-pages is out of range[{MIN_SAMPLE_PAGES}, "
                             f"{MAX_SAMPLE_PAGES}].")
            self.mode, self.sample_pages, self.calc_time_ms = mode, sample_pages, calc_ms
            self.dirty_rate = self.vcpu_rates = None
            self.start_time = int(time.time())
            self.status = MEASURING
            self._thread = threading.Thread(target=self._measure,
                                            args=(mode, calc_ms, sample_pages),
                                            name="dirtyrate", daemon=True)
            self._thread.start()
        return {}

    def _measure(self, mode: str, calc_ms: int, sample_pages: int) -> None:
        try:
            result = measure_dirty_rate(self.guest, mode, calc_ms, sample_pages,
                                        cancel=self._cancel)
            rate, elapsed = result.dirty_rate, result.calc_time_ms
            vcpus = result.vcpu_rates if mode == "dirty-ring" else None
        except EngineError:
            # The guest went away under the measurement: nothing was dirtied
            # that anyone can migrate.
            rate, elapsed, vcpus = 0, calc_ms, [] if mode == "dirty-ring" else None
        with self._lock:
            self.dirty_rate, self.calc_time_ms, self.vcpu_rates = rate, elapsed, vcpus
            self.status = MEASURED

    def query(self, calc_time_unit: str | None = None) -> dict:
        """QMP query-dirty-rate: QEMU's DirtyRateInfo."""
        unit = calc_time_unit or "second"
        with self._lock:
            info: dict = {}
            if self.status == MEASURED:
                info["dirty-rate"] = self.dirty_rate
            info.update({"status": self.status, "start-time": self.start_time,
                         "calc-time": self.calc_time_ms // _UNIT_MS[unit],
                         "calc-time-unit": unit, "sample-pages": self.sample_pages,
                         "mode": self.mode})
            if self.status == MEASURED and self.vcpu_rates is not None:
                info["vcpu-dirty-rate"] = [{"id": i, "dirty-rate": r}
                                           for i, r in enumerate(self.vcpu_rates)]
            return info

    def close(self, timeout: float = 5.0) -> None:
        """End a measurement in progress (the VM is going away)."""
        self._cancel.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
