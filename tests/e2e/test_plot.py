"""``engine migrate --plot`` and the live progress line, end to end.

The plots are checked for what they must show (the switchover line in red,
the postcopy line in purple, a picture even when the migration failed), the
progress line on a real pseudo-terminal for its fields, and on a pipe for
its absence.
"""
from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from engine.cli import EXIT_FAILED, EXIT_USAGE, main
from engine.telemetry import Timeline

pytest.importorskip("matplotlib")

ENGINE = [sys.executable, "-m", "engine"]
TIMEOUT = 180
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: matplotlib's tab:red and tab:purple, the switchover and postcopy lines
RED, PURPLE = (0.839, 0.153, 0.157), (0.580, 0.404, 0.741)


def run(args, **kw):
    return subprocess.run(ENGINE + args, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL, **kw)


def pixels_of(path, rgb, tol=0.03) -> int:
    from matplotlib.image import imread
    img = imread(str(path))[..., :3]
    return int(np.count_nonzero(np.all(np.abs(img - np.array(rgb)) < tol, axis=-1)))


def assert_png(path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == PNG_MAGIC
    h, w = imread(str(path)).shape[:2]
    assert w >= 800 and h >= 600


def test_plot_precopy(tmp_path):
    png = tmp_path / "p.png"
    res = run(["migrate", "--ram", "128M", "--vcpus", "2", "--workload", "random",
               "--dirty-rate", "100", "--param", "max-bandwidth=300M", "--plot", str(png)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert_png(png)
    # the switchover is drawn (a red line through three panels: hundreds of
    # pixels); nothing in postcopy's purple
    assert pixels_of(png, RED) > 300
    assert pixels_of(png, PURPLE) == 0


def test_plot_postcopy(tmp_path):
    png = tmp_path / "pc.png"
    res = run(["migrate", "--ram", "128M", "--vcpus", "2", "--workload", "ab",
               "--dirty-rate", "0", "--param", "downtime-limit=1",
               "--cap", "postcopy-ram=on", "--postcopy-after", "1", "--plot", str(png)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert_png(png)
    assert pixels_of(png, PURPLE) > 300


def _incoming_child(pid):
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "incoming" in p.cmdline():
                    return p
    return None


def test_plot_is_written_when_the_migration_fails(tmp_path):
    png = tmp_path / "fail.png"
    # Cannot converge (3 MB/s, 1 ms downtime), so it is still running when
    # its destination goes away.
    proc = subprocess.Popen(
        ENGINE + ["migrate", "--ram", "64M", "--vcpus", "2", "--workload", "ab",
                  "--param", "max-bandwidth=3000000", "--param", "downtime-limit=1",
                  "--plot", str(png)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        dest = None
        while dest is None and time.monotonic() < deadline:
            dest = _incoming_child(proc.pid)
            time.sleep(0.05)
        assert dest is not None, "no local destination"
        time.sleep(1.5)                        # some samples of a running migration
        dest.send_signal(signal.SIGINT)        # it cleans up and exits; the source fails
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_FAILED, out + err
    assert "migration failed" in err
    assert "could not write the plot" not in err
    assert_png(png)
    assert pixels_of(png, RED) == 0            # it never reached a switchover


def test_plot_needs_matplotlib(tmp_path, monkeypatch, capsys):
    # Refused before anything starts (the suite's leak check would see a guest).
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import fails
    rc = main(["migrate", "--ram", "16M", "--plot", str(tmp_path / "x.png")])
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'engine[bench]'" in err
    assert not (tmp_path / "x.png").exists()


def test_plot_into_a_missing_directory_is_refused(tmp_path, capsys):
    rc = main(["migrate", "--ram", "16M", "--plot", str(tmp_path / "nope" / "x.png")])
    assert rc == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_plot_of_nothing_recorded(tmp_path):
    from engine.plot import plot_timeline
    png = tmp_path / "empty.png"
    plot_timeline(Timeline((), (), None), png)
    assert_png(png)


# -- the progress line ------------------------------------------------------------

def _run_on_pty(args, columns=120):
    """Run with stderr on a pseudo-terminal of ``columns``; return (rc, bytes)."""
    import fcntl
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        proc = subprocess.Popen(ENGINE + args, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=slave)
    finally:
        os.close(slave)
    out = b""
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:          # EIO: every writer has closed the slave
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=TIMEOUT), out
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


MIGRATE = ["migrate", "--ram", "256M", "--vcpus", "2", "--workload", "random",
           "--dirty-rate", "100", "--param", "max-bandwidth=100M"]


def test_progress_line_on_a_terminal():
    rc, out = _run_on_pty(MIGRATE, columns=120)
    assert rc == 0, out
    text = out.decode()
    frames = [f for f in text.split("\r\x1b[K") if f]
    assert frames, text
    assert text.endswith("\r\x1b[K")              # the line is erased at the end
    assert all("\n" not in f for f in frames)      # one line, redrawn in place
    assert all(len(f) < 120 for f in frames)
    running = [f for f in frames if f.startswith("active")]
    assert running, frames
    for field in ("pass", "sent", "left", "MiB", "MiB/s", "dirty", "ETA"):
        assert field in running[-1], running[-1]
    # the ETA counts down in seconds somewhere along the way
    assert any("ETA" in f and f.rstrip().endswith("s") for f in running), running


def test_progress_line_narrow_terminal_and_quiet():
    rc, out = _run_on_pty(MIGRATE, columns=60)
    assert rc == 0
    frames = [f for f in out.decode().split("\r\x1b[K") if f]
    assert frames and all(len(f) < 60 for f in frames)
    assert all("left" in f and "ETA" in f for f in frames if f.startswith("active"))
    rc, out = _run_on_pty(MIGRATE + ["--quiet"])
    assert rc == 0
    assert out == b""


def test_no_progress_line_on_a_pipe():
    res = run(MIGRATE)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "ETA" not in res.stderr
    assert res.stderr == ""
