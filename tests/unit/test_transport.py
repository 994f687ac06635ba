"""engine.transport: URI parsing, and real round trips over every transport."""
from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from engine.stress.leaks import is_helper
from engine.errors import (BadURIError, ChannelBrokenError, ChannelClosedError,
                           ChannelError, ConfigError)
from engine.transport import (IOV_MAX, Channel, ChannelTimeoutError, ExecAddress,
                              FdAddress, FileAddress, TcpAddress, UnixAddress, connect,
                              listen, parse_uri)

try:
    from tests.netns import netns_available, netns_pair
except ImportError:     # run as plain `pytest`, without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.netns import netns_available, netns_pair


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _open_fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:       # the listdir's own descriptor
            pass
    return fds


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must close its descriptors and stop the processes it started.

    (Exec tests also check that the command was reaped, by its ``returncode``:
    zombies are not counted here, since orphans adopted by a subreaper pytest show
    up as our zombies too.)"""
    before = _open_fds()
    yield
    gc.collect()
    leaked = {fd: target for fd, target in _open_fds().items() if fd not in before}
    assert not leaked, f"leaked descriptors: {leaked}"
    running = [p for p in psutil.Process().children(recursive=True)
               if p.status() != psutil.STATUS_ZOMBIE and not is_helper(p)]
    _, alive = psutil.wait_procs(running, timeout=5)    # a signalled one may still be dying
    assert not alive, f"leftover processes: {alive}"


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def _read_to_eof(ch: Channel) -> bytes:
    parts = []
    while chunk := ch.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


# ---------------------------------------------------------------------------
# parse_uri

ACCEPTED = [
    ("tcp:127.0.0.1:4444", TcpAddress("127.0.0.1", 4444)),
    ("tcp:127.0.0.1:0", TcpAddress("127.0.0.1", 0)),
    ("tcp:[::1]:65535", TcpAddress("::1", 65535)),
    ("tcp:[fe80::1%eth0]:1", TcpAddress("fe80::1%eth0", 1)),
    ("tcp:localhost:1", TcpAddress("localhost", 1)),
    ("tcp::4444", TcpAddress("", 4444)),
    ("unix:/tmp/mig.sock", UnixAddress("/tmp/mig.sock")),
    ("unix:relative/mig.sock", UnixAddress("relative/mig.sock")),
    ("file:/tmp/f", FileAddress("/tmp/f")),
    ("file:/tmp/f,offset=4096", FileAddress("/tmp/f", 4096)),
    ("file:/tmp/f,offset=0x1000", FileAddress("/tmp/f", 0x1000)),
    ("file:/tmp/f,offset=4K", FileAddress("/tmp/f", 4096)),
    ("file:/tmp/f,offset=1M", FileAddress("/tmp/f", 1 << 20)),
    ("file:/tmp/f,offset=2g", FileAddress("/tmp/f", 2 << 30)),
    ("file:/tmp/f,offset=1.5k", FileAddress("/tmp/f", 1536)),
    ("file:/tmp/f,offset=0", FileAddress("/tmp/f", 0)),
    ("file:/tmp/a,b,offset=8", FileAddress("/tmp/a,b", 8)),
    ("exec:cat > /tmp/x", ExecAddress("cat > /tmp/x")),
    ("exec:gzip -c | ssh host 'cat > f'", ExecAddress("gzip -c | ssh host 'cat > f'")),
    ("fd:0", FdAddress(0)),
    ("fd:42", FdAddress(42)),
]


@pytest.mark.parametrize("uri, expected", ACCEPTED, ids=[u for u, _ in ACCEPTED])
def test_parse_uri_accepts(uri, expected):
    address = parse_uri(uri)
    assert address == expected
    assert parse_uri(address.uri) == address


REFUSED = [
    ("", "missing transport"),
    ("127.0.0.1:4444", "unknown transport"),
    ("http://host/x", "unknown transport 'http'"),
    ("defer", "migrate-incoming"),
    ("rdma:192.168.1.1:4444", "not supported"),
    ("vsock:3:4444", "not supported"),
    ("tcp:127.0.0.1", "missing port"),
    ("tcp:127.0.0.1:", "missing port"),
    ("tcp:[::1]", "missing port"),
    ("tcp:[::1:4444", "']'"),
    ("tcp:[nothex]:4444", "not an IPv6 address"),
    ("tcp:::1:4444", "brackets"),
    ("tcp:host:65536", "0..65535"),
    ("tcp:host:-1", "not a number"),
    ("tcp:host:http", "not a number"),
    ("tcp:host:1,ipv4", "not supported"),
    ("tcp:a b:1", "invalid host"),
    ("unix:", "missing socket path"),
    ("unix:/" + "x" * 200, "at most 107"),
    ("file:", "missing file path"),
    ("file:,offset=4", "missing file path"),
    ("file:/f,offset=0x20M", "bad offset"),    # QEMU's /migration/precopy/file/offset/bad
    ("file:/f,offset=", "bad offset"),
    ("file:/f,offset=-1", "bad offset"),
    ("file:/f,offset=1e3", "bad offset"),
    ("file:/f,offset=0x1.8", "bad offset"),
    ("file:/f,offset=4Q", "bad offset"),
    ("file:/f,offset=16E", "bad offset"),
    ("file:/f,offset=8E", "largest file offset"),
    ("exec:", "missing command"),
    ("exec:   ", "missing command"),
    ("fd:", "missing"),
    ("fd:fd-mig", "getfd"),
    ("fd:-1", "not a file descriptor"),
    ("fd:3x", "not a file descriptor"),
]


@pytest.mark.parametrize("uri, why", REFUSED, ids=[u[:40] for u, _ in REFUSED])
def test_parse_uri_refuses(uri, why):
    with pytest.raises(BadURIError) as info:
        parse_uri(uri)
    assert info.value.uri == uri
    assert repr(uri) in str(info.value)
    assert why in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_address_dataclasses_validate_and_render():
    assert TcpAddress("::1", 5).uri == "tcp:[::1]:5"
    assert FileAddress("/f", 4096).uri == "file:/f,offset=4096"
    assert FileAddress("/f").uri == "file:/f"
    with pytest.raises(BadURIError, match="0..65535"):
        TcpAddress("h", 70000)
    with pytest.raises(BadURIError):
        FdAddress(-3)
    with pytest.raises(TypeError):
        connect(12345)


# ---------------------------------------------------------------------------
# Socket round trips


@pytest.fixture(params=["tcp", "unix"])
def socket_listener(request, tmp_path):
    uri = "tcp:127.0.0.1:0" if request.param == "tcp" else f"unix:{tmp_path}/mig.sock"
    with listen(uri) as listener:
        yield listener


def test_socket_round_trip(socket_listener, pool):
    if isinstance(socket_listener.address, TcpAddress):
        assert socket_listener.address.port != 0
        assert socket_listener.uri == f"tcp:127.0.0.1:{socket_listener.address.port}"
    data = _payload(3 << 20)
    accepted = pool.submit(socket_listener.accept, 10)
    with connect(socket_listener.uri, timeout=10) as src:
        with accepted.result() as dst:
            assert src.bidirectional and dst.bidirectional
            assert socket_listener.uri in dst.name and src.name == socket_listener.uri
            receive = pool.submit(dst.read_exactly, 2 * len(data))
            src.sendall(data)
            assert src.sendmsg_all([data[:5], memoryview(data)[5:]]) == len(data)
            assert receive.result() == data + data
            # The return path uses the same socket.
            dst.sendall(b"reply")
            assert src.read_exactly(5) == b"reply"
            src.shutdown_write()
            assert dst.recv(10) == b""
            assert (src.bytes_sent, src.bytes_received) == (2 * len(data), 5)
            assert (dst.bytes_sent, dst.bytes_received) == (5, 2 * len(data))


def test_socket_listener_accepts_many_channels(socket_listener, pool):
    """multifd: several channels connect to the main channel's listener."""
    count = 5
    accepted = [pool.submit(socket_listener.accept, 10) for _ in range(count)]
    sources = [connect(socket_listener.uri) for _ in range(count)]
    try:
        for i, src in enumerate(sources):
            src.sendall(bytes([i]) * 100)
        seen = set()
        for future in accepted:
            with future.result() as dst:
                seen.add(dst.read_exactly(100)[0])
        assert seen == set(range(count))
    finally:
        for src in sources:
            src.close()


