"""RAM blocks over shared memory and over files."""
from __future__ import annotations

import errno
import gc
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine.errors import ConfigError, GuestError
from engine.ram.block import RamBlock, RamBlockHandle
from engine.ram.shm import SHM_DIR, create_segment, unlink_segment

PAGE = 4096


def _shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


def _in_child(handle: RamBlockHandle, body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import pickle
        from engine.ram.block import RamBlock
        block = RamBlock.attach(pickle.loads({pickle.dumps(handle)!r}))
    """) + textwrap.dedent(body) + "\nblock.close()\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result


def test_shm_block_geometry_and_views():
    with RamBlock.create("pc.ram", 8 * PAGE) as block:
        assert block.owner
        assert (block.idstr, block.used_length, block.page_size, block.npages) == \
            ("pc.ram", 8 * PAGE, PAGE, 8)
        assert len(block.buf) == 8 * PAGE
        assert block.array.shape == (8 * PAGE,) and block.array.dtype == np.uint8
        assert block.pages.shape == (8, PAGE)
        block.pages[3, 5] = 0xAB
        assert block.array[3 * PAGE + 5] == 0xAB and block.buf[3 * PAGE + 5] == 0xAB
        handle = block.handle
        assert handle.shm_name.startswith("engine-") and handle.mem_path is None
        assert pickle.loads(pickle.dumps(handle)) == handle
        name = handle.shm_name
    assert not _shm_exists(name)
    assert block.closed


@pytest.mark.parametrize("size,page_size,idstr", [
    (0, PAGE, "a"), (PAGE + 1, PAGE, "a"), (3000, 3000, "a"), (PAGE, PAGE, ""),
    (PAGE, PAGE, "x" * 256),
])
def test_bad_geometry_is_a_config_error(size, page_size, idstr):
    with pytest.raises(ConfigError):
        RamBlock.create(idstr, size, page_size=page_size)


def test_attach_shares_memory_and_does_not_own():
    with RamBlock.create("ram", 4 * PAGE) as block:
        other = RamBlock.attach(block.handle)
        assert not other.owner
        other.pages[2, 0] = 17
        assert block.pages[2, 0] == 17
        with pytest.raises(GuestError):
            other.unlink()
        other.close()
        other.close()
        assert _shm_exists(block.handle.shm_name)


def test_shm_block_data_visible_across_processes():
    with RamBlock.create("ram", 4 * PAGE) as block:
        block.pages[0, 0] = 11
        _in_child(block.handle, """
            assert block.pages[0, 0] == 11
            block.pages[1, 100] = 22
        """)
        assert block.pages[1, 100] == 22
        assert _shm_exists(block.handle.shm_name)


def test_file_block_keeps_existing_contents_and_grows(tmp_path):
    path = tmp_path / "guest.mem"
    path.write_bytes(b"hello" + bytes(PAGE - 5))
    with RamBlock.create("ram", 4 * PAGE, mem_path=str(path)) as block:
        assert bytes(block.buf[:5]) == b"hello"
        assert not block.array[PAGE:].any()
        block.pages[2, 0] = 99
        assert block.handle.mem_path == str(path) and block.handle.shm_name is None
    assert path.exists()                         # never deleted
    assert path.stat().st_size == 4 * PAGE
    data = path.read_bytes()
    assert data[:5] == b"hello" and data[2 * PAGE] == 99


def test_file_block_never_shrinks_a_larger_file(tmp_path):
    path = tmp_path / "big.mem"
    path.write_bytes(bytes([1]) * PAGE + bytes([2]) * PAGE + bytes([3]) * PAGE)
    block = RamBlock.create("ram", 2 * PAGE, mem_path=str(path))
    try:
        assert block.used_length == 2 * PAGE and len(block.buf) == 2 * PAGE
        assert (block.pages[0] == 1).all() and (block.pages[1] == 2).all()
    finally:
        block.close()
        block.unlink()                           # a no-op for files
    assert path.stat().st_size == 3 * PAGE
    assert path.read_bytes()[2 * PAGE:] == bytes([3]) * PAGE


def test_file_block_data_visible_across_processes(tmp_path):
    path = tmp_path / "shared.mem"
    with RamBlock.create("ram", 2 * PAGE, mem_path=str(path)) as block:
        block.pages[0, 1] = 5
        _in_child(block.handle, """
            assert block.pages[0, 1] == 5
            block.pages[1, 2] = 6
        """)
        assert block.pages[1, 2] == 6


def test_file_block_out_of_space_is_a_clean_error(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    new = tmp_path / "new.mem"
    with pytest.raises(GuestError, match="cannot reserve"):
        RamBlock.create("ram", 2 * PAGE, mem_path=str(new))
    assert not new.exists()                      # we made it, we remove it
    old = tmp_path / "old.mem"
    old.write_bytes(b"keep")
    with pytest.raises(GuestError, match="cannot reserve"):
        RamBlock.create("ram", 2 * PAGE, mem_path=str(old))
    assert old.read_bytes()[:4] == b"keep"       # the user's file survives


def test_attach_errors(tmp_path):
    with pytest.raises(GuestError):
        RamBlock.attach(RamBlockHandle("ram", PAGE, PAGE, "engine-missing-0000", None))
    with pytest.raises(GuestError):
        RamBlock.attach(RamBlockHandle("ram", PAGE, PAGE, None, str(tmp_path / "nope")))
    small = tmp_path / "small.mem"
    small.write_bytes(bytes(PAGE))
    with pytest.raises(GuestError, match="needs"):
        RamBlock.attach(RamBlockHandle("ram", 2 * PAGE, PAGE, None, str(small)))
    with pytest.raises(ConfigError):
        RamBlockHandle("ram", PAGE, PAGE, None, None)


def test_from_segment_uses_a_foreign_segment_without_owning_it():
    shm = create_segment(3 * PAGE)
    try:
        shm.buf[PAGE] = 77
        block = RamBlock.from_segment("ram", shm.name, 2 * PAGE)
        assert not block.owner and block.npages == 2
        assert block.pages[1, 0] == 77
        with pytest.raises(GuestError):
            block.unlink()
        with block:
            pass
        assert _shm_exists(shm.name)
    finally:
        shm.close()
        unlink_segment(shm)


def _mapped(name: str) -> bool:
    with open("/proc/self/maps") as maps:
        return any(name in line for line in maps)


def test_close_leaves_the_mapping_to_live_views_until_they_go():
    block = RamBlock.create("ram", 2 * PAGE)
    name = block.handle.shm_name
    view = block.pages[1]
    view[0] = 3
    block.close()
    block.unlink()
    assert block.closed
    with pytest.raises(GuestError):
        block.array
    assert view[0] == 3                          # still mapped: no dangling view
    view[1] = 4
    assert _mapped(name)
    del view
    gc.collect()
    assert not _mapped(name)


def test_close_unmaps_at_once_without_outside_views(tmp_path):
    with RamBlock.create("ram", 2 * PAGE) as block:
        name = block.handle.shm_name
        block.pages[0, 0] = 1
    assert not _mapped(name)
    path = str(tmp_path / "m")
    with RamBlock.create("ram", 2 * PAGE, mem_path=path) as block:
        assert _mapped(path)
    assert not _mapped(path)


def test_populate_maps_every_page_and_keeps_the_contents(tmp_shm_path):
    """QEMU's prealloc=on: every page faulted in for writing in this process
    (no page left for the migration to fault on), nothing changed."""
    import psutil

    def mapped() -> int:
        return sum(m.rss for m in psutil.Process().memory_maps()
                   if m.path == str(tmp_shm_path))

    size = 256 * 4096
    content = bytes(range(256)) * (size // 256)
    tmp_shm_path.write_bytes(content)
    with RamBlock.create("m0", size, mem_path=str(tmp_shm_path)) as block:
        assert mapped() < size // 2         # nothing touched through the mapping yet
        block.populate()
        assert mapped() >= size
        assert block.array.tobytes() == content
