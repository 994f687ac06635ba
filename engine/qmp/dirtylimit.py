"""QMP ``set-vcpu-dirty-limit``, ``cancel-vcpu-dirty-limit``, ``query-vcpu-dirty-limit``.

QEMU's system/dirtylimit.c commands with its checks and error texts, onto
the guest's dirty area (:mod:`engine.ram.dirtylimit`): a quota in MB/s per
vCPU (or for all of them), a dirty rate of 0 cancels, and while a migration
with the ``dirty-limit`` capability has the limit in service the user may
neither set nor cancel it (QEMU's dirtylimit_is_allowed).  QEMU needs KVM's
dirty ring for any of this; every engine guest can.
"""
from __future__ import annotations

from engine.qmp.errors import ERROR_CLASS_GENERIC, QMPError
from engine.state import ACTIVE_STATES

__all__ = ["set_vcpu_dirty_limit", "cancel_vcpu_dirty_limit", "query_vcpu_dirty_limit"]


def _error(desc: str) -> QMPError:
    return QMPError(ERROR_CLASS_GENERIC, desc)


def _check_index(machine, cpu_index: int | None) -> None:
    if cpu_index is not None and not 0 <= cpu_index < machine.guest.dirty_area.nvcpus:
        raise _error("incorrect cpu index specified")


def _allowed(machine) -> bool:
    mig = machine.outgoing
    return not (mig is not None and mig.state.status in ACTIVE_STATES
                and mig.options.cap("dirty-limit") and machine.guest.dirty_area.in_service)


def set_vcpu_dirty_limit(machine, dirty_rate: int, cpu_index: int | None = None) -> dict:
    _check_index(machine, cpu_index)
    if not _allowed(machine):
        raise _error("can't set dirty page rate limit while migration is running")
    if dirty_rate < 0:
        raise _error("Parameter 'dirty-rate' expects uint64")
    machine.guest.dirty_area.set_limit(dirty_rate, cpu_index)
    return {}


def cancel_vcpu_dirty_limit(machine, cpu_index: int | None = None) -> dict:
    _check_index(machine, cpu_index)
    if not _allowed(machine):
        raise _error("can't cancel dirty page rate limit while migration is running")
    machine.guest.dirty_area.cancel(cpu_index)
    return {}


def query_vcpu_dirty_limit(machine) -> list:
    return machine.guest.dirty_area.limits()
