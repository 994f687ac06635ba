"""Bad command lines are refused before anything starts: exit status 2, an
argparse usage error naming the option as typed, never a traceback.

Each case runs ``python -m engine`` for real.  The suite's leak checks
(tests/conftest.py) also see that no segment, process or temp directory is
left, and each case checks that no report file was written.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.commands.args import max_vcpus

ENGINE = [sys.executable, "-m", "engine"]

ARABIC_123 = "\u0661\u0662\u0663"          # '١٢٣': int() takes it, QEMU does not
FULLWIDTH_12 = "\uff11\uff12"              # '１２'
TOO_MANY = str(max_vcpus() + 1)


def run(args, timeout=60):
    return subprocess.run(ENGINE + args, capture_output=True, text=True, timeout=timeout)


def assert_usage_error(res, option: str):
    err = res.stderr
    assert res.returncode == 2, res.stdout + err
    assert "Traceback" not in err, err
    assert "usage: engine" in err, err          # argparse's style
    assert f"argument {option}" in err, err     # names the option as typed


def _cases(tmp):
    missing = str(tmp / "no-such-dir" / "r.json")
    d = str(tmp)
    migrate = ["migrate", "--ram", "16M"]
    incoming = ["incoming", "tcp:127.0.0.1:0", "--ram", "16M"]
    vm = ["vm", "--qmp", f"unix:{tmp}/qmp.sock"]
    return {
        # --json: a directory, or a file in a folder that does not exist
        "migrate-json-dir": (migrate + ["--json", d], "--json"),
        "migrate-json-missing-folder": (migrate + ["--json", missing], "--json"),
        "incoming-json-dir": (incoming + ["--json", d], "--json"),
        "vm-json-missing-folder": (vm + ["--json", missing], "--json"),
        "load-json-dir": (["load", str(tmp / "x.mig"), "--json", d], "--json"),
        "stress-json-dir": (["stress", "--json", d], "--json"),
        "stress-junit-missing-folder": (["stress", "--junit", missing], "--junit"),
        "migrate-plot-dir": (migrate + ["--plot", d], "--plot"),
        # --timeout: negative, NaN, infinite, zero
        "incoming-timeout-negative": (incoming + ["--timeout", "-1"], "--timeout"),
        "incoming-timeout-nan": (incoming + ["--timeout", "nan"], "--timeout"),
        "incoming-timeout-inf": (incoming + ["--timeout", "inf"], "--timeout"),
        "incoming-timeout-overflow": (incoming + ["--timeout", "1e999"], "--timeout"),
        "info-timeout-zero": (["info", "status", "--qmp", "unix:/nonexistent",
                               "--timeout", "0"], "--timeout"),
        "info-qmp-empty": (["info", "status", "--qmp", ""], "--qmp"),
        "info-timeout-nan": (["info", "status", "--qmp", "unix:/nonexistent",
                              "--timeout", "NaN"], "--timeout"),
        "stress-case-timeout-inf": (["stress", "--case-timeout", "inf"], "--case-timeout"),
        "stress-time-limit-negative": (["stress", "--time-limit", "-5"], "--time-limit"),
        # --vcpus beyond what the host runs, and in digits QEMU does not read
        "migrate-vcpus-100000": (migrate + ["--vcpus", "100000"], "--vcpus"),
        "migrate-vcpus-one-too-many": (migrate + ["--vcpus", TOO_MANY], "--vcpus"),
        "incoming-vcpus-100000": (incoming + ["--vcpus", "100000"], "--vcpus"),
        "vm-vcpus-100000": (vm + ["--vcpus", "100000"], "--vcpus"),
        "load-vcpus-100000": (["load", str(tmp / "x.mig"), "--vcpus", "100000"], "--vcpus"),
        "migrate-vcpus-arabic": (migrate + ["--vcpus", ARABIC_123], "--vcpus"),
        "load-vcpus-fullwidth": (["load", str(tmp / "x.mig"), "--vcpus", FULLWIDTH_12],
                                 "--vcpus"),
        "stress-seed-arabic": (["stress", "--seed", ARABIC_123], "--seed"),
        "stress-cases-zero": (["stress", "--cases", "0"], "--cases"),
        "migrate-postcopy-after-negative": (migrate + ["--postcopy-after", "-1"],
                                            "--postcopy-after"),
        "migrate-param-arabic": (migrate + ["--param", f"multifd-channels={ARABIC_123}"],
                                 "--param"),
        "migrate-param-fullwidth": (migrate + ["--param", f"downtime-limit={FULLWIDTH_12}"],
                                    "--param"),
        "migrate-ram-fullwidth": (migrate + ["--ram", FULLWIDTH_12 + "M"], "--ram"),
        "migrate-dirty-rate-fullwidth": (migrate + ["--dirty-rate", FULLWIDTH_12],
                                         "--dirty-rate"),
        # empty URIs
        "migrate-to-empty": (migrate + ["--to", ""], "--to"),
        "migrate-uri-empty": (migrate + ["--uri", " "], "--uri"),
        "incoming-uri-empty": (["incoming", "", "--ram", "16M"], "uri"),
        # the guest's rates
        "migrate-dirty-rate-negative": (migrate + ["--dirty-rate", "-1"], "--dirty-rate"),
        "migrate-dirty-rate-nan": (migrate + ["--dirty-rate", "nan"], "--dirty-rate"),
        "vm-dirty-rate-inf": (vm + ["--dirty-rate", "inf"], "--dirty-rate"),
        "incoming-hot-set-zero": (incoming + ["--hot-set", "0"], "--hot-set"),
        # unknown capabilities and parameters, bad values on their own
        "migrate-unknown-param": (migrate + ["--param", "max-bandwith=1G"], "--param"),
        "migrate-unknown-cap": (migrate + ["--cap", "multifdd=on"], "--cap"),
        "incoming-unknown-cap": (incoming + ["--cap", "bogus"], "--cap"),
        "vm-unknown-param": (vm + ["--param", "nope=1"], "--param"),
        "vm-bad-cap-value": (vm + ["--cap", "multifd=maybe"], "--cap"),
        "incoming-param-out-of-range": (incoming + ["--param", "multifd-channels=0"],
                                        "--param"),
    }


CASES = sorted(_cases(Path("/tmp/x")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_usage_error(tmp_path, case):
    args, option = _cases(tmp_path)[case]
    res = run(args)
    assert_usage_error(res, option)
    # Nothing ran: no report, no socket.
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_messages_name_what_was_typed(tmp_path):
    res = run(["migrate", "--param", "max-bandwith=1G"])
    assert "max-bandwith" in res.stderr and "max-bandwidth" in res.stderr   # did you mean
    res = run(["migrate", "--vcpus", ARABIC_123])
    assert ARABIC_123 in res.stderr and "ASCII" in res.stderr
    res = run(["migrate", "--vcpus", "100000"])
    assert f"<= {max_vcpus()}" in res.stderr or f"and {max_vcpus()}" in res.stderr
    res = run(["incoming", "tcp:127.0.0.1:0", "--timeout", "nan"])
    assert "'nan'" in res.stderr


def test_help_documents_the_vcpus_bound():
    res = run(["migrate", "--help"])
    assert res.returncode == 0
    assert f"at most {max_vcpus()}" in " ".join(res.stdout.split())


def test_good_values_still_parse(tmp_path):
    """The bounds refuse only what they should: ``engine stress --list``
    parses numbers and files without running a case."""
    res = run(["stress", "--list", "--seed", "3", "--cases", "2", "--time-limit", "1.5",
               "--case-timeout", "1e2", "--json", str(tmp_path / "s.json")])
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 2
