"""QEMU 10's QMP in process: ``channels``, the schema's flat unions, the
commands QEMU 9.x/10.x changed or added (query-status, migrate without
blk/inc, query-migrationthreads, yank, query-yank) and the postcopy fault
figures' names.

The texts are QEMU 10.2's (migration/migration.c, util/yank.c, the QAPI
input visitor); machines are vCPU-less, as in test_qmp_commands.
"""
from __future__ import annotations

import socket
import subprocess
import sys

import psutil
import pytest

from engine.qmp.channels import MIGRATION_CHANNEL, NEED_URI_OR_CHANNELS, address_uri, \
    migration_uri
from engine.qmp.errors import QMPError
from engine.qmp.protocol import default_version
from engine.qmp.schema import Arg, ListOf, check_arguments
from engine.qmp.yank import channel_matcher, shutdown_process_sockets
from engine.stats import POSTCOPY_BLOCKTIME_FIELDS, latency_bucket, postcopy_fields
from tests.unit import test_qmp_commands

#: the vCPU-less machines of test_qmp_commands, driven through the command table
make_vm = test_qmp_commands.make_vm

CHANNELS = (Arg("channels", ListOf(MIGRATION_CHANNEL)),)


def main(addr: dict) -> dict:
    return {"channel-type": "main", "addr": addr}


def inet(host="127.0.0.1", port="4446", **more) -> dict:
    return {"transport": "socket", "type": "inet", "host": host, "port": port, **more}


def unix(path: str) -> dict:
    return {"transport": "socket", "type": "unix", "path": path}


def schema_error(channels) -> str:
    with pytest.raises(QMPError) as info:
        check_arguments(CHANNELS, {"channels": channels})
    return info.value.desc


def refusal(fn, *args, **kw) -> str:
    with pytest.raises(QMPError) as info:
        fn(*args, **kw)
    return info.value.desc


# -- the schema: MigrationChannel, a struct holding nested flat unions -------------------

def test_a_channel_is_checked_member_by_member_as_qemus_visitor_names_them():
    good = [main(inet())]
    assert check_arguments(CHANNELS, {"channels": good}) == {"channels": good}
    assert schema_error([{"addr": inet()}]) == "Parameter 'channels[0].channel-type' is missing"
    assert schema_error([{"channel-type": "second", "addr": inet()}]) == \
        "Parameter 'channels[0].channel-type' does not accept value 'second'"
    assert schema_error([main({"type": "inet"})]) == \
        "Parameter 'channels[0].addr.transport' is missing"
    assert schema_error([main({"transport": "pipe"})]) == \
        "Parameter 'channels[0].addr.transport' does not accept value 'pipe'"
    assert schema_error([main({"transport": "socket", "host": "h"})]) == \
        "Parameter 'channels[0].addr.type' is missing"
    assert schema_error([main(inet(port=4446))]) == \
        "Invalid parameter type for 'channels[0].addr.port', expected: string"
    no_port = inet()
    del no_port["port"]
    assert schema_error([main(no_port)]) == "Parameter 'channels[0].addr.port' is missing"
    # The variant's members sit beside the discriminators; others are leftovers.
    assert schema_error([main({**inet(), "path": "/x"})]) == \
        "Parameter 'channels[0].addr.path' is unexpected"
    assert schema_error([main({"transport": "file", "filename": "/f"})]) == \
        "Parameter 'channels[0].addr.offset' is missing"
    assert schema_error([{**main(inet()), "extra": 1}]) == \
        "Parameter 'channels[0].extra' is unexpected"
    assert schema_error(main(inet())) == "Invalid parameter type for 'channels', expected: array"


# -- channel addresses as engine URIs ----------------------------------------------------------