def test_peek_leaves_bytes_in_place(socket_listener, pool):
    accepted = pool.submit(socket_listener.accept, 10)
    with connect(socket_listener.uri) as src, accepted.result() as dst:
        def send_in_pieces():
            src.sendall(b"QE")
            time.sleep(0.05)        # lets the peek find only part of the magic
            src.sendall(b"VM and more")
            src.shutdown_write()
        sender = pool.submit(send_in_pieces)
        assert dst.peek(4) == b"QEVM"
        assert dst.peek(4) == b"QEVM"
        sender.result()
        assert dst.read_exactly(4) == b"QEVM"
        assert dst.peek(100) == b" and more"       # short: the peer has finished
        assert _read_to_eof(dst) == b" and more"
        assert dst.peek(4) == b""


def test_unix_listener_replaces_stale_socket_and_removes_its_own(tmp_path):
    path = tmp_path / "mig.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                       # leaves the socket file behind
    with listen(f"unix:{path}") as listener:
        with connect(listener.uri) as src, listener.accept(10) as dst:
            src.sendall(b"x")
            assert dst.read_exactly(1) == b"x"
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ChannelBrokenError, match="not a socket"):
        listen(f"unix:{path}")
    assert path.read_text() == "not a socket"


# ---------------------------------------------------------------------------
# File, exec and fd round trips


