"""Capabilities and parameters: QEMU's defaults, ranges, cross-checks, parsing."""
from __future__ import annotations

import pickle

import pytest

from engine.errors import ConfigError, InvalidCapabilityError, InvalidParameterError
from engine.options import (
    CAPABILITIES,
    PARAMETERS,
    SUPPORTED_CAPABILITIES,
    MigrationOptions,
    ParameterValueError,
    check_capabilities,
    check_parameters,
    options_from_args,
    parse_bool,
    parse_cap_arg,
    parse_param_arg,
    parse_size,
)

# Written out from QEMU (qapi/migration.json order; options.c defaults),
# independently of the module under test.
QEMU_CAPABILITIES = [
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events",
    "postcopy-ram", "x-colo", "release-ram", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send",
    "postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram",
]
QEMU_DEFAULTS = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5,
    "announce-step": 100, "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False, "tls-creds": "", "tls-hostname": "",
    "tls-authz": "", "max-bandwidth": 134217728,
    "avail-switchover-bandwidth": 0, "downtime-limit": 300,
    "x-checkpoint-delay": 20000, "multifd-channels": 2,
    "xbzrle-cache-size": 67108864, "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99, "multifd-compression": "none",
    "multifd-zlib-level": 1, "multifd-qatzip-level": 1,
    "multifd-zstd-level": 1, "block-bitmap-mapping": None,
    "x-vcpu-dirty-limit-period": 1000, "vcpu-dirty-limit": 1,
    "mode": "normal", "zero-page-detection": "multifd", "direct-io": False,
    "cpr-exec-command": None,
}
U64 = 2**64 - 1
# name -> (lowest valid, highest valid)
QEMU_RANGES = {
    "announce-initial": (0, 100000), "announce-max": (0, 100000),
    "announce-rounds": (0, 1000), "announce-step": (1, 10000),
    "throttle-trigger-threshold": (1, 100), "cpu-throttle-initial": (1, 99),
    "cpu-throttle-increment": (1, 99), "max-bandwidth": (0, U64),
    "avail-switchover-bandwidth": (0, U64), "downtime-limit": (0, 2000000),
    "x-checkpoint-delay": (0, 2**32 - 1), "multifd-channels": (1, 255),
    "max-postcopy-bandwidth": (0, U64), "max-cpu-throttle": (1, 99),
    "multifd-zlib-level": (0, 9), "multifd-qatzip-level": (1, 9),
    "multifd-zstd-level": (0, 20), "x-vcpu-dirty-limit-period": (1, 1000),
    "vcpu-dirty-limit": (1, U64),
}
UNSUPPORTED = sorted(set(QEMU_CAPABILITIES) - {
    "events", "return-path", "pause-before-switchover", "multifd",
    "postcopy-ram", "postcopy-preempt", "postcopy-blocktime",
    "late-block-activate", "validate-uuid", "switchover-ack", "zero-blocks",
    "auto-converge", "xbzrle", "dirty-limit"})

DEFAULT = MigrationOptions.default()


# -- tables -----------------------------------------------------------------

def test_capability_names_in_qemu_order():
    assert list(CAPABILITIES) == QEMU_CAPABILITIES
    assert SUPPORTED_CAPABILITIES < set(CAPABILITIES)
    assert len(UNSUPPORTED) == 8


def test_every_parameter_default_is_qemus():
    assert set(PARAMETERS) == set(QEMU_DEFAULTS)
    for name, default in QEMU_DEFAULTS.items():
        assert PARAMETERS[name].default == default, name
        assert DEFAULT.param(name) == default, name
        assert type(DEFAULT.param(name)) is type(default), name
    assert not any(DEFAULT.capabilities.values())


