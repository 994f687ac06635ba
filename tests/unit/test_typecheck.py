"""engine/ type-checks: mypy with the [mypy] settings of setup.cfg (what
``make typecheck`` and .ci/run run), so ``make test`` alone catches a
regression too: a None passed where a value is needed, a wrong type passed
to a driver, an object that lacks what a Protocol of the seams asks for."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed (pip install -e '.[test]')")


def _mypy_on(path: Path, cache: Path) -> subprocess.CompletedProcess:
    """mypy with the project's settings over one file of a test's own."""
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", "setup.cfg",
                           "--cache-dir", str(cache), str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_engine_type_checks():
    # The config file names what to check (files = engine); the cache in the
    # checkout makes a rerun take a second or two instead of ten.
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "setup.cfg"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout}{proc.stderr}"


def test_a_wrong_pass_is_caught(tmp_path):
    """The settings are strict enough for what they are for: an Optional used
    as a value and a guest that lacks what SourceMigration needs both fail."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from engine.migration.source import SourceMigration\n"
        "from engine.machine import get_profile\n"
        "from engine.options import MigrationOptions\n"
        "\n"
        "class NotAGuest:\n"
        "    blocks: list = []\n"
        "\n"
        "def f(n: int | None) -> int:\n"
        "    return n + 1\n"
        "\n"
        "SourceMigration(NotAGuest(), get_profile('engine'), MigrationOptions.default())\n")
    proc = _mypy_on(bad, tmp_path / "cache")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Unsupported operand types for + ("None" and "int")' in proc.stdout
    assert '"NotAGuest"' in proc.stdout and '"SourceGuest"' in proc.stdout


def test_the_concrete_classes_fill_the_seams(tmp_path):
    """Each Protocol of the seams is filled by the classes the drivers get
    (the wrappers that forward with __getattr__ fill any)."""
    good = tmp_path / "good.py"
    good.write_text(
        "from engine.migration.ramimage import ImageBlock\n"
        "from engine.ram.block import RamBlock\n"
        "from engine.ram.guest import Guest\n"
        "from engine.ram.seams import DestinationGuest, MappedBlock, PageBlock, SourceGuest\n"
        "from engine.transport import Channel\n"
        "from engine.transport.seams import ByteChannel\n"
        "\n"
        "def check(g: Guest, b: RamBlock, i: ImageBlock, c: Channel) -> None:\n"
        "    source: SourceGuest = g\n"
        "    destination: DestinationGuest = g\n"
        "    mapped: MappedBlock = b\n"
        "    pages: list[PageBlock] = [b, i]\n"
        "    channel: ByteChannel = c\n")
    proc = _mypy_on(good, tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