@pytest.mark.parametrize("addr, uri", [
    (inet(), "tcp:127.0.0.1:4446"),
    (inet("::1", "0"), "tcp:[::1]:0"),
    (inet("", "5000"), "tcp::5000"),
    (unix("/run/mig.sock"), "unix:/run/mig.sock"),
    ({"transport": "socket", "type": "unix", "path": "/m", "abstract": False, "tight": True},
     "unix:/m"),
    ({"transport": "socket", "type": "fd", "str": "7"}, "fd:7"),
    # QEMU's own parse of "exec:CMD" is ["/bin/sh", "-c", CMD]: back to CMD.
    ({"transport": "exec", "args": ["/bin/sh", "-c", "cat > /tmp/x | true"]},
     "exec:cat > /tmp/x | true"),
    ({"transport": "exec", "args": ["nc", "-U", "/a b"]}, "exec:nc -U '/a b'"),
    ({"transport": "file", "filename": "/tmp/m", "offset": 0}, "file:/tmp/m"),
    ({"transport": "file", "filename": "/tmp/m", "offset": 4096}, "file:/tmp/m,offset=4096"),
])
def test_channel_addresses_become_the_engines_uris(addr, uri):
    assert address_uri(addr) == uri
    assert migration_uri("migrate", None, [main(addr)]) == uri


@pytest.mark.parametrize("addr, why", [
    ({"transport": "rdma", "host": "10.0.0.1", "port": "4446"},
     "Invalid migration channel (as the URI 'rdma:10.0.0.1:4446'): "
     "the rdma transport is not supported"),
    ({"transport": "socket", "type": "vsock", "cid": "3", "port": "4446"},
     "Invalid migration channel (as the URI 'vsock:3:4446'): "
     "the vsock transport is not supported"),
    (inet(port="http"),
     "Invalid migration channel (as the URI 'tcp:127.0.0.1:http'): port 'http' is not a number"),
    (inet(**{"keep-alive": True, "ipv4": True}),
     "socket options (ipv4, keep-alive) are not supported by this engine"),
    ({"transport": "socket", "type": "unix", "path": "sock", "abstract": True},
     "abstract unix sockets are not supported by this engine"),
    ({"transport": "exec", "args": []}, "an exec channel needs a command: 'args' is empty"),
])
def test_channel_addresses_the_engine_cannot_use_are_refused(addr, why):
    assert refusal(migration_uri, "migrate", None, [main(addr)]) == why


def test_exactly_one_of_uri_and_channels_with_qemus_texts():
    for command in ("migrate", "migrate-incoming"):
        assert refusal(migration_uri, command, None, None) == NEED_URI_OR_CHANNELS
        assert refusal(migration_uri, command, "unix:/x", [main(inet())]) == \
            NEED_URI_OR_CHANNELS
        # QAPI turns an empty list into NULL: it is no 'channels' at all.
        assert refusal(migration_uri, command, None, []) == NEED_URI_OR_CHANNELS
        assert migration_uri(command, "unix:/x", []) == "unix:/x"
    assert NEED_URI_OR_CHANNELS == "need either 'uri' or 'channels' argument"


def test_one_main_channel_and_no_cpr():
    two = [main(inet()), main(unix("/x"))]
    assert refusal(migration_uri, "migrate", None, two) == \
        "Channel list has more than one main entry"
    assert refusal(migration_uri, "migrate-incoming", None, two) == \
        "Channel list must have only one entry, for type 'main'"
    cpr = {"channel-type": "cpr", "addr": unix("/cpr.sock")}
    for command, channels in (("migrate", [main(inet()), cpr]), ("migrate", [cpr]),
                              ("migrate-incoming", [cpr])):
        why = refusal(migration_uri, command, None, channels)
        assert "'cpr' channel" in why and "cpr-transfer" in why, why
    assert refusal(migration_uri, "migrate", None, [cpr, dict(cpr)]) == \
        "Channel list has more than one cpr entry"


# -- commands that changed in QEMU 9.x / 10.x ------------------------------------------------

def test_query_status_and_version_are_qemu_10s(make_vm):
    vm = make_vm()
    assert vm("query-status") == {"status": "running", "running": True}
    version = vm("query-version")
    assert version["qemu"] == {"major": 10, "minor": 2, "micro": 0}
    assert version == default_version() and version["package"].startswith("engine ")