def test_file_round_trip(tmp_path):
    path = tmp_path / "stream"
    data = _payload(1 << 20)
    with connect(f"file:{path}") as src:
        assert not src.bidirectional
        src.sendmsg_all([data[:100], data[100:]])
    with listen(f"file:{path}") as listener:
        with listener.accept() as dst:
            assert not dst.bidirectional
            assert _read_to_eof(dst) == data
        with pytest.raises(ChannelClosedError, match="single channel"):
            listener.accept()


def test_file_offset_keeps_earlier_bytes(tmp_path):
    """QEMU's /migration/precopy/file/offset: the bytes before the offset are not
    touched and the stream starts exactly there."""
    path = tmp_path / "stream"
    path.write_bytes(b"X" * 0x1000)
    data = b"QEVM" + _payload(100_000)
    with connect(f"file:{path},offset=0x1000") as src:
        src.sendall(data)
    assert path.read_bytes() == b"X" * 0x1000 + data
    with listen(f"file:{path},offset=4K") as listener, listener.accept() as dst:
        assert dst.read_exactly(4) == b"QEVM"
        assert _read_to_eof(dst) == data[4:]


def test_file_rewrite_truncates_nothing(tmp_path):
    path = tmp_path / "stream"
    path.write_bytes(b"X" * 10 + b"older, longer stream")
    with connect(f"file:{path},offset=10") as src:
        src.sendall(b"new")
    assert path.read_bytes() == b"X" * 10 + b"new" + b"er, longer stream"


def test_file_created_private(tmp_path):
    with connect(f"file:{tmp_path}/new,offset=8") as src:
        src.sendall(b"abc")
    assert (tmp_path / "new").read_bytes() == bytes(8) + b"abc"
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600


def test_file_missing_for_reading(tmp_path):
    with listen(f"file:{tmp_path}/absent") as listener:
        with pytest.raises(ChannelBrokenError, match="absent: no such file"):
            listener.accept()
        (tmp_path / "absent").write_bytes(b"now here")     # a failed accept can be retried
        with listener.accept() as dst:
            assert _read_to_eof(dst) == b"now here"


def test_exec_round_trip(tmp_path):
    path = tmp_path / "stream"
    data = _payload(2 << 20)
    with connect(f"exec:cat > '{path}'") as src:
        assert not src.bidirectional
        src.sendmsg_all([data[:1], data[1:]])
    assert src.returncode == 0
    assert path.read_bytes() == data
    with listen(f"exec:cat '{path}'") as listener:
        with listener.accept() as dst:
            assert _read_to_eof(dst) == data
        assert dst.returncode == 0
        with pytest.raises(ChannelClosedError):
            listener.accept()


