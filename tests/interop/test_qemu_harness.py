"""The QEMU harness on its own: QEMU to QEMU, before the engine takes part.

If these fail, the interop tests' failures say nothing about the engine.
"""
from __future__ import annotations

import pytest

from tests.qemu import (QEVM_HEADER, QemuMigrationFailed, QemuVM, QMPCommandError,
                        fill_image, free_tcp_port, image_differences, parse_size,
                        qemu_available)

_OK, _WHY = qemu_available()
pytestmark = [pytest.mark.interop, pytest.mark.skipif(not _OK, reason=_WHY)]

SIZE = "64M"
SEED = 20240501


def test_starts_paused_in_prelaunch(tmp_shm_path):
    with QemuVM(tmp_shm_path, SIZE) as vm:
        assert vm.query_status() == "prelaunch"
        assert vm.query_migrate() == {}
        # The backend file is the guest RAM, sized by QEMU.
        assert tmp_shm_path.stat().st_size == parse_size(SIZE)
    assert vm.proc.returncode is not None


def test_qmp_errors_carry_class_and_description(tmp_shm_path):
    with QemuVM(tmp_shm_path, SIZE) as vm:
        with pytest.raises(QMPCommandError) as info:
            vm.cmd("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert "no-such-command" in info.value.desc


def test_tcp_migration_copies_ram_exactly(tmp_shm_path, tmp_path):
    src_ram = tmp_shm_path
    dst_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-dst")
    stats = fill_image(src_ram, SIZE, SEED)
    try:
        with QemuVM(src_ram, SIZE, name="src") as src, \
                QemuVM(dst_ram, SIZE, incoming="defer", name="dst") as dst:
            dst.migrate_incoming("tcp:127.0.0.1:0")
            port = dst.incoming_port()
            src.set_params({"max-bandwidth": 1_000_000_000})
            src.migrate(f"tcp:127.0.0.1:{port}")
            info = src.wait_for_status("completed", timeout=120)
            dst.wait_for_status("completed", timeout=120)
            # A paused source sends every page once: zeros as 'duplicate'.
            assert info["ram"]["duplicate"] == stats.zero_pages
            assert info["ram"]["normal"] == stats.pages - stats.zero_pages
            assert image_differences(src_ram, dst_ram) is None
    finally:
        dst_ram.unlink(missing_ok=True)


def test_failed_migration_raises_with_error_desc(tmp_shm_path):
    with QemuVM(tmp_shm_path, SIZE) as vm:
        vm.migrate(f"tcp:127.0.0.1:{free_tcp_port()}")  # nobody listens
        with pytest.raises(QemuMigrationFailed, match="refused") as info:
            vm.wait_for_status("completed", timeout=30)
        assert info.value.info["status"] == "failed"


def test_migrate_retries_until_destination_listens(tmp_shm_path):
    dst_ram = tmp_shm_path.with_name(tmp_shm_path.name + "-dst")
    fill_image(tmp_shm_path, SIZE, SEED)
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    try:
        with QemuVM(tmp_shm_path, SIZE, name="src") as src, \
                QemuVM(dst_ram, SIZE, incoming="defer", name="dst") as dst:
            calls = []

            def start_listening_late() -> bool:
                # Called after a refused attempt: only now open the port.
                if not calls:
                    dst.migrate_incoming(uri)
                calls.append(1)
                return True

            src.set_params({"max-bandwidth": 1_000_000_000})
            src.migrate_when_listening(uri, timeout=60, listener_alive=start_listening_late)
            src.wait_for_status("completed", timeout=120)
            dst.wait_for_status("completed", timeout=120)
            assert calls, "the first attempt should have been refused"
            assert image_differences(tmp_shm_path, dst_ram) is None
    finally:
        dst_ram.unlink(missing_ok=True)


def test_exec_migration_writes_a_qevm_stream(tmp_shm_path, tmp_path):
    fill_image(tmp_shm_path, SIZE, SEED)
    stream = tmp_path / "vm.stream"
    with QemuVM(tmp_shm_path, SIZE) as vm:
        vm.migrate(f"exec:cat > {stream}")
        vm.wait_for_status("completed", timeout=120)
    with open(stream, "rb") as f:
        assert f.read(len(QEVM_HEADER)) == QEVM_HEADER
    # Roughly half the pages are random or text: they travel uncompressed.
    assert stream.stat().st_size > parse_size(SIZE) // 4


def test_fill_image_is_deterministic_and_mixed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sa = fill_image(a, "4M", 7)
    fill_image(b, "4M", 7)
    fill_image(c, "4M", 8)
    assert image_differences(a, b) is None
    assert image_differences(a, c) is not None
    assert sa.pages == 1024
    assert sa.zero_pages + sa.text_pages + sa.random_pages == sa.pages
    # Loose bounds: the mix is random, but 1024 draws keep it near 50/40/10.
    assert 400 < sa.zero_pages < 620 and 300 < sa.text_pages < 520 and 50 < sa.random_pages < 170