def test_migrate_lost_blk_and_inc(make_vm, tmp_path):
    vm = make_vm()
    for name in ("blk", "inc"):
        assert vm.error("migrate", uri=f"unix:{tmp_path}/x", **{name: False}) == \
            f"Parameter '{name}' is unexpected"
    assert vm.error("migrate", uri="unix:/x", channels=[main(inet())]) == NEED_URI_OR_CHANNELS
    assert vm.error("migrate") == NEED_URI_OR_CHANNELS
    dst = make_vm(incoming="defer")
    assert dst.error("migrate-incoming") == NEED_URI_OR_CHANNELS
    assert dst.error("migrate-incoming", uri="unix:/x", channels=[main(inet())]) == \
        NEED_URI_OR_CHANNELS
    # QEMU checks the run state before the arguments' sense.
    assert vm.error("migrate-incoming", channels=[main(inet())]) == \
        "'-incoming' was not specified on the command line"


def test_no_migration_no_threads_nothing_to_yank(make_vm):
    vm = make_vm()
    assert vm("query-migrationthreads") == []
    assert vm("query-yank", oob=True) == []
    for instance in ({"type": "migration"}, {"type": "chardev", "id": "compat_monitor0"},
                     {"type": "block-node", "node-name": "nbd0"}):
        with pytest.raises(QMPError) as info:
            vm("yank", oob=True, instances=[instance])
        assert (info.value.error_class, info.value.desc) == ("DeviceNotFound",
                                                             "Instance not found")
    assert vm("yank", oob=True, instances=[]) == {}
    assert vm.error("yank", instances=[{"type": "migration", "id": "x"}]) == \
        "Parameter 'instances[0].id' is unexpected"
    assert vm.error("yank", instances=[{"type": "nbd"}]) == \
        "Parameter 'instances[0].type' does not accept value 'nbd'"


