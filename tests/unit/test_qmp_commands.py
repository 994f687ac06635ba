"""The command table over a real Machine, in process (no sockets for QMP).

Guests here have no vCPU processes (``vcpus=0``: start and stop flip the
run flag), so a whole precopy between two machines takes a fraction of a
second; the checks are QEMU's texts, run states, events and their order.
"""
from __future__ import annotations

import threading
import time

import pytest

from engine.machine import get_profile
from engine.options import MigrationOptions
from engine.qmp.commands import COMMANDS, Commands
from engine.qmp.errors import QMPError
from engine.qmp.machine import Machine
from engine.qmp.protocol import NO_ID, Request
from engine.ram.guest import Guest
from engine.ram.workloads import WorkloadSpec

RAM = 4 << 20
WAIT = 30.0


class VM:
    """A Machine with a recorder for its events, driven through Commands."""

    def __init__(self, guest, **kw):
        self.events: list[tuple[str, dict | None]] = []
        self._lock = threading.Lock()
        self.guest = guest
        self.machine = Machine(guest, get_profile("engine"), MigrationOptions.default(),
                               vcpus=guest.nvcpus, emit=self._emit, **kw)
        self.commands = Commands(self.machine)

    def _emit(self, name, data=None):
        with self._lock:
            self.events.append((name, data))

    def __call__(self, command, oob=False, **arguments):
        return self.commands.execute(Request(command, arguments, NO_ID, oob))

    def error(self, command, oob=False, **arguments) -> str:
        with pytest.raises(QMPError) as info:
            self(command, oob, **arguments)
        return info.value.desc

    def status(self) -> str:
        return self("query-status")["status"]

    def migration_events(self) -> list[str]:
        """MIGRATION statuses and STOP/RESUME, in order (passes left out)."""
        with self._lock:
            return [d["status"] if n == "MIGRATION" else n for n, d in self.events
                    if n in ("MIGRATION", "STOP", "RESUME")]

    def wait_migration(self, *statuses) -> dict:
        deadline = time.monotonic() + WAIT
        while True:
            info = self("query-migrate")
            if info.get("status") in statuses:
                return info
            assert time.monotonic() < deadline, info
            time.sleep(0.005)


@pytest.fixture
def make_vm():
    made = []

    def make(vcpus=0, workload="none", **kw):
        guest = Guest.create([("ram0", RAM)], vcpus=vcpus,
                             workload=WorkloadSpec(workload, dirty_rate_mbps=1), start=False)
        try:
            vm = VM(guest, workload=workload, **kw)
        except BaseException:
            guest.close()
            raise
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.machine.close(10)
        vm.guest.close()