def test_query_shapes():
    caps = DEFAULT.with_capabilities({"multifd": True}).to_qmp_capabilities()
    assert [c["capability"] for c in caps] == QEMU_CAPABILITIES
    assert all(set(c) == {"capability", "state"} for c in caps)
    assert [c["capability"] for c in caps if c["state"]] == ["multifd"]
    params = DEFAULT.to_qmp_parameters()
    # Unset lists are absent, as in query-migrate-parameters.
    assert params == {k: v for k, v in QEMU_DEFAULTS.items() if v is not None}
    withcmd = DEFAULT.with_parameters({"cpr-exec-command": ["qemu", "-x"]})
    assert withcmd.to_qmp_parameters()["cpr-exec-command"] == ["qemu", "-x"]


# -- ranges -----------------------------------------------------------------

def _context(name):
    # max-cpu-throttle's floor is cpu-throttle-initial; lower it to test 1.
    return {"cpu-throttle-initial": 1} if name == "max-cpu-throttle" else {}


@pytest.mark.parametrize("name", sorted(QEMU_RANGES))
def test_ranges_enforced_at_both_ends(name):
    lo, hi = QEMU_RANGES[name]
    spec = PARAMETERS[name]
    assert (spec.minimum, spec.maximum) == (lo, hi)
    for good in (lo, hi):
        opts = DEFAULT.with_parameters({**_context(name), name: good})
        assert opts.param(name) == good
        # The same as a string, as from a command line.
        assert DEFAULT.with_parameters({**_context(name), name: str(good)}).param(name) == good
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ParameterValueError) as info:
            DEFAULT.with_parameters({**_context(name), name: bad})
        err = info.value
        assert isinstance(err, InvalidParameterError) and isinstance(err, ConfigError)
        assert err.name == name and err.value == bad
        assert f"Parameter '{name}' expects a value between {lo} and {hi}" in str(err)


def test_qemu_wording_of_a_range_error():
    with pytest.raises(ParameterValueError,
                       match="^Parameter 'multifd-channels' expects a value between 1 and 255"):
        DEFAULT.with_parameters({"multifd-channels": 256})


def test_xbzrle_cache_size_is_a_power_of_two_of_at_least_a_page():
    for good in (4096, 8192, "64M", 2**63):
        DEFAULT.with_parameters({"xbzrle-cache-size": good})
    for bad in (2048, 4095, 12288, "1.5M", 0):
        with pytest.raises(ParameterValueError):
            DEFAULT.with_parameters({"xbzrle-cache-size": bad})


def test_max_cpu_throttle_not_below_initial():
    DEFAULT.with_parameters({"max-cpu-throttle": 20})
    with pytest.raises(ParameterValueError, match="cpu-throttle-initial to 99"):
        DEFAULT.with_parameters({"max-cpu-throttle": 19})
    with pytest.raises(ParameterValueError, match="cpu-throttle-initial to 99"):
        DEFAULT.with_parameters({"cpu-throttle-initial": 99, "max-cpu-throttle": 98})
    DEFAULT.with_parameters({"cpu-throttle-initial": 99})
    with pytest.raises(ParameterValueError):
        check_parameters({"max-cpu-throttle": 10})


@pytest.mark.parametrize("name,bad", [
    ("multifd-channels", True), ("multifd-channels", 2.0), ("multifd-channels", "two"),
    ("multifd-channels", ""), ("max-bandwidth", "fast"), ("max-bandwidth", -1),
    ("max-bandwidth", 1.5), ("cpu-throttle-tailslow", "maybe"),
    ("cpu-throttle-tailslow", 1), ("tls-hostname", 5), ("multifd-compression", "lz4"),
    ("multifd-compression", "ZLIB"), ("zero-page-detection", "all"),
    ("mode", "fast"), ("cpr-exec-command", [1, 2]),
])
def test_wrong_types_are_refused(name, bad):
    with pytest.raises(ParameterValueError, match=f"Parameter '{name}' expects"):
        DEFAULT.with_parameters({name: bad})


