"""The QMP command table: QEMU's names, arguments and OOB flags, onto a Machine.

Each row names a command as QEMU 10.2 spells it (``migrate_cancel`` keeps
its underscore), its arguments as QAPI declares them (qapi/migration.json,
qapi/run-state.json, qapi/misc.json, qapi/yank.json) and whether QEMU marks
it ``allow-oob``.  :class:`Commands` is the server's dispatcher: it looks a
request up, refuses what QEMU refuses (unknown command, ``exec-oob`` of a
command without ``allow-oob``, bad arguments), and calls the machine - under
its big lock for in-band commands, without it out of band.

Commands named ``x-engine-...`` are this engine's own (QEMU's ``x-``
prefix marks what is not a stable interface): ``x-engine-check-ab`` runs
QEMU's a-b memory check on a stopped guest, ``x-engine-memory-digests``
hashes its RAM blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from engine.options import CAPABILITIES, PARAMETERS, ParameterSpec
from engine.qmp import dirtylimit
from engine.qmp.channels import MIGRATION_CHANNEL
from engine.qmp.errors import ERROR_CLASS_COMMAND_NOT_FOUND, ERROR_CLASS_GENERIC, QMPError
from engine.qmp.machine import Machine
from engine.qmp.protocol import Request
from engine.qmp.schema import (ANY, BOOL, INT, STR, STR_OR_NULL, Arg, Enum, ListOf, Struct,
                               Type, Union, check_arguments)
from engine.state import MigrationStatus

__all__ = ["Command", "COMMANDS", "Commands", "PARAMETER_ARGS"]


@dataclass(frozen=True)
class Command:
    """One QMP command: its arguments, whether it may run out of band, and
    ``call(machine, arguments) -> return value``."""
    args: tuple[Arg, ...]
    call: Callable[[Machine, dict], Any]
    allow_oob: bool = False


def _parameter_type(spec: ParameterSpec) -> Type:
    if spec.kind in ("size", "uint"):
        return INT
    if spec.kind == "bool":
        return BOOL
    if spec.kind == "enum":
        return Enum(spec.choices)
    if spec.kind == "str":
        return STR_OR_NULL      # QEMU: tls-creds & co. are StrOrNull
    return ListOf(ANY)


#: migrate-set-parameters' members: every parameter, optional, typed as in QAPI
PARAMETER_ARGS: tuple[Arg, ...] = tuple(
    Arg(name, _parameter_type(spec), optional=True) for name, spec in PARAMETERS.items())

_CAPABILITY_STATUS = Struct((Arg("capability", Enum(CAPABILITIES)), Arg("state", BOOL)))

#: qapi/yank.json's YankInstance ('migration' has no members of its own)
_YANK_INSTANCE = Union((Arg("type", Enum(("block-node", "chardev", "migration"))),), "type",
                       {"block-node": Struct((Arg("node-name", STR),)),
                        "chardev": Struct((Arg("id", STR),))})
_CHANNELS = ListOf(MIGRATION_CHANNEL)
_TIME_UNIT = Enum(("second", "millisecond"))
_DIRTY_RATE_MODE = Enum(("page-sampling", "dirty-ring", "dirty-bitmap"))


def _query_commands(machine: Machine, args: dict) -> list:
    return [{"name": n} for n in ("qmp_capabilities", *COMMANDS)]


def _query_version(machine: Machine, args: dict) -> dict:
    from engine.qmp.protocol import default_version
    return default_version()


# fmt: off
COMMANDS: Mapping[str, Command] = MappingProxyType({
    # qapi/control.json and misc.json
    "query-version":   Command((), _query_version),
    "query-commands":  Command((), _query_commands),
    # qapi/run-state.json
    "query-status":    Command((), lambda m, a: m.query_status()),
    "stop":            Command((), lambda m, a: m.stop()),
    "cont":            Command((), lambda m, a: m.cont()),
    "quit":            Command((), lambda m, a: m.quit()),
    # qapi/migration.json
    # (blk and inc went in QEMU 9.1: passing them is "Parameter 'blk' is unexpected")
    "migrate":         Command((Arg("uri", STR, True), Arg("channels", _CHANNELS, True),
                                Arg("detach", BOOL, True), Arg("resume", BOOL, True)),
                               lambda m, a: m.migrate(a.get("uri"), channels=a.get("channels"),
                                                      detach=a.get("detach", False),
                                                      resume=a.get("resume", False))),
    "migrate-incoming": Command((Arg("uri", STR, True), Arg("channels", _CHANNELS, True),
                                 Arg("exit-on-error", BOOL, True)),
                                lambda m, a: m.migrate_incoming(
                                    a.get("uri"), channels=a.get("channels"),
                                    exit_on_error=a.get("exit-on-error", True))),
    "migrate-set-capabilities": Command((Arg("capabilities", ListOf(_CAPABILITY_STATUS)),),
                                        lambda m, a: m.migrate_set_capabilities(
                                            a["capabilities"])),
    "query-migrate-capabilities": Command((), lambda m, a: m.query_migrate_capabilities()),
    "migrate-set-parameters": Command(PARAMETER_ARGS,
                                      lambda m, a: m.migrate_set_parameters(a)),
    "query-migrate-parameters": Command((), lambda m, a: m.query_migrate_parameters()),
    "query-migrate":   Command((), lambda m, a: m.query_migrate()),
    "migrate_cancel":  Command((), lambda m, a: m.migrate_cancel()),
    "migrate-continue": Command((Arg("state", Enum([s.value for s in MigrationStatus])),),
                                lambda m, a: m.migrate_continue(a["state"])),
    "migrate-start-postcopy": Command((), lambda m, a: m.migrate_start_postcopy()),
    "migrate-pause":   Command((), lambda m, a: m.migrate_pause(), allow_oob=True),
    "migrate-recover": Command((Arg("uri", STR),), lambda m, a: m.migrate_recover(a["uri"]),
                               allow_oob=True),
    "query-migrationthreads": Command((), lambda m, a: m.query_migrationthreads()),
    "calc-dirty-rate": Command((Arg("calc-time", INT), Arg("calc-time-unit", _TIME_UNIT, True),
                                Arg("sample-pages", INT, True),
                                Arg("mode", _DIRTY_RATE_MODE, True)),
                               lambda m, a: m.dirty_rate.calc(
                                   a["calc-time"], a.get("calc-time-unit"),
                                   a.get("sample-pages"), a.get("mode"))),
    "query-dirty-rate": Command((Arg("calc-time-unit", _TIME_UNIT, True),),
                                lambda m, a: m.dirty_rate.query(a.get("calc-time-unit"))),
    "set-vcpu-dirty-limit": Command((Arg("cpu-index", INT, True), Arg("dirty-rate", INT)),
                                    lambda m, a: dirtylimit.set_vcpu_dirty_limit(
                                        m, a["dirty-rate"], a.get("cpu-index"))),
    "cancel-vcpu-dirty-limit": Command((Arg("cpu-index", INT, True),),
                                       lambda m, a: dirtylimit.cancel_vcpu_dirty_limit(
                                           m, a.get("cpu-index"))),
    "query-vcpu-dirty-limit": Command((), lambda m, a: dirtylimit.query_vcpu_dirty_limit(m)),
    # qapi/yank.json
    "yank":            Command((Arg("instances", ListOf(_YANK_INSTANCE)),),
                               lambda m, a: m.yank(a["instances"]), allow_oob=True),
    "query-yank":      Command((), lambda m, a: m.query_yank(), allow_oob=True),
    # this engine's own
    "x-engine-check-ab":       Command((), lambda m, a: m.x_check_ab()),
    "x-engine-memory-digests": Command((), lambda m, a: m.x_memory_digests()),
})
"""Every command an ``engine vm`` monitor knows (besides qmp_capabilities)."""
# fmt: on


class Commands:
    """The dispatcher of a :class:`~engine.qmp.server.QMPServer` for ``machine``."""

    def __init__(self, machine: Machine):
        self.machine = machine

    def execute(self, request: Request) -> Any:
        cmd = COMMANDS.get(request.command)
        if cmd is None:
            raise QMPError(ERROR_CLASS_COMMAND_NOT_FOUND,
                           f"The command {request.command} has not been found")
        if request.oob and not cmd.allow_oob:
            raise QMPError(ERROR_CLASS_GENERIC,
                           f"The command {request.command} does not support OOB")
        args = check_arguments(cmd.args, request.arguments)
        if request.oob:
            return cmd.call(self.machine, args)
        with self.machine.lock:
            return cmd.call(self.machine, args)
