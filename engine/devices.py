"""QEMU's own non-iterative devices that every stream carries, as vmsds.

A QEMU ``-M none`` guest sends exactly two FULL sections besides RAM:

* ``timer`` (QEMU's cpu-timers state, vmsd version 2, minimum 1):
  ``int64 cpu_ticks_offset``, 8 unused bytes (a field dropped long ago),
  ``int64 cpu_clock_offset`` (only from version 2), and the ``timer/icount``
  subsection tree that only an ``-icount`` guest sends.
* ``globalstate`` (version 1): ``uint32 size`` then a 100-byte NUL-padded
  ``runstate`` name; ``size`` counts the name and its NUL (``"prelaunch"`` ->
  10), and the destination resumes into that run state.

Layouts checked against the 7.2 capture's bytes and its VMDESCRIPTION JSON.
"""
from __future__ import annotations

from typing import Any, Mapping

from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.stream.vmstate import Field, Subsection, VMStateDescription, present

_ICOUNT_WARP_TIMER_VMSD = VMStateDescription(
    name="timer/icount/warp_timer", version_id=1, minimum_version_id=1,
    fields=(Field("vm_clock_warp_start", "int64"), Field("icount_warp_timer", "timer")))

_ICOUNT_TIMERS_VMSD = VMStateDescription(
    name="timer/icount/timers", version_id=1, minimum_version_id=1,
    fields=(Field("icount_rt_timer", "timer"), Field("icount_vm_timer", "timer")))

_ICOUNT_SHIFT_VMSD = VMStateDescription(
    name="timer/icount/shift", version_id=2, minimum_version_id=2,
    fields=(Field("icount_time_shift", "int16"), Field("last_delta", "int64")))

_ICOUNT_VMSD = VMStateDescription(
    name="timer/icount", version_id=1, minimum_version_id=1,
    fields=(Field("qemu_icount_bias", "int64"), Field("qemu_icount", "int64")),
    subsections=tuple(Subsection(v, present(v.name)) for v in (
        _ICOUNT_WARP_TIMER_VMSD, _ICOUNT_TIMERS_VMSD, _ICOUNT_SHIFT_VMSD)))

#: QEMU's ``timer`` section (idstr "timer", instance 0).  Values:
#: ``cpu_ticks_offset`` (host ticks) and ``cpu_clock_offset`` (ns), both int64.
TIMER_VMSD = VMStateDescription(
    name="timer", version_id=2, minimum_version_id=1,
    fields=(
        Field("cpu_ticks_offset", "int64"),
        Field("unused", "unused_buffer", size=8),
        Field("cpu_clock_offset", "int64", version_id=2),
    ),
    subsections=(Subsection(_ICOUNT_VMSD, present(_ICOUNT_VMSD.name)),))

GLOBALSTATE_RUNSTATE_SIZE = 100  #: bytes of the NUL-padded run state name

#: QEMU's ``globalstate`` section (idstr "globalstate", instance 0).
GLOBALSTATE_VMSD = VMStateDescription(
    name="globalstate", version_id=1, minimum_version_id=1,
    fields=(
        Field("size", "uint32"),
        Field("runstate", "buffer", size=GLOBALSTATE_RUNSTATE_SIZE),
    ))

#: QEMU's RunState names (qapi/run-state.json); a destination refuses any other.
RUNSTATES = (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
    "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm", "shutdown",
    "suspended", "watchdog", "guest-panicked", "colo",
)

#: vmsd by idstr, for a ``lookup_vmsd`` of a QEMU ``-M none`` machine.
QEMU_DEVICE_VMSDS: dict[str, VMStateDescription] = {
    "timer": TIMER_VMSD,
    "globalstate": GLOBALSTATE_VMSD,
}


def lookup_qemu_vmsd(idstr: str, instance_id: int) -> VMStateDescription | None:
    """The ``lookup_vmsd`` of a StreamDecoder reading a QEMU ``-M none`` stream."""
    return QEMU_DEVICE_VMSDS.get(idstr) if instance_id == 0 else None


def timer_values(cpu_ticks_offset: int = 0, cpu_clock_offset: int = 0) -> dict[str, Any]:
    """Values for :data:`TIMER_VMSD` (no icount)."""
    return {"cpu_ticks_offset": cpu_ticks_offset, "cpu_clock_offset": cpu_clock_offset}


def globalstate_values(runstate: str) -> dict[str, Any]:
    """Values for :data:`GLOBALSTATE_VMSD` carrying ``runstate`` (e.g. ``"running"``)."""
    name = runstate.encode("ascii")
    if len(name) >= GLOBALSTATE_RUNSTATE_SIZE or b"\0" in name:
        raise LocalProtocolError(f"run state name {runstate!r} does not fit globalstate")
    return {"size": len(name) + 1,
            "runstate": name.ljust(GLOBALSTATE_RUNSTATE_SIZE, b"\0")}


def globalstate_runstate(values: Mapping[str, Any]) -> str:
    """The run state a decoded globalstate carries.

    Raises :class:`RemoteProtocolError` when the name is not NUL terminated,
    disagrees with ``size``, or is not a QEMU run state.
    """
    raw = bytes(values["runstate"])
    end = raw.find(b"\0")
    if end < 0:
        raise RemoteProtocolError("globalstate: run state name is not NUL terminated")
    name = raw[:end].decode("ascii", "replace")
    if values.get("size") != end + 1:
        raise RemoteProtocolError(
            f"globalstate: size {values.get('size')} does not match run state {name!r}")
    if name not in RUNSTATES:
        raise RemoteProtocolError(f"globalstate: unknown run state {name!r}")
    return name


__all__ = ["TIMER_VMSD", "GLOBALSTATE_VMSD", "GLOBALSTATE_RUNSTATE_SIZE", "RUNSTATES",
           "QEMU_DEVICE_VMSDS", "lookup_qemu_vmsd", "timer_values", "globalstate_values",
           "globalstate_runstate"]