def test_typed_and_string_values():
    o = DEFAULT.with_parameters({
        "max-bandwidth": "1G", "downtime-limit": "500", "multifd-channels": 8,
        "cpu-throttle-tailslow": "on", "multifd-compression": "zstd",
        "zero-page-detection": "legacy", "tls-hostname": "dst.example",
        "tls-authz": None, "cpr-exec-command": "qemu-kvm -incoming defer",
        "announce-step": "0x10",
    })
    assert o.param("max-bandwidth") == 1 << 30
    assert o.param("downtime-limit") == 500
    assert o.param("multifd-channels") == 8
    assert o.param("cpu-throttle-tailslow") is True
    assert o.param("multifd-compression") == "zstd"
    assert o.param("zero-page-detection") == "legacy"
    assert o.param("tls-hostname") == "dst.example"
    assert o.param("tls-authz") == ""
    assert o.param("cpr-exec-command") == ("qemu-kvm", "-incoming", "defer")
    assert o.param("announce-step") == 16
    for codec in ("none", "zlib", "zstd"):
        assert DEFAULT.with_parameters({"multifd-compression": codec})


# -- engine limits ------------------------------------------------------------

@pytest.mark.parametrize("name,value,needle", [
    ("tls-creds", "tls0", "TLS"),
    ("multifd-compression", "qatzip", "not built"),
    ("multifd-compression", "qpl", "not built"),
    ("multifd-compression", "uadk", "not built"),
    ("mode", "cpr-reboot", "CPR"),
    ("mode", "cpr-transfer", "CPR"),
    ("mode", "cpr-exec", "CPR"),
    ("direct-io", True, "O_DIRECT"),
    ("block-bitmap-mapping", [], "dirty bitmap"),
])
def test_engine_refuses_what_it_does_not_implement(name, value, needle):
    with pytest.raises(InvalidParameterError) as info:
        DEFAULT.with_parameters({name: value})
    assert info.value.name == name
    assert needle in str(info.value) and f"Parameter '{name}'" in str(info.value)
    # ...while QEMU's own rules have nothing against the value.
    check_parameters({name: value})


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_capabilities_refused_on_but_fine_off(name):
    with pytest.raises(InvalidCapabilityError) as info:
        DEFAULT.with_capabilities({name: True})
    assert info.value.name == name
    assert "not supported by this engine (QEMU feature: " in str(info.value)
    assert DEFAULT.with_capabilities({name: False}) == DEFAULT


def test_all_capabilities_off_is_fine_and_supported_ones_turn_on():
    assert DEFAULT.with_capabilities({c: False for c in CAPABILITIES}) == DEFAULT
    for c in SUPPORTED_CAPABILITIES - {"postcopy-preempt", "switchover-ack"}:
        assert DEFAULT.with_capabilities({c: True}).cap(c) is True
    # every one at once but xbzrle, which QEMU refuses with multifd, and
    # dirty-limit, which excludes auto-converge
    most = SUPPORTED_CAPABILITIES - {"xbzrle", "dirty-limit"}
    everything = DEFAULT.with_capabilities({c: True for c in most})
    assert set(everything.enabled_capabilities()) == most


def test_unknown_names():
    with pytest.raises(InvalidCapabilityError, match="did you mean 'multifd'"):
        DEFAULT.with_capabilities({"multfd": True})
    with pytest.raises(InvalidCapabilityError, match="unknown capability"):
        DEFAULT.cap("compress")
    with pytest.raises(InvalidParameterError, match="did you mean 'max-bandwidth'"):
        DEFAULT.with_parameters({"max-bandwith": 1})
    with pytest.raises(InvalidParameterError, match="unknown parameter"):
        DEFAULT.param("compress-level")


def test_underscored_names_are_accepted():
    o = DEFAULT.with_parameters({"max_bandwidth": "2M"}).with_capabilities({"return_path": True})
    assert o.param("max-bandwidth") == 2 << 20 and o.cap("return-path")


