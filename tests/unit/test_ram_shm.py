"""Shared-memory helpers: naming, space checks, and the resource-tracker trap."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from engine.errors import ConfigError, GuestError
from engine.ram import shm as shm_mod
from engine.ram.shm import SHM_DIR, attach_segment, create_segment, unlink_segment


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def _run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def segment():
    shm = create_segment(3 * 4096)
    yield shm
    shm.close()
    unlink_segment(shm)


def test_create_names_sizes_and_zero_fills(segment):
    assert segment.name.startswith("engine-")
    assert _exists(segment.name)
    assert segment.size == 3 * 4096
    assert not any(segment.buf)
    # Reserved, not sparse: tmpfs reports the blocks as allocated.
    assert os.stat(os.path.join(SHM_DIR, segment.name)).st_blocks * 512 >= 3 * 4096


def test_unlink_removes_the_name_and_is_idempotent():
    shm = create_segment(4096)
    name = shm.name
    shm.buf[0] = 5
    unlink_segment(shm)
    assert not _exists(name)
    assert shm.buf[0] == 5          # the mapping outlives the name
    unlink_segment(shm)
    shm.close()


def test_create_rejects_bad_sizes():
    with pytest.raises(ConfigError):
        create_segment(0)
    st = os.statvfs(SHM_DIR)
    too_big = st.f_bavail * st.f_frsize + (1 << 30)
    with pytest.raises(GuestError, match="does not fit"):
        create_segment(too_big)


def test_fallocate_failure_is_a_clean_error_and_leaves_nothing(monkeypatch):
    created = []
    real = shm_mod.SharedMemory

    def recording(*args, **kwargs):
        shm = real(*args, **kwargs)
        created.append(shm.name)
        return shm

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm_mod, "SharedMemory", recording)
    monkeypatch.setattr(shm_mod.os, "posix_fallocate", no_space)
    with pytest.raises(GuestError, match="cannot reserve"):
        create_segment(4096)
    assert created and not _exists(created[0])


def test_attach_sees_the_same_memory(segment):
    other = attach_segment(segment.name)
    try:
        other.buf[10] = 42
        assert segment.buf[10] == 42
    finally:
        other.close()


def test_attach_missing_segment_is_a_guest_error():
    with pytest.raises(GuestError, match="does not exist"):
        attach_segment("engine-does-not-exist-0123456789")


def test_child_that_attaches_and_exits_leaves_segment_and_no_warnings(segment):
    result = _run_child(f"""
        from engine.ram.shm import attach_segment
        shm = attach_segment({segment.name!r})
        shm.buf[0] = 7
        shm.close()
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert _exists(segment.name)
    assert segment.buf[0] == 7


def test_child_crashing_while_attached_leaves_segment(segment):
    result = _run_child(f"""
        import os
        from engine.ram.shm import attach_segment
        shm = attach_segment({segment.name!r})
        shm.buf[1] = 9
        os._exit(3)
    """)
    assert result.returncode == 3
    assert result.stderr == ""
    assert _exists(segment.name) and segment.buf[1] == 9


def test_plain_stdlib_attach_would_destroy_the_segment():
    # The trap the helpers avoid, shown on a throwaway segment: proves the
    # child-process tests above can fail.
    shm = create_segment(4096)
    try:
        result = _run_child(f"""
            from multiprocessing.shared_memory import SharedMemory
            SharedMemory({shm.name!r}).close()
        """)
        assert result.returncode == 0
        assert not _exists(shm.name)
        assert "leaked shared_memory" in result.stderr
    finally:
        shm.close()
        unlink_segment(shm)