def test_exec_exit_status_is_reported_not_raised():
    with connect("exec:exit 3") as src:
        pass
    assert src.returncode == 3


def test_exec_channel_reaped_when_garbage_collected(tmp_path):
    src = connect(f"exec:cat > '{tmp_path}/x'")
    pid = src.pid
    src.sendall(b"abc")
    del src
    gc.collect()
    with pytest.raises(ChildProcessError):       # already reaped
        os.waitpid(pid, os.WNOHANG)
    assert (tmp_path / "x").read_bytes() == b"abc"


def test_socket_channel_closed_when_garbage_collected(socket_listener):
    src = connect(socket_listener.uri)
    dst = socket_listener.accept(10)
    del src
    gc.collect()
    assert dst.recv(1) == b""
    dst.close()


def test_fd_pipe_round_trip(pool):
    r, w = os.pipe()
    data = _payload(1 << 20)
    with connect(f"fd:{w}") as src, listen(f"fd:{r}") as listener:
        dst = listener.accept()
        with dst:
            assert not src.bidirectional and not dst.bidirectional
            sender = pool.submit(src.sendall, data)
            assert dst.read_exactly(len(data)) == data
            sender.result()
            src.shutdown_write()
            assert dst.recv(1) == b""
            with pytest.raises(ChannelClosedError):
                listener.accept()


def test_fd_socketpair_round_trip(pool):
    a, b = socket.socketpair()
    with connect(f"fd:{a.detach()}") as src, listen(f"fd:{b.detach()}") as listener:
        with listener.accept() as dst:
            assert src.bidirectional and dst.bidirectional
            data = _payload(1 << 20)
            sender = pool.submit(src.sendall, data)
            assert dst.peek(4) == data[:4]
            assert dst.read_exactly(len(data)) == data
            sender.result()
            dst.sendall(b"back")
            assert src.read_exactly(4) == b"back"


def test_fd_listener_closes_unaccepted_descriptor():
    r, w = os.pipe()
    os.close(w)
    listen(f"fd:{r}").close()
    with pytest.raises(OSError):
        os.fstat(r)


def test_fd_bad_descriptor():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ChannelBrokenError, match=f"fd:{r}: bad file descriptor") as info:
        connect(f"fd:{r}")
    assert isinstance(info.value.__cause__, OSError)


# ---------------------------------------------------------------------------
# Scatter-gather sends


def _channel_pair(kind: str, tmp_path: Path):
    """(source, destination) channels of ``kind``: "unix", "tcp" or "pipe"."""
    if kind == "pipe":
        r, w = os.pipe()
        return connect(f"fd:{w}"), connect(f"fd:{r}")
    uri = "tcp:127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path}/sg.sock"
    with listen(uri) as listener:
        src = connect(listener.uri)
        return src, listener.accept(10)


def _record_sends(ch: Channel, stingy: bool = False) -> list[tuple[int, int, int]]:
    """Wrap ``ch``'s send primitive; records (buffers, bytes offered, bytes taken).

    ``stingy`` hands the real primitive only an odd-sized prefix of what it is
    offered, so that every call is a short write ending inside some buffer (the
    kernel's own short writes depend on how fast the reader drains)."""
    calls = []
    send_some = ch._send_some

    def recording(views):
        offered = sum(v.nbytes for v in views)
        if stingy:
            budget = 100_003 + 7 * len(calls)
            prefix = []
            for v in views:
                if budget <= 0:
                    break
                prefix.append(v[:budget])
                budget -= prefix[-1].nbytes
            taken = send_some(prefix)
        else:
            taken = send_some(views)
        calls.append((len(views), offered, taken))
        return taken
    ch._send_some = recording
    return calls