# -- cross-checks (QEMU's migrate_caps_check) -----------------------------------

def test_postcopy_preempt_needs_postcopy_ram():
    with pytest.raises(InvalidCapabilityError, match="requires capability 'postcopy-ram'") as i:
        DEFAULT.with_capabilities({"postcopy-preempt": True})
    assert i.value.name == "postcopy-preempt"
    both = DEFAULT.with_capabilities({"postcopy-ram": True, "postcopy-preempt": True})
    # Turning the dependency off afterwards is refused too.
    with pytest.raises(InvalidCapabilityError, match="postcopy-preempt"):
        both.with_capabilities({"postcopy-ram": False})
    assert both.with_capabilities({"postcopy-ram": False, "postcopy-preempt": False}) == DEFAULT


def test_switchover_ack_needs_return_path():
    with pytest.raises(InvalidCapabilityError, match="requires capability 'return-path'"):
        DEFAULT.with_capabilities({"switchover-ack": True})
    DEFAULT.with_capabilities({"switchover-ack": True, "return-path": True})


@pytest.mark.parametrize("caps,params,culprit,needle", [
    ({"zero-copy-send"}, {}, "zero-copy-send", "multifd is off"),
    ({"zero-copy-send", "multifd", "xbzrle"}, {}, "zero-copy-send", "xbzrle is on"),
    ({"zero-copy-send", "multifd"}, {"multifd-compression": "zlib"}, "zero-copy-send",
     "multifd-compression is 'zlib'"),
    ({"zero-copy-send", "multifd"}, {"tls-creds": "tls0"}, "zero-copy-send", "tls-creds"),
    ({"multifd", "xbzrle"}, {}, "multifd", "not compatible with xbzrle"),
    ({"dirty-limit", "auto-converge"}, {}, "dirty-limit", "auto-converge"),
    ({"mapped-ram", "xbzrle"}, {}, "mapped-ram", "xbzrle"),
    ({"mapped-ram", "postcopy-ram"}, {}, "mapped-ram", "postcopy-ram"),
    ({"mapped-ram", "multifd"}, {"multifd-compression": "zstd"}, "mapped-ram",
     "non-compressed"),
    ({"mapped-ram"}, {"tls-creds": "x"}, "mapped-ram", "non-TLS"),
    ({"postcopy-ram", "x-ignore-shared"}, {}, "postcopy-ram", "x-ignore-shared"),
    ({"postcopy-ram"}, {"mode": "cpr-reboot"}, "postcopy-ram", "cpr-reboot"),
    ({"background-snapshot"}, {"mode": "cpr-transfer"}, "background-snapshot", "mode"),
    ({"postcopy-preempt"}, {}, "postcopy-preempt", "postcopy-ram"),
    ({"switchover-ack"}, {}, "switchover-ack", "return-path"),
])
def test_qemu_cross_checks(caps, params, culprit, needle):
    with pytest.raises(InvalidCapabilityError) as info:
        check_capabilities(dict.fromkeys(caps, True), params)
    assert info.value.name == culprit
    assert needle in str(info.value)


@pytest.mark.parametrize("other", [
    "postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
    "return-path", "multifd", "pause-before-switchover", "auto-converge",
    "release-ram", "rdma-pin-all", "xbzrle", "x-colo", "validate-uuid", "zero-copy-send",
])
def test_background_snapshot_conflicts(other):
    with pytest.raises(InvalidCapabilityError, match=f"not compatible with {other}$"):
        check_capabilities({"background-snapshot": True, other: True})


def test_cross_checks_pass_valid_combinations():
    for caps in ({"zero-copy-send", "multifd"}, {"background-snapshot", "events"},
                 {"mapped-ram", "multifd"}, {"dirty-limit"}, {"xbzrle", "postcopy-ram"},
                 {"postcopy-ram", "multifd", "postcopy-preempt", "return-path",
                  "switchover-ack"}):
        check_capabilities(dict.fromkeys(caps, True))


