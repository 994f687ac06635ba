"""An idle guest's untouched memory stays untouched by its migration.

The guest's RAM file is sparse: data in 1% of the pages, holes elsewhere.
Whatever the channel setup, the source finds the holes' zero pages without
reading them (a read through a shared tmpfs mapping would allocate them,
and for a big idle guest take most of the migration's time), and checking
the migration (digests on both sides) reads through the file, which leaves
holes alone too.  So after ``engine migrate``, every zero page of the source
is still a hole, and the destination holds the same bytes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.ram import holes as holes_module
from engine.ram.holes import hole_mask

PS = 4096
PAGES = 8192           # 32 MiB
MODES = {
    "single": [],
    "multifd": ["--cap", "multifd=on", "--param", "multifd-channels=2"],
    "multifd-zstd-legacy": ["--cap", "multifd=on", "--param", "multifd-channels=2",
                            "--param", "multifd-compression=zstd",
                            "--param", "zero-page-detection=legacy"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_zero_pages_of_a_sparse_guest_stay_holes(tmp_shm_path, tmp_path, mode, monkeypatch):
    # The check below must see every hole, not just what the engine looks at.
    monkeypatch.setattr(holes_module, "STRIDE", 1)
    monkeypatch.setattr(holes_module, "MAX_PROBES", 1 << 20)
    rng = np.random.default_rng(3)
    # Lone data pages (odd pages are holes): the engine finds every hole
    # around them; after a run of data it may read a few hole pages.
    data = np.sort(rng.choice(PAGES // 2, PAGES // 100, replace=False)) * 2
    fd = os.open(tmp_shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, PAGES * PS)
        for page in data.tolist():
            os.pwrite(fd, rng.integers(1, 256, PS, dtype=np.uint8).tobytes(), page * PS)
    finally:
        os.close(fd)
    dst = tmp_shm_path.with_name(tmp_shm_path.name + "-dst")
    report = tmp_path / "migrate.json"
    try:
        r = subprocess.run(
            [sys.executable, "-m", "engine", "migrate", "--machine", "none",
             "--ram", str(PAGES * PS), "--mem-path", str(tmp_shm_path),
             "--dst-mem-path", str(dst), "--workload", "none", *MODES[mode],
             "--json", str(report), "--quiet"],
            capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        info = json.loads(report.read_text())
        assert info["migration"]["status"] == "completed"
        ram = info["migration"]["ram"]
        assert ram["normal"] == len(data)
        assert ram["duplicate"] == PAGES - len(data)
        with open(tmp_shm_path, "rb") as src_file, open(dst, "rb") as dst_file:
            holes = hole_mask(src_file.fileno(), np.arange(PAGES), PS)
            assert holes is not None
            assert np.array_equal(np.flatnonzero(~holes), data)  # no zero page was read
            src_file.seek(0)                     # lseek(SEEK_DATA) moved it
            a, b = src_file.read(), dst_file.read()
            assert len(a) == len(b) == PAGES * PS
            bad = [i for i in range(PAGES) if a[i * PS:(i + 1) * PS] != b[i * PS:(i + 1) * PS]]
            assert not bad, (bad[:5], len(bad), [int(x) for x in data[:5]])
    finally:
        dst.unlink(missing_ok=True)
