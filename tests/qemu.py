"""A small harness around a real ``qemu-system-x86_64`` for interop tests.

The VM is the smallest thing QEMU can migrate: machine ``none`` (no CPUs, no
devices) whose only RAM is a ``memory-backend-file`` named ``m0`` mapped
``share=on`` from a file we choose.  Because the mapping is shared, the file
*is* the guest RAM: a test fills it before starting a source and compares it
byte for byte after a destination finished loading.  ``-S`` keeps the guest in
``prelaunch`` so nothing but the migration touches that memory.

QEMU is driven over QMP with :class:`qemu.qmp.QMPClient` on an event loop owned
by each :class:`QemuVM` (no loop is installed for the thread, so tests that use
``asyncio.run`` are not disturbed).  Waiting for a migration status follows
QEMU's own qtest harness: poll ``query-migrate`` every few milliseconds, fail
as soon as a forbidden status shows up (with QEMU's ``error-desc``), and give up
after a bounded time.

Every process started here is reaped on every path: :meth:`QemuVM.close` (also
run by ``with``) asks QEMU to quit, then terminates, then kills it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

import numpy as np

from engine.errors import EngineError, MigrationError
from engine.ram.image import ImageStats, write_mixed_image

QEMU_BINARY = "qemu-system-x86_64"
PAGE_SIZE = 4096
QEVM_MAGIC = b"QEVM"
#: The stream header QEMU writes first: magic then version 3, both big endian.
QEVM_HEADER = QEVM_MAGIC + (3).to_bytes(4, "big")

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class QemuError(EngineError):
    """The QEMU under test misbehaved or could not be driven."""


class QemuExitedError(QemuError):
    """QEMU exited while the harness still needed it; the log tail is included."""


class QMPCommandError(QemuError):
    """QEMU answered a QMP command with an error.

    ``error_class`` is QMP's class (e.g. ``GenericError``), ``desc`` its text.
    """

    def __init__(self, command: str, arguments: Mapping[str, object],
                 error_class: str, desc: str):
        self.command, self.arguments = command, dict(arguments)
        self.error_class, self.desc = error_class, desc
        super().__init__(f"QMP {command} {self.arguments}: {error_class}: {desc}")


class QemuMigrationFailed(QemuError, MigrationError):
    """``query-migrate`` reached a status the caller declared fatal.

    ``info`` is the whole ``query-migrate`` reply; ``str()`` carries the status
    and QEMU's ``error-desc``.
    """

    def __init__(self, vm_name: str, info: Mapping[str, object]):
        self.info = dict(info)
        status = info.get("status")
        desc = info.get("error-desc", "(no error-desc)")
        super().__init__(f"{vm_name}: migration status {status!r}: {desc}")


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a QEMU-style string such as ``"64M"``."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {size!r}")
    return int(m.group(1)) * _SIZE_SUFFIXES[m.group(2).upper()]


@functools.lru_cache(maxsize=None)
def qemu_available(binary: str = QEMU_BINARY, datadir: str | None = None) -> tuple[bool, str]:
    """Whether ``binary`` (run with ``-L datadir`` when given) can run here, with
    a reason fit for ``pytest.skip``.  On success the reason is QEMU's version line.
    """
    path = shutil.which(binary)
    if path is None:
        return False, f"{binary} not found (apt install qemu-system-x86; QEMU 10: .ci/qemu10)"
    try:
        import qemu.qmp  # noqa: F401  (only its presence matters here)
    except ImportError as exc:
        return False, f"the qemu.qmp package is not installed: {exc}"
    try:
        out = subprocess.run([path, *(["-L", datadir] if datadir else []), "--version"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{path} --version failed: {exc}"
    return True, out.splitlines()[0] if out else path


@dataclasses.dataclass(frozen=True)
class Qemu:
    """One QEMU build: its binary, the ``-L`` data directory it needs (None for
    the system's), and the version its line reports (``"7.2.22"``)."""
    binary: str
    datadir: str | None
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def modern(self) -> bool:
        """Speaks the multifd dialect of QEMU 8.1 and later (a flush per round)."""
        return self.major >= 9


#: where .ci/qemu10 unpacks QEMU 10 (ENGINE_QEMU10_DIR overrides)
QEMU10_DIR = Path(os.environ.get("ENGINE_QEMU10_DIR",
                                 Path(__file__).resolve().parents[1] / ".qemu10"))

#: the QEMUs the interop tests run against: the system's (Debian's 7.2) and
#: QEMU 10 from bookworm-backports, unpacked beside it by .ci/qemu10
QEMU_BUILDS = {
    "7.2": (QEMU_BINARY, None),
    "10.0": (str(QEMU10_DIR / "usr/bin/qemu-system-x86_64"), str(QEMU10_DIR / "usr/share/qemu")),
}


@functools.lru_cache(maxsize=None)
def find_qemu(label: str) -> tuple[Qemu | None, str]:
    """The QEMU for ``label`` ("7.2" or "10.0") and its version line, or None and
    the reason it cannot be used here."""
    binary, datadir = QEMU_BUILDS[label]
    ok, why = qemu_available(binary, datadir)
    if not ok:
        return None, why
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", why)
    if m is None or not m.group(1).startswith(label):
        return None, f"{binary} is not QEMU {label}: {why}"
    return Qemu(shutil.which(binary) or binary, datadir, m.group(1)), why


def qemu_at(path: str) -> tuple[Qemu | None, str]:
    """The QEMU whose binary is ``path`` (a tree unpacked with dpkg -x gets
    ``-L`` its own ``usr/share/qemu``), or None and why it cannot run."""
    binary = Path(path)
    share = binary.resolve().parent.parent / "share" / "qemu"
    datadir = str(share) if binary.parent.name == "bin" and share.is_dir() \
        and not str(binary.resolve()).startswith("/usr/") else None
    ok, why = qemu_available(str(binary), datadir)
    if not ok:
        return None, why
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", why)
    if m is None:
        return None, f"{path}: no version in {why!r}"
    return Qemu(shutil.which(str(binary)) or str(binary), datadir, m.group(1)), why


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago.

    Another process may grab it before the caller binds it: callers retry.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Guest RAM images

def fill_image(path: str | os.PathLike, size: int | str, seed: int) -> ImageStats:
    """Write ``size`` bytes of guest-like RAM to ``path``, deterministic by ``seed``.

    Each 4 KiB page is, at random: all zero (about 50%), lowercase letters
    (about 40%, compressible like text) or uniformly random bytes (about 10%),
    the mix QEMU's 7.2 captures were made from.  The generator is
    :func:`engine.ram.image.write_mixed_image`, so the tests and the benchmark
    use the same images.  An existing file is overwritten in place (not
    truncated first, so a process mapping it never sees it shrink) and then
    cut or extended to ``size``.
    """
    return write_mixed_image(path, parse_size(size), seed)


def image_differences(a: str | os.PathLike, b: str | os.PathLike) -> str | None:
    """``None`` when files ``a`` and ``b`` are equal, else a one-line account.

    The account names the sizes, or the number of differing 4 KiB pages and
    the first few page indexes, which is what a failing RAM comparison needs.
    """
    size_a, size_b = os.path.getsize(a), os.path.getsize(b)
    if size_a != size_b:
        return f"{a} has {size_a} bytes, {b} has {size_b}"
    if size_a == 0:
        return None
    ma = np.memmap(a, dtype=np.uint8, mode="r")
    mb = np.memmap(b, dtype=np.uint8, mode="r")
    try:
        if np.array_equal(ma, mb):
            return None
        whole = size_a // PAGE_SIZE * PAGE_SIZE
        diff = (ma[:whole].reshape(-1, PAGE_SIZE) != mb[:whole].reshape(-1, PAGE_SIZE)).any(axis=1)
        bad = np.flatnonzero(diff)
        tail = " and in the last partial page" if whole != size_a and not np.array_equal(
            ma[whole:], mb[whole:]) else ""
        return (f"{a} and {b} differ in {bad.size} of {whole // PAGE_SIZE} pages"
                f"{tail}; first differing pages: {bad[:8].tolist()}")
    finally:
        del ma, mb


# ---------------------------------------------------------------------------
# Processes

def stop_process(proc: subprocess.Popen, *, term_timeout: float = 5.0,
                 group: bool = False) -> int:
    """Make sure ``proc`` has exited and is reaped; return its exit status.

    SIGTERM first, SIGKILL after ``term_timeout`` seconds.  With ``group``
    (a process started with ``start_new_session=True``) that had to be
    stopped, the SIGKILL goes to its whole process group, so helpers it
    spawned do not outlive it.  A process that already exited by itself is
    only reaped: whatever it left running is its own leak, for the suite's
    leak check to report.
    """
    was_running = proc.poll() is None
    if was_running:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=term_timeout)
        except subprocess.TimeoutExpired:
            pass
    if group and was_running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    return proc.wait(timeout=30)