def test_engine_limits_are_reported_before_qemu_cross_checks():
    # The supported capabilities have no conflicts with parameters the engine
    # accepts; QEMU's cap/param conflicts are covered by check_capabilities
    # above.  Through MigrationOptions the engine's refusal comes first.
    with pytest.raises(InvalidParameterError, match="CPR"):
        DEFAULT.with_capabilities({"postcopy-ram": True}).with_parameters({"mode": "cpr-exec"})
    with pytest.raises(InvalidCapabilityError, match="not supported by this engine"):
        DEFAULT.with_parameters({"multifd-compression": "zlib"}).with_capabilities(
            {"zero-copy-send": True, "multifd": True})


# -- the value object -------------------------------------------------------

def test_options_are_immutable_values():
    o = DEFAULT.with_parameters({"multifd-channels": 4})
    assert DEFAULT.param("multifd-channels") == 2  # the original is untouched
    with pytest.raises(TypeError):
        o.parameters["multifd-channels"] = 9  # type: ignore[index]
    with pytest.raises(TypeError):
        o.capabilities["multifd"] = True  # type: ignore[index]
    with pytest.raises(AttributeError):
        o.parameters = {}  # type: ignore[misc]
    assert o == DEFAULT.with_parameters({"multifd-channels": "4"})
    assert hash(o) == hash(DEFAULT.with_parameters({"multifd-channels": "4"}))
    assert o != DEFAULT
    assert "multifd-channels=4" in repr(o)


def test_options_pickle():
    o = DEFAULT.with_capabilities({"multifd": True}).with_parameters(
        {"multifd-channels": 7, "cpr-exec-command": ["a", "b"]})
    assert pickle.loads(pickle.dumps(o)) == o


def test_constructor_requires_every_option_and_validates():
    with pytest.raises(ConfigError, match="missing"):
        MigrationOptions({"multifd": True}, {})
    caps = dict(DEFAULT.capabilities, multifd="on")
    params = dict(DEFAULT.parameters, **{"multifd-channels": "0"})
    with pytest.raises(ParameterValueError):
        MigrationOptions(caps, params)
    with pytest.raises(InvalidCapabilityError):
        MigrationOptions(dict(caps, multifd="perhaps"), dict(DEFAULT.parameters))


# -- parsing --------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("0", 0), ("4096", 4096), ("4096B", 4096), ("4096b", 4096), ("1k", 1024),
    ("1K", 1024), ("64M", 64 << 20), ("1G", 1 << 30), ("2T", 2 << 40),
    ("1P", 1 << 50), ("1E", 1 << 60), ("15E", 15 << 60), ("1.5G", 3 << 29),
    ("0.5K", 512), ("1.0001K", 1024), ("0x1000", 4096), ("0XfF", 255),
    (" 8M ", 8 << 20), ("18446744073709551615", U64), (123, 123), ("1.K", 1024),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "", " ", "-1", "-1K", "1.5", "1.5B", "abc", "1X", "1 G", "1KB", "0x10K",
    "0x1.5", "16E", "18446744073709551616", "1e3", "K", ".5K", True, None, 1.5, -4,
])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_parse_bool():
    for t in ("on", "ON", "true", "yes", "1", True):
        assert parse_bool(t) is True
    for f in ("off", "False", "no", "0", False):
        assert parse_bool(f) is False
    for bad in ("", "onn", 1, None):
        with pytest.raises(ConfigError):
            parse_bool(bad)


def test_parse_cap_arg():
    assert parse_cap_arg("multifd=on") == ("multifd", True)
    assert parse_cap_arg("multifd=off") == ("multifd", False)
    assert parse_cap_arg("return-path=yes") == ("return-path", True)
    assert parse_cap_arg("events=false") == ("events", False)
    assert parse_cap_arg("postcopy-ram") == ("postcopy-ram", True)
    with pytest.raises(InvalidCapabilityError, match="invalid boolean"):
        parse_cap_arg("multifd=maybe")
    with pytest.raises(InvalidCapabilityError, match="unknown"):
        parse_cap_arg("turbo=on")


