"""XBZRLE end to end between two engines: a guest that keeps re-dirtying its
pages, a link slow enough for several passes, and every re-sent page that hits
the cache goes as a delta (QEMU's ram.c save_xbzrle_page / load_xbzrle)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from engine.library import make_options
from engine.ram.image import write_mixed_image
from engine.ram.guest import Guest
from engine.ram.workloads import WorkloadSpec

from tests.e2e.test_inprocess_precopy import migrate_pair

ENGINE = [sys.executable, "-m", "engine"]
#: a random workload writing 8 MiB/s, 90% of it into 5% of the pages, over a
#: 16 MiB/s link with a 20 ms downtime limit: the first pass over half-full
#: RAM takes over a second, the hot pages are dirty again at every later
#: pass, and the passes after the first re-send them from the cache
LIVE = ["--workload", "random", "--dirty-rate", "8", "--hot-set", "0.05",
        "--cap", "xbzrle=on", "--param", "max-bandwidth=16M", "--param", "downtime-limit=20"]


def test_cli_live_migration_with_xbzrle(tmp_path, tmp_shm_path):
    """engine migrate: a random workload re-dirtying a hot set, a 16 MiB/s link
    and a 50 ms downtime limit, so that several passes re-send hot pages."""
    report = tmp_path / "report.json"
    write_mixed_image(tmp_shm_path, 32 << 20, 14)
    res = subprocess.run(ENGINE + [
        "migrate", "--ram", "32M", "--mem-path", str(tmp_shm_path), *LIVE,
        "--param", "xbzrle-cache-size=16M", "--json", str(report)],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(report.read_text())
    assert r["verification"]["memory_equal"] is True, r["verification"]
    x = r["migration"]["xbzrle-cache"]
    assert r["migration"]["ram"]["dirty-sync-count"] >= 3
    assert x["pages"] > 0 and x["cache-size"] == 16 << 20, x
    assert r["destination"]["xbzrle_pages"] > 0
    assert "xbzrle pages: " in res.stdout and "xbzrle cache miss rate: " in res.stdout


def test_engine_load_applies_xbzrle_records_of_a_live_stream(tmp_path, tmp_shm_path):
    """A live source with xbzrle into a file, then engine load --mem-path:
    the image equals the source's RAM at switchover."""
    stream, image, report = tmp_path / "s.bin", tmp_path / "ram.img", tmp_path / "load.json"
    write_mixed_image(tmp_shm_path, 32 << 20, 15)
    res = subprocess.run(ENGINE + [
        "migrate", "--to", f"file:{stream}", "--ram", "32M", "--mem-path", str(tmp_shm_path),
        *LIVE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(ENGINE + ["load", str(stream), "--mem-path", str(image),
                                   "--json", str(report)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    ram = json.loads(report.read_text())["ram"]
    assert ram["xbzrle_pages"] > 0, ram
    assert "xbzrle pages: " in res.stdout
    assert image.read_bytes() == tmp_shm_path.read_bytes()


def test_inprocess_xbzrle_live_migration_lands_every_byte(tmp_shm_path):
    opts = make_options({"xbzrle": True}, {"max-bandwidth": 24 << 20, "downtime-limit": 300,
                                           "xbzrle-cache-size": 8 << 20})
    wl = WorkloadSpec("random", dirty_rate_mbps=8, hot_set=0.05)
    with Guest.create([("pc.ram", 16 << 20)], vcpus=1, workload=wl) as sg, \
            Guest.create([("pc.ram", 16 << 20)], vcpus=1, workload=wl, start=False) as dg:
        sg.block("pc.ram").array[::7] = 0x11      # not all zero pages
        time.sleep(0.2)
        src, dst, info, dinfo = migrate_pair(sg, dg, opts, vcpus=1)
        assert info.status == "completed", info.error_desc
        assert dinfo.status == "completed", dinfo.error_desc
        assert src.switchover_digests == dst.digests
        q = info.to_qmp()
        x = q["xbzrle-cache"]
        assert x["cache-size"] == 8 << 20
        assert x["pages"] > 0 and x["bytes"] > 0 and x["cache-miss"] > 0, x
        assert dst.ram.xbzrle_pages > 0
        assert q["ram"]["dirty-sync-count"] >= 3


def test_no_xbzrle_cache_member_without_the_capability():
    opts = make_options()
    with Guest.create([("m0", 1 << 20)], vcpus=1, workload=WorkloadSpec("none"),
                      start=False) as sg, \
            Guest.create([("m0", 1 << 20)], vcpus=1, workload=WorkloadSpec("none"),
                         start=False) as dg:
        _, _, info, _ = migrate_pair(sg, dg, opts, vcpus=1)
        assert info.status == "completed"
        assert "xbzrle-cache" not in info.to_qmp()


def test_cache_resized_live_by_migrate_set_parameters(tmp_shm_path):
    """xbzrle-cache-size changed mid-migration (QMP migrate-set-parameters):
    the running cache takes the new size and the migration stays exact."""
    import threading

    from engine.machine import get_profile
    from engine.migration.destination import DestinationMigration
    from engine.migration.source import SourceMigration
    from engine.transport import connect, listen

    opts = make_options({"xbzrle": True}, {"max-bandwidth": 16 << 20, "downtime-limit": 50,
                                           "xbzrle-cache-size": 32 << 20})
    wl = WorkloadSpec("random", dirty_rate_mbps=8, hot_set=0.05)
    profile = get_profile("engine")
    sizes = []
    with Guest.create([("pc.ram", 32 << 20)], vcpus=1, workload=wl) as sg, \
            Guest.create([("pc.ram", 32 << 20)], vcpus=1, workload=wl, start=False) as dg:
        sg.block("pc.ram").array[::5] = 0x22
        listener = listen("tcp:127.0.0.1:0")
        dst = DestinationMigration(profile, opts, guest=dg, vcpus=1, verify=True)
        result = {}

        def serve():
            with listener.accept(timeout=30) as ch:
                result["dst"] = dst.run(ch)

        def on_pass(count):
            if count == 2:
                src.set_parameters({"xbzrle-cache-size": 1 << 20})
                sizes.append(src.ram.xbzrle.cache.size)

        t = threading.Thread(target=serve)
        t.start()
        src = SourceMigration(sg, profile, opts, vcpus=1, on_pass=on_pass)
        src.compute_digests = True
        with connect(listener.uri) as ch:
            info = src.run(ch)
        t.join(60)
        listener.close()
        assert info.status == "completed", info.error_desc
        assert result["dst"].status == "completed", result["dst"].error_desc
        assert sizes == [1 << 20]
        assert info.to_qmp()["xbzrle-cache"]["cache-size"] == 1 << 20
        assert src.switchover_digests == dst.digests


def test_xbzrle_then_postcopy(tmp_path, tmp_shm_path):
    """xbzrle during precopy, then postcopy: no XBZRLE record after the switch
    (the destination refuses one there, as QEMU's does), memory exact."""
    report = tmp_path / "report.json"
    write_mixed_image(tmp_shm_path, 32 << 20, 16)
    # ab: the destination checks the guest's own pattern (its memory cannot
    # be compared with the source's once it ran in postcopy).
    res = subprocess.run(ENGINE + [
        "migrate", "--ram", "32M", "--mem-path", str(tmp_shm_path), "--workload", "ab",
        "--dirty-rate", "64", "--cap", "xbzrle=on", "--param", "max-bandwidth=16M",
        "--cap", "postcopy-ram=on", "--postcopy-after", "3", "--json", str(report)],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(report.read_text())
    assert r["verification"]["ok"] is True and r["verification"]["ab"], r["verification"]
    assert r["migration"]["ram"]["postcopy-bytes"] > 0
    assert r["migration"]["xbzrle-cache"]["pages"] > 0, r["migration"]
