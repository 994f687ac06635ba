"""An ``engine vm`` process driven with the qemu.qmp package, for the QMP tests.

(The harness lives in a ``test_`` module so that it sits with the tests it
serves; its own test is the last one here.)

:class:`EngineVM` starts ``python -m engine vm --qmp unix:... ARGS`` (its
output in log files, its process group killed on exit), connects a
``qemu.qmp.QMPClient`` on a private event loop, and keeps every event it
receives.  Leaving it quits the VM over QMP and requires a clean exit.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from tests.conftest import ENGINE_CMD
from tests.qemu import ManagedProcess

#: bound for any wait; never reached when things work
WAIT = 120.0


class EngineVM:
    def __init__(self, tmp_path: Path, name: str, *args: str, start_timeout: float = 60.0):
        from qemu.qmp import QMPClient
        self.name = name
        self.qmp_path = Path(tmp_path) / f"{name}.qmp"
        self.proc = ManagedProcess([*ENGINE_CMD, "vm", "--qmp", f"unix:{self.qmp_path}",
                                    "--quiet", *args], tmp_path, name)
        self.loop = asyncio.new_event_loop()
        self.qmp = QMPClient(name)
        self.closed = False
        try:
            self._connect(start_timeout)
        except BaseException:
            self.close(quit=False)
            raise

    def _connect(self, timeout: float) -> None:
        from qemu.qmp.protocol import ConnectError
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if self.qmp_path.exists():
                try:
                    self.loop.run_until_complete(
                        asyncio.wait_for(self.qmp.connect(str(self.qmp_path)), 5))
                    return
                except (ConnectError, asyncio.TimeoutError):
                    pass
            assert time.monotonic() < deadline, f"no QMP monitor\n{self.proc.describe()}"
            time.sleep(0.02)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited\n{self.proc.describe()}")

    # -- QMP ----------------------------------------------------------------------------
    def cmd(self, name: str, arguments: dict | None = None, *, oob: bool = False):
        return self.loop.run_until_complete(asyncio.wait_for(
            self.qmp.execute(name, arguments, oob=oob), WAIT))

    def set_caps(self, **caps: bool) -> None:
        self.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]})

    def set_params(self, **params) -> None:
        self.cmd("migrate-set-parameters", {k.replace("_", "-"): v for k, v in params.items()})

    @property
    def events(self) -> list[dict]:
        """Every event received so far, oldest first."""
        self.qmp.events.clear()     # the history keeps them
        return [dict(e) for e in self.qmp.events.history]

    def statuses(self) -> list[str]:
        """MIGRATION statuses, in order."""
        return [e["data"]["status"] for e in self.events if e["event"] == "MIGRATION"]

    def timeline(self) -> list[str]:
        """MIGRATION statuses with STOP and RESUME, in order."""
        return [e["data"]["status"] if e["event"] == "MIGRATION" else e["event"]
                for e in self.events if e["event"] in ("MIGRATION", "STOP", "RESUME")]

    def wait_event(self, name: str, predicate=lambda e: True, timeout: float = WAIT) -> dict:
        """The first event ``name`` received (or coming) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        exited = False
        while True:
            for e in self.events:
                if e["event"] == name and predicate(e):
                    return e
            if exited:      # and what it sent before exiting has been read
                self._check_alive()
            exited = self.proc.poll() is not None
            assert time.monotonic() < deadline, \
                f"{self.name}: no {name} event; got {self.events}\n{self.proc.describe()}"
            self.loop.run_until_complete(asyncio.sleep(0.02))

    def wait_status(self, *statuses: str, timeout: float = WAIT) -> dict:
        """Wait for a MIGRATION event with one of ``statuses``; fail on 'failed'."""
        wanted = set(statuses)
        ev = self.wait_event("MIGRATION", lambda e: e["data"]["status"] in wanted | {"failed"},
                             timeout)
        if ev["data"]["status"] not in wanted:
            raise AssertionError(f"{self.name}: migration failed: {self.cmd('query-migrate')}")
        return ev

    # -- the end ------------------------------------------------------------------------
    def close(self, quit: bool = True) -> int | None:
        """Quit over QMP and return the exit status (then kill whatever is left)."""
        if self.closed:
            return self.proc.proc.returncode
        self.closed = True
        rc = None
        try:
            if quit and self.proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.cmd("quit")
                    self.wait_event("SHUTDOWN", timeout=30)
                with contextlib.suppress(Exception):
                    rc = self.proc.wait(60)
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(asyncio.wait_for(self.qmp.disconnect(), 5))
        finally:
            self.proc.close()
            self.loop.close()
        return rc

    def __enter__(self) -> "EngineVM":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        rc = self.close()
        if exc_type is None:
            assert rc == 0, f"{self.name} exited with {rc}\n{self.proc.describe()}"
        else:
            print(self.proc.describe())


def vm_pair(tmp_path: Path, src_args=(), dst_args=()) -> tuple[EngineVM, EngineVM]:
    """A source ``engine vm`` and a destination waiting (``--incoming defer``);
    if the destination fails to start, the source is closed before raising."""
    src = EngineVM(tmp_path, "src", *src_args)
    try:
        dst = EngineVM(tmp_path, "dst", *dst_args, "--incoming", "defer")
    except BaseException:
        src.close()
        raise
    return src, dst


def test_quit_ends_the_vm_with_shutdown_and_status_0(tmp_path):
    pytest.importorskip("qemu.qmp")
    vm = EngineVM(tmp_path, "vm", "--ram", "16M", "--vcpus", "1", "--workload", "ab",
                  "--json", str(tmp_path / "vm.json"))
    try:
        assert vm.cmd("query-status")["status"] == "running"
        greeting = vm.qmp.greeting.QMP
        assert greeting.capabilities == ["oob"]
        assert greeting.version["package"].startswith("engine ")
    finally:
        rc = vm.close()
    assert rc == 0, vm.proc.describe()
    ends = [e for e in vm.qmp.events.history if e["event"] == "SHUTDOWN"]
    assert [e["data"] for e in ends] == [{"guest": False, "reason": "host-qmp-quit"}]
    import json
    report = json.loads((tmp_path / "vm.json").read_text())
    assert report["status"]["status"] == "running" and report["migration"] == {}