def test_parse_param_arg():
    assert parse_param_arg("max-bandwidth=1G") == ("max-bandwidth", "1G")
    assert parse_param_arg("tls-hostname=") == ("tls-hostname", "")
    assert parse_param_arg("cpr-exec-command=a=b") == ("cpr-exec-command", "a=b")
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_param_arg("max-bandwidth")
    with pytest.raises(InvalidParameterError, match="unknown"):
        parse_param_arg("speed=1G")


def test_options_from_args():
    o = options_from_args(
        ["multifd=on", "postcopy-ram=on", "postcopy-preempt=on", "multifd=off", "multifd"],
        ["max-bandwidth=1G", "multifd-channels=8", "multifd-compression=zstd",
         "downtime-limit=100", "multifd-channels=4"])
    assert o.enabled_capabilities() == ("postcopy-ram", "multifd", "postcopy-preempt")
    assert o.param("max-bandwidth") == 1 << 30
    assert o.param("multifd-channels") == 4  # later mention wins
    assert o.param("multifd-compression") == "zstd"
    assert options_from_args([], []) == DEFAULT
    # Validated together: the dependency may come after its user.
    options_from_args(["switchover-ack=on", "return-path=on"], [])
    with pytest.raises(InvalidCapabilityError, match="return-path"):
        options_from_args(["switchover-ack=on"], [])
    with pytest.raises(ParameterValueError, match="between 1 and 255"):
        options_from_args([], ["multifd-channels=0"])
    base = DEFAULT.with_parameters({"downtime-limit": 50})
    assert options_from_args([], ["max-bandwidth=0"], base=base).param("downtime-limit") == 50


# ---------------------------------------------------------------------------
# Migration object properties (-global migration.NAME=VALUE) and machine compat


def test_properties_default_to_todays_qemu():
    assert DEFAULT.prop("multifd-flush-after-each-section") is False
    assert DEFAULT.prop("send-switchover-start") is True


def test_global_args_set_properties():
    o = options_from_args([], [], globals_=["migration.multifd-flush-after-each-section=on",
                                            "migration.send-switchover-start=off"])
    assert o.prop("multifd-flush-after-each-section") is True
    assert o.prop("send-switchover-start") is False
    assert o.with_properties({"send-switchover-start": "yes"}).prop("send-switchover-start")
    # A copy: the original keeps its values.
    assert DEFAULT.prop("send-switchover-start") is True


@pytest.mark.parametrize(("arg", "match"), [
    ("migration.multifd-flush-after-each-section", "expected migration.PROPERTY=VALUE"),
    ("multifd-flush-after-each-section=on", "expected migration.PROPERTY=VALUE"),
    ("virtio-net.mac=00:11", "no device 'virtio-net'"),
    ("migration.multifd-flush-after-each-sectoin=on", "did you mean"),
    ("migration.send-switchover-start=maybe", "send-switchover-start"),
])
def test_bad_global_args(arg, match):
    with pytest.raises(ConfigError, match=match):
        options_from_args([], [], globals_=[arg])


def test_machine_profiles_carry_compat_properties():
    from engine.machine import get_profile
    assert get_profile("none").default_options() == DEFAULT
    old = get_profile("none-7.2").default_options()
    assert old.prop("multifd-flush-after-each-section") is True
    assert old.prop("send-switchover-start") is False
    assert old.param("zero-page-detection") == "legacy"
    # What the user sets wins over the machine's defaults.
    mine = options_from_args([], ["zero-page-detection=multifd"], base=old,
                             globals_=["migration.send-switchover-start=on"])
    assert mine.param("zero-page-detection") == "multifd"
    assert mine.prop("send-switchover-start") is True
