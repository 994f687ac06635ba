"""Machine profiles: what a guest looks like on the wire besides its RAM.

QEMU's equivalent is the machine type plus every device that registered a
vmstate handler (hw/, migration/global_state.c, softmmu/cpu-timers.c).  A
profile fixes

* the machine type name sent in the configuration section (the destination
  refuses a stream whose machine differs from its own, as QEMU does);
* the non-iterative devices, each with its idstr, instance id, section id and
  vmstate description, and how to read it from / write it into a guest;
* the default name of the RAM block.

Profile ``none`` is byte-compatible with ``qemu-system-x86_64 -M none`` (7.2):
devices ``timer`` (section 0) and ``globalstate`` (section 4), RAM section 2,
one RAM block named after the memory backend (``m0``).  Profile ``engine``
adds the engine's own devices so that device state really moves with the
guest: one ``cpu`` section per vCPU (its register file; the `ab` workload
resumes from it) and ``counter`` (a value the running guest keeps changing).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from engine.devices import (GLOBALSTATE_VMSD, TIMER_VMSD, globalstate_runstate,
                            globalstate_values)
from engine.errors import ConfigError, RemoteProtocolError
from engine.options import MigrationOptions
from engine.stream.vmstate import Field, VMStateDescription

#: QEMU numbers savevm handlers in registration order; for ``-M none`` the
#: timer registers first, then RAM, then the global state.
TIMER_SECTION_ID = 0
RAM_SECTION_ID = 2
GLOBALSTATE_SECTION_ID = 4

CPU_REGISTERS = 16

CPU_VMSD = VMStateDescription(
    name="cpu", version_id=1, minimum_version_id=1,
    fields=(Field("regs", "uint64", array_len=CPU_REGISTERS),))

COUNTER_VMSD = VMStateDescription(
    name="counter", version_id=1, minimum_version_id=1,
    fields=(Field("value", "uint64"),))


class GuestState:
    """What devices read and write: the live guest plus a few scalars.

    ``guest`` may be ``None`` on a destination that has not created its
    guest yet; devices then only record what they loaded.
    """

    def __init__(self, guest=None, runstate: str = "prelaunch"):
        self.guest = guest
        self.runstate = runstate
        #: nanoseconds the guest has run, QEMU's cpu_clock_offset in spirit
        self.clock_ns = 0
        self._started_at: float | None = None
        #: values of every device section loaded on a destination
        self.loaded: dict[str, dict] = {}

    def note_started(self) -> None:
        self._started_at = time.monotonic()

    def note_stopped(self) -> None:
        if self._started_at is not None:
            self.clock_ns += int((time.monotonic() - self._started_at) * 1e9)
            self._started_at = None


@dataclass(frozen=True)
class Device:
    """One non-iterative savevm handler (a FULL section)."""
    idstr: str
    instance_id: int
    section_id: int
    vmsd: VMStateDescription
    save: Callable[[GuestState], Mapping[str, Any]]
    load: Callable[[GuestState, Mapping[str, Any]], None]


def _timer_save(st: GuestState) -> dict:
    return {"cpu_ticks_offset": 0, "cpu_clock_offset": st.clock_ns}


def _timer_load(st: GuestState, values: Mapping[str, Any]) -> None:
    st.clock_ns = int(values.get("cpu_clock_offset", 0))


def _globalstate_save(st: GuestState) -> dict:
    return globalstate_values(st.runstate)


def _globalstate_load(st: GuestState, values: Mapping[str, Any]) -> None:
    st.runstate = globalstate_runstate(values)


def _cpu_save(index: int):
    def save(st: GuestState) -> dict:
        return {"regs": [int(r) for r in st.guest.registers[index]]}
    return save


def _cpu_load(index: int):
    def load(st: GuestState, values: Mapping[str, Any]) -> None:
        regs = st.guest.registers
        if index >= len(regs):
            raise RemoteProtocolError(
                f"stream carries cpu {index} but this guest has {len(regs)} vCPUs")
        regs[index][:] = values["regs"]
    return load


def _counter_save(st: GuestState) -> dict:
    return {"value": int(st.guest.counter)}


def _counter_load(st: GuestState, values: Mapping[str, Any]) -> None:
    st.guest.counter = int(values["value"])


def _qemu_none_devices(vcpus: int) -> list[Device]:
    return [
        Device("timer", 0, TIMER_SECTION_ID, TIMER_VMSD, _timer_save, _timer_load),
        Device("globalstate", 0, GLOBALSTATE_SECTION_ID, GLOBALSTATE_VMSD,
               _globalstate_save, _globalstate_load),
    ]


def _engine_devices(vcpus: int) -> list[Device]:
    devs = _qemu_none_devices(vcpus)
    next_id = GLOBALSTATE_SECTION_ID + 1
    for i in range(vcpus):
        devs.append(Device("cpu", i, next_id + i, CPU_VMSD, _cpu_save(i), _cpu_load(i)))
    devs.append(Device("counter", 0, next_id + vcpus, COUNTER_VMSD,
                       _counter_save, _counter_load))
    return devs


@dataclass(frozen=True)
class MachineProfile:
    """A machine type: its name on the wire, RAM block name and devices.

    ``compat`` is what the machine type sets on the migration object (QEMU's
    machine compat properties: ``-global`` values a versioned machine type
    implies) and ``parameter_defaults`` the migration parameters it starts
    from, both overridden by what the user sets.
    """
    name: str
    type_name: str
    default_ram_id: str
    _devices: Callable[[int], list[Device]] = field(repr=False)
    description: str = ""
    compat: Mapping[str, bool] = field(default_factory=dict)
    parameter_defaults: Mapping[str, Any] = field(default_factory=dict)

    def devices(self, vcpus: int) -> list[Device]:
        return self._devices(vcpus)

    def default_options(self) -> MigrationOptions:
        """QEMU's defaults as this machine type leaves them: what a migration
        starts from before the user sets anything."""
        return MigrationOptions.default().with_properties(self.compat).with_parameters(
            self.parameter_defaults)

    def lookup(self, vcpus: int) -> Callable[[str, int], VMStateDescription | None]:
        """The vmsd lookup a stream decoder needs for FULL sections."""
        table = {(d.idstr, d.instance_id): d.vmsd for d in self.devices(vcpus)}
        return lambda idstr, instance_id: table.get((idstr, instance_id))


PROFILES: dict[str, MachineProfile] = {
    "none": MachineProfile(
        "none", "none", "m0", _qemu_none_devices,
        "QEMU's empty machine (-M none): timer, globalstate, one RAM block"),
    "none-7.2": MachineProfile(
        "none-7.2", "none", "m0", _qemu_none_devices,
        "QEMU 7.2's -M none on the wire: multifd synced at every RAM section, zero "
        "pages on the main channel, no SWITCHOVER_START",
        compat={"multifd-flush-after-each-section": True, "send-switchover-start": False},
        parameter_defaults={"zero-page-detection": "legacy"}),
    "engine": MachineProfile(
        "engine", "engine-1.0", "ram0", _engine_devices,
        "timer, globalstate, one 'cpu' section per vCPU and a 'counter'"),
}


def get_profile(name: str) -> MachineProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown machine {name!r}; known: {', '.join(PROFILES)}") from None