@pytest.mark.parametrize("kind", ["unix", "tcp", "pipe"])
def test_sendmsg_all_more_buffers_than_iov_max(kind, tmp_path, pool):
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 300, 3 * IOV_MAX + 17)
    buffers = [_payload(int(n), seed=i) for i, n in enumerate(sizes)]
    expected = b"".join(buffers)
    src, dst = _channel_pair(kind, tmp_path)
    with src, dst:
        calls = _record_sends(src)
        receive = pool.submit(dst.read_exactly, len(expected))
        assert src.sendmsg_all(buffers) == len(expected)
        assert receive.result() == expected
        assert max(n for n, _, _ in calls) <= IOV_MAX
        assert len(calls) >= 3


@pytest.mark.parametrize("stingy", [False, True], ids=["kernel", "stingy"])
@pytest.mark.parametrize("kind", ["unix", "tcp", "pipe"])
@pytest.mark.parametrize("timeout", [None, 30], ids=["blocking", "timeout"])
def test_sendmsg_all_huge_buffers_short_writes(kind, stingy, timeout, tmp_path, pool):
    big = np.random.default_rng(2).integers(0, 2**63, (3 << 20) // 8, dtype=np.uint64)
    buffers = [big, b"!", bytearray(_payload(5 << 20)), memoryview(b"tail")[1:]]
    expected = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
    src, dst = _channel_pair(kind, tmp_path)
    with src, dst:
        src.settimeout(timeout)
        calls = _record_sends(src, stingy)
        received = bytearray(len(expected))
        receive = pool.submit(dst.readinto_exactly, memoryview(received))
        assert src.sendmsg_all(buffers) == len(expected)
        receive.result()
        assert received == expected
        assert src.bytes_sent == dst.bytes_received == len(expected)
        if stingy or kind == "pipe":
            # A pipe holds 64 KiB and its writer never blocks: short writes for sure.
            assert sum(taken < offered for _, offered, taken in calls) >= 10


# ---------------------------------------------------------------------------
# Failures


def test_connect_refused():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))      # bound but not listening: refuses connections
    port = closed.getsockname()[1]
    try:
        with pytest.raises(ChannelBrokenError) as info:
            connect(f"tcp:127.0.0.1:{port}", timeout=5)
    finally:
        closed.close()
    assert str(info.value) == f"tcp:127.0.0.1:{port}: connection refused"
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_connect_unix_missing(tmp_path):
    with pytest.raises(ChannelBrokenError, match="no such file"):
        connect(f"unix:{tmp_path}/nobody.sock")


def test_peer_vanishes_while_sending(socket_listener, pool):
    accepted = pool.submit(socket_listener.accept, 10)
    with connect(socket_listener.uri) as src:
        accepted.result().close()
        with pytest.raises(ChannelBrokenError) as info:
            src.sendall(bytes(64 << 20))
        assert str(info.value).startswith(src.name + ": peer closed the connection")
        assert isinstance(info.value.__cause__, (BrokenPipeError, ConnectionResetError))


def test_peer_vanishes_while_receiving(socket_listener, pool):
    accepted = pool.submit(socket_listener.accept, 10)
    with connect(socket_listener.uri) as src:
        with accepted.result() as dst:
            dst.sendall(b"0123456789")
        with pytest.raises(ChannelClosedError) as info:
            src.read_exactly(100)
        assert src.name in str(info.value)
        assert "90 of 100" in str(info.value)


def test_exec_command_stops_reading():
    with connect("exec:head -c 10 >/dev/null") as src:
        with pytest.raises(ChannelBrokenError) as info:
            src.sendall(bytes(16 << 20))
        assert str(info.value).startswith("exec:head -c 10 >/dev/null: peer closed")
    assert src.returncode == 0


def test_exec_command_ends_early():
    with listen("exec:printf abc") as listener, listener.accept() as dst:
        with pytest.raises(ChannelClosedError, match=r"exec:printf abc: .*7 of 10"):
            dst.read_exactly(10)


def test_exec_reader_closed_early_stops_command():
    with listen("exec:yes") as listener:
        dst = listener.accept()
        assert dst.read_exactly(4) == b"y\ny\n"
        dst.close()
    assert dst.returncode is not None


