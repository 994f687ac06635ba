"""The command line's argument types (engine/commands/args.py) and the
options checks they use: what they refuse, and that good values pass."""
from __future__ import annotations

import argparse
import math

import pytest

from engine.commands import args as A
from engine.errors import ConfigError, InvalidCapabilityError, ParameterValueError
from engine.options import (SUPPORTED_CAPABILITIES, MigrationOptions, check_implemented,
                            check_parameter)

NON_ASCII = ["\u0661\u0662\u0663", "\uff11\uff12", "\u0967", "1_000", "\u00b2"]


@pytest.mark.parametrize("text", NON_ASCII + ["", " ", "1.5", "0x10", "ten"])
def test_integer_takes_ascii_digits_only(text):
    with pytest.raises(argparse.ArgumentTypeError):
        A.integer()(text)


def test_integer_bounds():
    t = A.integer(0, 8)
    assert [t("0"), t("8"), t(" 3 ")] == [0, 8, 3]
    for bad in ("-1", "9"):
        with pytest.raises(argparse.ArgumentTypeError, match="between 0 and 8"):
            t(bad)
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        A.integer(1)("0")


@pytest.mark.parametrize("text", NON_ASCII + ["nan", "NaN", "inf", "-inf", "Infinity",
                                             "1e999", "", "1,5"])
def test_number_is_finite_ascii(text):
    with pytest.raises(argparse.ArgumentTypeError):
        A.number()(text)


def test_number_bounds_and_forms():
    n = A.number(0.0)
    assert [n("0"), n("64.0"), n("1e-05"), n(".5"), n("2.")] == [0, 64, 1e-5, 0.5, 2]
    with pytest.raises(argparse.ArgumentTypeError, match=">= 0"):
        n("-1")
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        A.seconds("0")
    frac = A.number(0.0, 1.0, lo_open=True)
    assert frac("1") == 1.0
    for bad in ("0", "1.01"):
        with pytest.raises(argparse.ArgumentTypeError):
            frac(bad)
    # what engine migrate passes to its local destination round-trips
    for v in (64.0, 1e-05, 0.1 + 0.2):
        assert n(str(v)) == v and math.isfinite(v)


def test_output_file(tmp_path):
    assert A.output_file(str(tmp_path / "r.json")) == str(tmp_path / "r.json")
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        A.output_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        A.output_file(str(tmp_path / "missing" / "r.json"))
    with pytest.raises(argparse.ArgumentTypeError):
        A.output_file("")


def test_uri_refuses_empty():
    assert A.uri("unix:/x") == "unix:/x"
    for bad in ("", "  "):
        with pytest.raises(argparse.ArgumentTypeError, match="empty URI"):
            A.uri(bad)


def test_max_vcpus_bounds_by_the_host(monkeypatch):
    monkeypatch.setattr(A.os, "cpu_count", lambda: 2)
    assert A.max_vcpus() == 8
    monkeypatch.setattr(A.os, "cpu_count", lambda: 16)
    assert A.max_vcpus() == 64
    monkeypatch.setattr(A.os, "cpu_count", lambda: None)
    assert A.max_vcpus() == 8


def test_cap_and_param_args_name_what_is_wrong():
    assert A.cap_arg("multifd=on") == "multifd=on"
    assert A.param_arg("max-bandwidth=1G") == "max-bandwidth=1G"
    with pytest.raises(argparse.ArgumentTypeError, match="multifdd.*did you mean 'multifd'"):
        A.cap_arg("multifdd=on")
    with pytest.raises(argparse.ArgumentTypeError, match="max-bandwith.*did you mean"):
        A.param_arg("max-bandwith=1G")
    with pytest.raises(argparse.ArgumentTypeError, match="multifd-channels.*between 1 and 255"):
        A.param_arg("multifd-channels=0")
    with pytest.raises(argparse.ArgumentTypeError, match="multifd-compression"):
        A.param_arg("multifd-compression=qpl")       # QEMU's, not built here
    # cross-checks wait for the whole set: each of these is fine alone
    assert A.param_arg("max-cpu-throttle=10") and A.param_arg("cpu-throttle-initial=5")


@pytest.mark.parametrize("value", ["\u0661\u0662", "\uff18", "+8", "-1", "8_0", ""])
def test_uint_parameters_take_ascii_digits_only(value):
    with pytest.raises(ParameterValueError, match="multifd-channels"):
        check_parameter("multifd-channels", value)


def test_uint_parameters_still_take_decimal_and_hex():
    assert check_parameter("multifd-channels", " 8 ") == 8
    assert check_parameter("downtime-limit", "0x10") == 16


def test_one_list_decides_what_is_implemented():
    """migration/ reads options.py's list: the two cannot disagree."""
    import engine.migration as mig
    assert mig.IMPLEMENTED_CAPABILITIES is SUPPORTED_CAPABILITIES
    assert mig.check_implemented is check_implemented
    assert "validate-uuid" in SUPPORTED_CAPABILITIES
    options = MigrationOptions.default().with_capabilities({"validate-uuid": True})
    check_implemented(options)
    with pytest.raises(InvalidCapabilityError, match="rdma-pin-all.*not supported"):
        MigrationOptions.default().with_capabilities({"rdma-pin-all": True})
    # an options value made around the constructor's check is still caught
    forged = object.__new__(MigrationOptions)
    object.__setattr__(forged, "capabilities", {**options.capabilities, "rdma-pin-all": True})
    with pytest.raises(InvalidCapabilityError, match="rdma-pin-all"):
        check_implemented(forged)


def test_errors_live_in_errors_py():
    """The classes moved there stay importable from their old homes."""
    import engine.cli
    import engine.errors
    import engine.options
    assert engine.options.ParameterValueError is engine.errors.ParameterValueError
    assert engine.cli.Terminated is engine.errors.Terminated
    assert issubclass(engine.errors.Terminated, SystemExit)
    assert issubclass(ParameterValueError, ConfigError)