def _events_on(*vms):
    for vm in vms:
        vm("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])


# -- run state ------------------------------------------------------------------------

def test_initial_run_states_like_qemu_system(make_vm):
    running, paused, incoming = make_vm(), make_vm(start_paused=True), make_vm(incoming="defer")
    assert running("query-status") == {"status": "running", "running": True}
    assert paused.status() == "prelaunch" and incoming.status() == "inmigrate"
    assert running.guest.running and not paused.guest.running


def test_stop_and_cont_raise_stop_and_resume(make_vm):
    vm = make_vm(start_paused=True)
    vm("stop")                              # prelaunch: nothing runs, nothing to say
    assert vm.status() == "prelaunch" and vm.events == []
    vm("cont")
    vm("cont")                              # already running: no second RESUME
    vm("stop")
    vm("stop")
    assert vm.status() == "paused" and not vm.guest.running
    vm("cont")
    assert [n for n, _ in vm.events] == ["RESUME", "STOP", "RESUME"]
    assert all(d is None for _, d in vm.events)


def test_stop_and_cont_while_waiting_for_a_migration_choose_autostart(make_vm):
    vm = make_vm(incoming="defer")
    vm("stop")
    assert not vm.machine.autostart
    vm("cont")
    assert vm.machine.autostart and vm.status() == "inmigrate" and vm.events == []


def test_quit_asks_the_owner_to_end(make_vm):
    vm = make_vm()
    assert vm("quit") == {}
    assert vm.machine.shutdown_requested.is_set() and vm.machine.exit_code == 0


# -- QEMU's refusals ------------------------------------------------------------------

def test_dispatch_refusals(make_vm):
    vm = make_vm()
    with pytest.raises(QMPError) as info:
        vm("migrate-cancel")
    assert info.value.error_class == "CommandNotFound"
    assert info.value.desc == "The command migrate-cancel has not been found"
    assert vm.error("query-status", oob=True) == "The command query-status does not support OOB"
    assert vm.error("migrate") == "need either 'uri' or 'channels' argument"
    assert vm.error("migrate", uri="unix:/x", detach="no") == \
        "Invalid parameter type for 'detach', expected: boolean"


def test_the_table_has_qemus_migration_commands_and_oob_flags():
    names = {"qmp_capabilities"} | set(COMMANDS)
    assert {"query-status", "stop", "cont", "quit", "migrate", "migrate-incoming",
            "migrate-set-capabilities", "query-migrate-capabilities", "migrate-set-parameters",
            "query-migrate-parameters", "query-migrate", "migrate_cancel", "migrate-pause",
            "migrate-recover", "migrate-continue", "migrate-start-postcopy"} <= names
    assert {n for n, c in COMMANDS.items() if c.allow_oob} == {"migrate-pause", "migrate-recover",
                                                              "yank", "query-yank"}


def test_query_commands_and_version(make_vm):
    vm = make_vm()
    listed = {c["name"] for c in vm("query-commands")}
    assert "migrate_cancel" in listed and "qmp_capabilities" in listed
    assert vm("query-version")["package"].startswith("engine ")


def test_migration_commands_refused_without_a_migration(make_vm):
    vm = make_vm()
    assert vm("query-migrate") == {}
    assert vm("migrate_cancel") == {}
    assert vm.error("migrate", uri="unix:/nowhere", resume=True) == \
        "Cannot resume if there is no paused migration"
    assert vm.error("migrate-incoming", uri="unix:/x") == \
        "'-incoming' was not specified on the command line"
    assert vm.error("migrate-pause", oob=True) == ("migrate-pause is currently only supported "
                                                   "during postcopy-active or postcopy-recover state")
    assert vm.error("migrate-recover", oob=True, uri="unix:/x") == \
        "Migrate recover can only be run when postcopy is paused."
    assert vm.error("migrate-continue", state="pre-switchover") == \
        "Migration not in expected state: none"
    assert vm("migrate-continue", state="none") == {}     # as QEMU (it was a crash)
    assert vm.error("migrate-continue", state="bogus") == \
        "Parameter 'state' does not accept value 'bogus'"
    assert vm.error("migrate-start-postcopy") == \
        "Enable postcopy with migrate-set-capabilities before the start of migration"
    vm("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    assert vm.error("migrate-start-postcopy") == \
        "Postcopy must be started after migration has been started"
    assert "Invalid migration URI" in vm.error("migrate", uri="bogus:x")
    assert vm.error("migrate", uri="unix:/x", blk=True) == "Parameter 'blk' is unexpected"


def test_capabilities(make_vm):
    vm = make_vm()
    caps = {c["capability"]: c["state"] for c in vm("query-migrate-capabilities")}
    assert caps["events"] is False and "postcopy-ram" in caps
    assert vm.error("migrate-set-capabilities",
                    capabilities=[{"capability": "nope", "state": True}]) == \
        "Parameter 'capabilities[0].capability' does not accept value 'nope'"
    assert "rdma-pin-all" in vm.error(
        "migrate-set-capabilities", capabilities=[{"capability": "rdma-pin-all", "state": True}])
    assert "postcopy-ram" in vm.error(
        "migrate-set-capabilities", capabilities=[{"capability": "postcopy-preempt",
                                                   "state": True}])
    _events_on(vm)
    vm("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    caps = {c["capability"]: c["state"] for c in vm("query-migrate-capabilities")}
    assert caps["events"] and caps["multifd"]


def test_parameters(make_vm):
    vm = make_vm()
    params = vm("query-migrate-parameters")
    assert params["max-bandwidth"] == 128 << 20 and params["multifd-channels"] == 2
    assert vm.error("migrate-set-parameters", **{"max-bandwidth": "1G"}) == \
        "Invalid parameter type for 'max-bandwidth', expected: integer"
    assert vm.error("migrate-set-parameters", max_bandwidth=1) == \
        "Parameter 'max_bandwidth' is unexpected"
    assert vm.error("migrate-set-parameters", **{"multifd-compression": "lz4"}) == \
        "Parameter 'multifd-compression' does not accept value 'lz4'"
    assert "multifd-channels" in vm.error("migrate-set-parameters", **{"multifd-channels": 0})
    vm("migrate-set-parameters", **{"downtime-limit": 10, "multifd-channels": 4,
                                    "tls-creds": None})
    params = vm("query-migrate-parameters")
    assert params["downtime-limit"] == 10 and params["multifd-channels"] == 4


# -- migrations between two machines ----------------------------------------------------

def _pausing_pair(make_vm, tmp_path):
    """(source with pause-before-switchover, deferred destination, a unix URI),
    both sending events, the source's start-up events forgotten."""
    src, dst = make_vm(), make_vm(incoming="defer")
    src.events.clear()
    _events_on(src, dst)
    src("migrate-set-capabilities",
        capabilities=[{"capability": "pause-before-switchover", "state": True}])
    return src, dst, f"unix:{tmp_path}/mig.sock"


def test_precopy_with_pause_before_switchover(make_vm, tmp_path):
    src, dst, uri = _pausing_pair(make_vm, tmp_path)
    dst("migrate-incoming", uri=uri)
    info = dst("query-migrate")
    assert info == {"status": "setup", "socket-address": [
        {"type": "unix", "path": f"{tmp_path}/mig.sock"}]}
    assert dst.error("migrate-incoming", uri=uri) == \
        "The incoming migration has already been started"
    assert "before migrate-incoming" in dst.error(
        "migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    src("migrate", uri=uri)
    src.wait_migration("pre-switchover")
    assert src.status() == "finish-migrate"
    assert src.error("migrate", uri=uri) == "There's a migration process in progress"
    assert src.error("migrate-set-capabilities", capabilities=[]) == \
        "There's a migration process in progress"
    assert src.error("cont") == "Migration is not finalized yet"
    assert src.error("migrate-continue", state="active") == \
        "Migration not in expected state: pre-switchover"
    src("migrate-set-parameters", **{"max-bandwidth": 1 << 30})    # applies live
    src("migrate-continue", state="pre-switchover")
    done = src.wait_migration("completed", "failed")
    assert done["status"] == "completed" and done["ram"]["total"] == RAM
    assert dst.wait_migration("completed", "failed")["status"] == "completed"
    assert "socket-address" not in dst("query-migrate")

    assert src.migration_events() == ["setup", "active", "STOP", "pre-switchover",
                                      "device", "completed"]
    # The destination runs the guest before it says 'completed' (QEMU's order).
    assert dst.migration_events() == ["setup", "active", "RESUME", "completed"]
    passes = [d["pass"] for n, d in src.events if n == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and passes
    assert passes[-1] == done["ram"]["dirty-sync-count"]
    assert src.status() == "postmigrate" and dst.status() == "running"

    # QEMU: a migrated-away VM must be resumed before it can migrate again.
    assert src.error("migrate", uri=uri) == \
        "Can't migrate the vm that was paused due to previous migration"
    src("cont")
    assert src.status() == "running" and src.migration_events()[-1] == "RESUME"


def test_cancel_restarts_the_source_and_the_destination_reports_failure(make_vm, tmp_path):
    src, dst, uri = _pausing_pair(make_vm, tmp_path)
    dst("migrate-incoming", uri=uri, **{"exit-on-error": False})
    src("migrate", uri=uri)
    src.wait_migration("pre-switchover")
    src("migrate_cancel")
    assert src.wait_migration("cancelled")["status"] == "cancelled"
    failed = dst.wait_migration("failed")
    assert failed["error-desc"]
    assert src.status() == "running" and src.guest.running
    seen = src.migration_events()
    assert [e for e in seen if e not in ("STOP", "RESUME")] == [
        "setup", "active", "pre-switchover", "cancelling", "cancelled"]
    # (QEMU raises RESUME between cancelling and cancelled; the source driver
    # restarts the guest before it moves to cancelling.)
    assert seen.index("STOP") < seen.index("pre-switchover") < seen.index("RESUME")
    assert not dst.machine.shutdown_requested.is_set()      # exit-on-error false
    assert dst.status() == "inmigrate"


def test_a_failed_incoming_migration_ends_the_destination(make_vm, tmp_path):
    import socket
    dst = make_vm(incoming="defer")
    path = f"{tmp_path}/mig.sock"
    dst("migrate-incoming", uri=f"unix:{path}")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b"not a migration stream")
    assert dst.machine.shutdown_requested.wait(WAIT)
    assert dst.machine.exit_code == 1
    assert dst("query-migrate")["status"] == "failed"


def test_connect_failure_fails_the_migration_not_the_command(make_vm, tmp_path):
    src = make_vm()
    _events_on(src)
    src.events.clear()
    assert src("migrate", uri=f"unix:{tmp_path}/nobody") == {}
    info = src.wait_migration("failed")
    assert info["error-desc"]
    assert src.migration_events() == ["setup", "failed"]
    assert src.status() == "running"


# -- engine-specific ----------------------------------------------------------------------

def test_check_ab_needs_a_stopped_ab_guest(make_vm):
    plain = make_vm()
    assert "'none' workload" in plain.error("x-engine-check-ab")
    vm = make_vm(vcpus=1, workload="ab")
    assert "stop it first" in vm.error("x-engine-check-ab")
    vm("stop")
    result = vm("x-engine-check-ab")
    assert result["ok"] is True and result["bad-pages"] == 0
    digests = vm("x-engine-memory-digests")["blocks"]
    assert set(digests) == {"ram0"} and len(digests["ram0"]) == 64


def test_migration_events_need_the_events_capability(make_vm, tmp_path):
    src = make_vm()
    src.events.clear()
    src("migrate", uri=f"unix:{tmp_path}/nobody")
    src.wait_migration("failed")
    assert src.events == []         # no MIGRATION without 'events' (STOP/RESUME: always)
