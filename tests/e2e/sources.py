"""A source guest for in-process failure tests, and helpers to run and judge it."""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from engine.machine import get_profile
from engine.migration.source import SourceMigration
from engine.options import MigrationOptions
from engine.ram.guest import Guest
from engine.ram.image import write_mixed_image
from engine.ram.workloads import REG_CHUNKS, WorkloadSpec
from engine.transport import connect

RAM = 16 << 20
TIMEOUT = 60
PROFILE = get_profile("engine")


class SourceGuest:
    """A running guest plus what it looked like before anything happened."""

    def __init__(self, kind: str, tmp_shm_path: Path, seed: int = 21):
        self.kind = kind
        # Pre-filled either way, so that every migration has megabytes to send
        # (a fresh guest is nearly all zero pages: nine bytes each).
        write_mixed_image(tmp_shm_path, RAM, seed=seed)
        if kind == "none":
            spec, vcpus = WorkloadSpec("none"), 1
        else:
            spec, vcpus = WorkloadSpec("ab", dirty_rate_mbps=64), 2
        self.guest = Guest.create([("ram0", RAM, str(tmp_shm_path))], vcpus=vcpus,
                                  workload=spec, start=True)
        self.digest = self._digest()

    def _digest(self) -> str:
        return hashlib.sha256(self.guest.blocks[0].buf).hexdigest()

    def migration(self, opts: MigrationOptions, **kw) -> SourceMigration:
        mig = SourceMigration(self.guest, PROFILE, opts, vcpus=self.guest.nvcpus, **kw)
        # Multifd workers start here, in the test's thread: a child dies with
        # the thread that started it.
        mig.prepare()
        return mig

    def assert_intact(self) -> None:
        """Running, vCPUs making progress, memory untouched by the migration."""
        assert self.guest.running
        if self.kind == "none":
            assert self._digest() == self.digest, "the source wrote guest memory"
        else:
            regs = self.guest.registers
            before = regs[:, REG_CHUNKS].copy()
            deadline = time.monotonic() + TIMEOUT
            while not (regs[:, REG_CHUNKS] > before).all():
                assert time.monotonic() < deadline, "the source vCPUs do not run"
                time.sleep(0.01)

    def close(self) -> None:
        self.guest.close()


@pytest.fixture(params=["none", "ab"])
def source(request, tmp_shm_path):
    g = SourceGuest(request.param, tmp_shm_path)
    try:
        yield g
    finally:
        g.close()


def run_bounded(mig: SourceMigration, uri: str):
    """``mig.run`` over a new connection; a hang becomes a cancel and a failure."""
    hung = []
    watchdog = threading.Timer(TIMEOUT, lambda: (hung.append(True), mig.cancel()))
    watchdog.start()
    try:
        with connect(uri) as channel:
            info = mig.run(channel, uri)
    finally:
        watchdog.cancel()
    assert not hung, "the migration hung"
    return info


def statuses(mig: SourceMigration) -> list[str]:
    return [s.value for _, s in mig.state.history]


def assert_failed(info, mig: SourceMigration) -> str:
    q = info.to_qmp()
    assert q["status"] == "failed", q
    assert q.get("error-desc"), q
    assert "completed" not in statuses(mig)
    return q["error-desc"]