def log_tail(path: str | os.PathLike, limit: int = 4000) -> str:
    """The last ``limit`` characters of a log file ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


class ManagedProcess:
    """A child process whose stdout/stderr go to files, always reaped on exit.

    Use as a context manager; leaving it (normally or by an exception) stops
    the whole process group the child leads, and leaving it by an exception
    also prints :meth:`describe` to stderr, which pytest shows with the
    failure.  ``describe()`` renders the exit status and both logs.
    """

    def __init__(self, argv: Sequence[str], log_dir: str | os.PathLike, name: str,
                 *, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None):
        self.argv = [str(a) for a in argv]
        self.name = name
        self.stdout_path = Path(log_dir) / f"{name}.stdout"
        self.stderr_path = Path(log_dir) / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, cwd=cwd,
                                         env=None if env is None else dict(env),
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """Exit status, waiting at most ``timeout`` seconds.

        Raises ``TimeoutError`` (with the logs) if it is still running.
        """
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout} s\n"
                               + self.describe()) from None

    def stdout(self) -> str:
        return log_tail(self.stdout_path, 1 << 20)

    def describe(self) -> str:
        return (f"{self.name}: {' '.join(self.argv)}\n  exit status: {self.proc.returncode}\n"
                f"  --- stdout ---\n{log_tail(self.stdout_path)}\n"
                f"  --- stderr ---\n{log_tail(self.stderr_path)}")

    def close(self) -> None:
        stop_process(self.proc, group=True)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.close()
        if exc_type is not None:
            print(self.describe(), file=sys.stderr)


# ---------------------------------------------------------------------------
# The VM

class QemuVM:
    """One ``qemu-system-x86_64 -M none`` whose RAM is the file ``mem_path``.

    Starting it (the constructor) launches QEMU paused (``-S``), waits for its
    QMP socket and negotiates capabilities; any failure on the way kills QEMU
    before raising.  ``incoming`` is passed as ``-incoming`` (a URI, or
    ``"defer"`` to call :meth:`migrate_incoming` later).  ``size`` is QEMU's
    ``-m`` (bytes or a string like ``"64M"``).  ``machine`` is ``-M``'s type
    (``pc`` with ``extra_args`` booting :mod:`tests.bootblock` gives a guest
    whose CPU dirties memory).

    Use it as a context manager (leaving it by an exception also prints
    QEMU's log to stderr for pytest to show), or call :meth:`close`.
    """

    def __init__(self, mem_path: str | os.PathLike, size: int | str = "64M", *,
                 incoming: str | None = None, name: str = "qemu",
                 extra_args: Sequence[str] = (), binary: str = QEMU_BINARY,
                 start_timeout: float = 30.0, command_timeout: float = 30.0,
                 prealloc: bool = False, qemu: Qemu | None = None,
                 machine: str = "none"):
        self.name = name
        self.mem_path = Path(mem_path)
        self.size = parse_size(size)
        self.command_timeout = command_timeout
        self.log = ""
        self._closed = False
        self._qmp = None
        self._loop = asyncio.new_event_loop()
        self._dir = Path(tempfile.mkdtemp(prefix="engine-qemu-"))
        self.qmp_path = self._dir / "qmp.sock"
        self.log_path = self._dir / "qemu.log"
        size_arg = f"{self.size // (1 << 20)}M" if self.size % (1 << 20) == 0 else str(self.size)
        self.qemu = qemu
        if qemu is not None:
            binary = qemu.binary
        datadir = ["-L", qemu.datadir] if qemu is not None and qemu.datadir else []
        self.argv = [
            binary, *datadir, "-M", f"{machine},memory-backend=m0", "-m", size_arg,
            "-object", f"memory-backend-file,id=m0,size={size_arg},"
                       f"mem-path={self.mem_path},share=on"
                       + (",prealloc=on" if prealloc else ""),
            "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *(["-incoming", incoming] if incoming is not None else []),
            *extra_args,
        ]
        self._log_file: IO[bytes] = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=self._log_file,
                                         stderr=subprocess.STDOUT)
        except BaseException:
            self._log_file.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._loop.close()
            raise
        try:
            self._connect(start_timeout)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------

    def _connect(self, timeout: float) -> None:
        from qemu.qmp import QMPClient
        from qemu.qmp.protocol import ConnectError

        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("while starting")
            if self.qmp_path.exists():
                client = QMPClient(self.name)
                try:
                    self._loop.run_until_complete(
                        asyncio.wait_for(client.connect(str(self.qmp_path)), 5.0))
                    self._qmp = client
                    return
                except (ConnectError, asyncio.TimeoutError):
                    # Socket file created but not yet listening, or QEMU busy.
                    pass
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: no QMP on {self.qmp_path} after "
                                f"{timeout} s\n{log_tail(self.log_path)}")
            time.sleep(0.02)

    def _check_alive(self, doing: str) -> None:
        rc = self.proc.poll()
        if rc is not None:
            raise QemuExitedError(f"{self.name} exited with status {rc} {doing}: "
                                  f"{' '.join(self.argv)}\n{log_tail(self.log_path)}")

    def close(self, timeout: float = 10.0) -> int | None:
        """Quit QEMU (``quit``, then SIGTERM, then SIGKILL), reap it, clean up.

        Idempotent.  Returns QEMU's exit status.  The QEMU log stays readable
        in :attr:`log`.
        """
        if self._closed:
            return self.proc.returncode if hasattr(self, "proc") else None
        self._closed = True
        try:
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    # QEMU may hang up before replying to quit; that is fine.
                    self._loop.run_until_complete(
                        asyncio.wait_for(self._qmp.execute("quit"), 5.0))
                with contextlib.suppress(Exception):
                    self._loop.run_until_complete(
                        asyncio.wait_for(self._qmp.disconnect(), 5.0))
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            return stop_process(self.proc)
        finally:
            self._log_file.close()
            self.log = log_tail(self.log_path, 1 << 16)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._loop.close()

    def __enter__(self) -> QemuVM:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.close()
        if exc_type is not None:
            print(f"{self.name}: {' '.join(self.argv)}\n  exit status: "
                  f"{self.proc.returncode}\n  --- log ---\n{self.log_tail()}",
                  file=sys.stderr)

    # -- QMP ---------------------------------------------------------------

    def cmd(self, name: str, arguments: Mapping[str, object] | None = None,
            /, **args: object) -> object:
        """Run QMP command ``name`` and return its ``return`` value.

        Arguments come from ``arguments`` and/or keywords (QMP names with
        dashes need the dict).  Raises :class:`QMPCommandError` on a QMP
        error, :class:`QemuExitedError` if QEMU is gone.
        """
        from qemu.qmp import ExecuteError, QMPError

        if self._closed or self._qmp is None:
            raise QemuError(f"{self.name} is closed")
        full = {**(arguments or {}), **args}
        try:
            return self._loop.run_until_complete(asyncio.wait_for(
                self._qmp.execute(name, full or None), self.command_timeout))
        except ExecuteError as exc:
            raise QMPCommandError(name, full, exc.error_class, str(exc)) from exc
        except (QMPError, asyncio.TimeoutError, OSError, EOFError) as exc:
            self._check_alive(f"during QMP {name}")
            raise QemuError(f"{self.name}: QMP {name} {full} failed: {exc!r}") from exc

    def log_tail(self, limit: int = 4000) -> str:
        """The end of QEMU's stdout/stderr so far (for assertion messages)."""
        return self.log[-limit:] if self._closed else log_tail(self.log_path, limit)

    @property
    def events(self) -> list[dict]:
        """Every QMP event received so far (oldest first), as plain dicts."""
        if self._qmp is None:
            return []
        self._qmp.events.clear()  # the history keeps them; the queue need not
        return [dict(e) for e in self._qmp.events.history]

    def query_status(self) -> str:
        """The VM run state, e.g. ``prelaunch``, ``paused``, ``running``."""
        return self.cmd("query-status")["status"]

    def set_caps(self, caps: Mapping[str, bool | str]) -> None:
        """``migrate-set-capabilities``; values are bools or ``"on"``/``"off"``."""
        self.cmd("migrate-set-capabilities", capabilities=[
            {"capability": k, "state": _as_bool(v)} for k, v in caps.items()])

    def set_params(self, params: Mapping[str, object]) -> None:
        """``migrate-set-parameters`` with QMP's parameter names."""
        self.cmd("migrate-set-parameters", dict(params))

    def migrate(self, uri: str) -> None:
        """Start an outgoing migration to ``uri``; returns once it started."""
        self.cmd("migrate", uri=uri)

    def migrate_when_listening(self, uri: str, *, timeout: float = 30.0,
                               listener_alive: Callable[[], bool] = lambda: True,
                               retry_every: float = 0.1) -> dict:
        """:meth:`migrate` to a destination that may not listen yet.

        While the connection is refused, or the unix socket does not exist
        yet (and ``listener_alive()`` holds),
        the migration is started again, up to ``timeout`` seconds.  Returns the
        ``query-migrate`` reply once the migration is ``active`` (or already
        ``completed``); raises :class:`QemuMigrationFailed` for any other
        failure, or once the listener died.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.migrate(uri)
            try:
                return self.wait_for_status("active", "completed",
                                            timeout=max(1.0, deadline - time.monotonic()))
            except QemuMigrationFailed as exc:
                desc = str(exc.info.get("error-desc", "")).lower()
                refused = "refused" in desc or "no such file" in desc
                if not refused or not listener_alive() or time.monotonic() > deadline:
                    raise
            time.sleep(retry_every)

    def migrate_incoming(self, uri: str) -> None:
        """Start listening on ``uri`` (needs ``-incoming defer``)."""
        self.cmd("migrate-incoming", uri=uri)

    def query_migrate(self) -> dict:
        """The ``query-migrate`` reply (``{}`` before any migration)."""
        return self.cmd("query-migrate")

    def incoming_port(self, timeout: float = 10.0) -> int:
        """The TCP port an incoming migration on ``tcp:HOST:0`` is bound to."""
        deadline = time.monotonic() + timeout
        while True:
            for addr in self.query_migrate().get("socket-address", []):
                if addr.get("type") == "inet" and int(addr["port"]) != 0:
                    return int(addr["port"])
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: no listening socket-address in "
                                f"query-migrate after {timeout} s")
            time.sleep(0.02)

    def wait_for_status(self, *statuses: str, timeout: float = 120.0,
                        fail_on: Sequence[str] = ("failed",),
                        poll: float = 0.02) -> dict:
        """Poll ``query-migrate`` until its status is one of ``statuses``.

        Returns that ``query-migrate`` reply.  Raises
        :class:`QemuMigrationFailed` as soon as a status in ``fail_on`` is
        seen, ``TimeoutError`` (naming the last status) after ``timeout``
        seconds, :class:`QemuExitedError` if QEMU dies meanwhile.
        """
        if not statuses:
            raise ValueError("no status to wait for")
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            status = info.get("status")
            if status in statuses:
                return info
            if status in fail_on:
                raise QemuMigrationFailed(self.name, info)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: migration status still {status!r} "
                                   f"after {timeout} s, wanted {statuses}: {info}")
            time.sleep(poll)

    def completed_from(self, source: ManagedProcess, rc: int, timeout: float = 120.0) -> dict:
        """An engine source into this VM ended well: ``rc`` (its exit status)
        is 0, else the failure shows both sides; then this side completed."""
        assert rc == 0, (f"engine migrate failed\n{source.describe()}\n"
                         f"QEMU query-migrate: {self.query_migrate()}\n"
                         f"QEMU log: {self.log_tail()}")
        return self.wait_for_status("completed", timeout=timeout)


def _as_bool(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "true", "yes"):
        return True
    if value in ("off", "false", "no"):
        return False
    raise ValueError(f"not a capability state: {value!r}")