def test_listener_accept_timeout(socket_listener):
    with pytest.raises(ChannelTimeoutError) as info:
        socket_listener.accept(timeout=0.05)
    assert isinstance(info.value, ChannelError)
    assert socket_listener.uri in str(info.value)


def test_listener_close_wakes_accept(socket_listener, pool):
    waiting = pool.submit(socket_listener.accept)
    socket_listener.close()
    with pytest.raises(ChannelClosedError, match="listener is closed"):
        waiting.result(timeout=10)
    socket_listener.close()


@pytest.mark.parametrize("kind", ["unix", "tcp", "pipe"])
def test_read_timeout(kind, tmp_path):
    src, dst = _channel_pair(kind, tmp_path)
    with src, dst:
        dst.settimeout(0.05)
        with pytest.raises(ChannelTimeoutError, match=dst.name):
            dst.recv(10)
        src.sendall(b"late")
        assert dst.read_exactly(4) == b"late"


@pytest.mark.parametrize("kind", ["unix", "tcp", "pipe"])
def test_shutdown_aborts_blocked_reader(kind, tmp_path, pool):
    src, dst = _channel_pair(kind, tmp_path)
    with src, dst:
        reader = pool.submit(dst.read_exactly, 10)
        dst.shutdown()
        with pytest.raises(ChannelClosedError, match="10 of 10"):
            reader.result(timeout=10)


def test_shutdown_aborts_blocked_pipe_writer(pool):
    r, w = os.pipe()
    with connect(f"fd:{w}") as src, connect(f"fd:{r}") as dst:
        writer = pool.submit(src.sendall, bytes(16 << 20))   # far beyond the pipe
        src.shutdown()
        with pytest.raises(ChannelBrokenError, match="shut down"):
            writer.result(timeout=10)


def test_use_after_close(socket_listener):
    src = connect(socket_listener.uri)
    socket_listener.accept(10).close()
    src.close()
    src.close()
    assert src.fileno() == -1
    with pytest.raises(ChannelBrokenError, match="closed"):
        src.sendall(b"x")


# ---------------------------------------------------------------------------
# Across a network namespace


@pytest.mark.netns
def test_tcp_into_network_namespace():
    ok, reason = netns_available()
    if not ok:
        pytest.skip(reason)
    data = _payload(4 << 20)
    sink = (
        "import hashlib, socket, sys\n"
        "server = socket.create_server((sys.argv[1], 0))\n"
        "print(server.getsockname()[1], flush=True)\n"
        "conn, _ = server.accept()\n"
        "left, digest = int(sys.argv[2]), hashlib.sha256()\n"
        "while left:\n"
        "    chunk = conn.recv(min(left, 1 << 20))\n"
        "    if not chunk: break\n"
        "    digest.update(chunk); left -= len(chunk)\n"
        "print(digest.hexdigest(), left, flush=True)\n")
    with netns_pair() as pair:
        argv = pair.exec_argv([sys.executable, "-c", sink, pair.ns_ip, str(len(data))])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        try:
            port = int(proc.stdout.readline())
            with connect(f"tcp:{pair.ns_ip}:{port}", timeout=10) as src:
                assert src.name == f"tcp:{pair.ns_ip}:{port}"
                src.sendmsg_all([data[:1000], data[1000:]])
                out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        assert out.split() == [hashlib.sha256(data).hexdigest(), "0"]
        assert proc.returncode == 0


def test_outgoing_unix_channel_gets_a_wide_send_buffer(tmp_path):
    """The connecting side sends the pages; a wide buffer saves the ping-pong
    of blocking and waking per batch.  (TCP is left to its autotuning.)"""
    from engine.transport import UNIX_SNDBUF
    with open("/proc/sys/net/core/wmem_max") as f:
        wmem_max = int(f.read())
    with listen(f"unix:{tmp_path}/s.sock") as lst, connect(lst.uri) as ch:
        # Linux reports twice what was set, after capping it at wmem_max.
        assert ch.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == \
            2 * min(UNIX_SNDBUF, wmem_max)
        lst.accept(timeout=5).close()