def _caps(vm, **caps):
    vm("migrate-set-capabilities", capabilities=[
        {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()])


def test_channels_migrate_both_ways_and_threads_and_yank_instances_while_running(
        make_vm, tmp_path):
    """A pause before the switchover holds the migration (multifd, 2 channels)
    while the threads and yank instances are looked at."""
    src, dst = make_vm(), make_vm(incoming="defer")
    for vm in (src, dst):
        _caps(vm, multifd=True)
    _caps(src, pause_before_switchover=True)
    path = f"{tmp_path}/mig.sock"
    dst("migrate-incoming", channels=[main(unix(path))],
        **{"exit-on-error": False})
    assert dst("query-migrate")["socket-address"] == [{"type": "unix", "path": path}]
    assert dst("query-yank", oob=True) == [{"type": "migration"}]
    src("migrate", channels=[main(unix(path))])
    src.wait_migration("pre-switchover")

    threads = src("query-migrationthreads")
    assert [t["name"] for t in threads] == ["mig/src/main", "mig/src/send_0",
                                            "mig/src/send_1"]
    assert threads[0]["thread-id"] == src.machine._thread.native_id
    assert threads[0]["thread-id"] in {t.id for t in psutil.Process().threads()}
    for t in threads[1:] + dst("query-migrationthreads"):
        assert psutil.Process(t["thread-id"]).is_running()
    assert [t["name"] for t in dst("query-migrationthreads")] == ["mig/dst/recv_0",
                                                                  "mig/dst/recv_1"]
    assert src("query-yank", oob=True) == [{"type": "migration"}]

    src("migrate-continue", state="pre-switchover")
    assert src.wait_migration("completed", "failed")["status"] == "completed"
    assert dst.wait_migration("completed", "failed")["status"] == "completed"
    for vm in (src, dst):
        assert vm("query-yank", oob=True) == []
        assert vm("query-migrationthreads") == []
    with pytest.raises(QMPError):
        src("yank", oob=True, instances=[{"type": "migration"}])


def test_yank_fails_a_running_precopy_and_the_source_runs_on(make_vm, tmp_path):
    src, dst = make_vm(), make_vm(incoming="defer")
    uri = f"unix:{tmp_path}/mig.sock"
    dst("migrate-incoming", uri=uri, **{"exit-on-error": False})
    # One page per 100 ms window: 1024 pages take 100 s, more than the test waits.
    src("migrate-set-parameters", **{"max-bandwidth": 1})
    src("migrate", channels=[main(unix(f"{tmp_path}/mig.sock"))])
    src.wait_migration("active")
    assert src("yank", oob=True, instances=[{"type": "migration"}]) == {}
    failed = src.wait_migration("failed", "completed", "cancelled")
    assert failed["status"] == "failed"
    assert "yanked" in failed["error-desc"], failed
    assert src.status() == "running" and src.guest.running
    assert dst.wait_migration("failed", "completed")["status"] == "failed"
    assert src("query-yank", oob=True) == [] and dst("query-yank", oob=True) == []


# -- worker sockets -------------------------------------------------------------------------

_CHILD = r"""
import socket, sys
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen()
tcp = socket.create_connection(listener.getsockname())
peer, _ = listener.accept()
unix = socket.socket(socket.AF_UNIX); unix.connect(sys.argv[1])
pair = socket.socketpair()
print(tcp.fileno(), unix.fileno(), pair[0].fileno(), flush=True)
sys.stdin.readline()
def state(s):
    try:
        s.send(b"x")
        return "open"
    except OSError:
        return "shut"
print(state(tcp), state(unix), state(pair[0]), flush=True)
"""


def test_yank_shuts_down_a_workers_channel_sockets_only(tmp_path):
    """In another process: its TCP socket and its Unix socket to the
    migration path are shut down; a socket pair (a worker's control or
    descriptor passing) is left alone."""
    path = str(tmp_path / "mig.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        child = subprocess.Popen([sys.executable, "-c", _CHILD, path], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            conn, _ = server.accept()
            with conn:
                child.stdout.readline()
                try:
                    done = shutdown_process_sockets(child.pid, channel_matcher(path))
                except PermissionError:
                    pytest.skip("pidfd_getfd is not permitted here (the monitor kills "
                                "workers instead)")
                child.stdin.write("\n")
                child.stdin.flush()
                assert child.stdout.readline().split() == ["shut", "shut", "open"]
                # the TCP pair's both ends live in the child: two sockets, and the unix one
                assert done == 3
                assert conn.recv(1) == b""      # the peer saw the shutdown
        finally:
            child.stdin.close()
            child.wait(10)
            child.stdout.close()
    assert shutdown_process_sockets(child.pid, channel_matcher(path)) == 0    # gone


# -- postcopy fault figures ----------------------------------------------------------------

HANDLER = {"postcopy-latency": 250_000, "postcopy-latency-p50": 200_000,
           "postcopy-latency-p99": 900_000, "postcopy-blocktime": 12,
           "postcopy-vcpu-blocktime": [12, 3], "postcopy-faults": "userfaultfd",
           "postcopy-requests": 40}


def test_postcopy_fields_qemus_only_with_blocktime_once_completed():
    engine_own = {"x-postcopy-latency-p50": 200_000, "x-postcopy-latency-p99": 900_000,
                  "x-postcopy-faults": "userfaultfd"}
    assert postcopy_fields(HANDLER, blocktime=False, started=True, completed=True) == engine_own
    assert postcopy_fields(HANDLER, blocktime=True, started=True, completed=False) == engine_own
    assert postcopy_fields(HANDLER, blocktime=True, started=False, completed=True) == engine_own
    full = postcopy_fields(HANDLER, blocktime=True, started=True, completed=True)
    assert full == {**engine_own, "postcopy-latency": 250_000, "postcopy-blocktime": 12,
                    "postcopy-vcpu-blocktime": [12, 3], "postcopy-non-vcpu-latency": 0}
    assert not any(k.startswith("postcopy-latency-p") for k in full)
    # Figures the handler gives in QEMU's form go through as they are.
    more = {**HANDLER, "postcopy-latency-dist": [0] * 24, "postcopy-vcpu-latency": [1, 2]}
    full = postcopy_fields(more, blocktime=True, started=True, completed=True)
    assert set(POSTCOPY_BLOCKTIME_FIELDS) <= set(full)


@pytest.mark.parametrize("ns, bucket", [
    (0, 0), (999, 0), (1_000, 0), (1_999, 0), (2_000, 1), (255_999, 7), (256_000, 8),
    (511_999, 8), ((1 << 23) * 1000, 23), ((1 << 30) * 1000, 23),
])
def test_latency_buckets_are_qemus_powers_of_two_microseconds(ns, bucket):
    assert latency_bucket(ns) == bucket
