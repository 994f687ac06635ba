"""Migration capabilities and parameters (QEMU's options.c and qapi/migration.json).

Names, defaults, ranges and cross-checks are QEMU's (spec 5.1, 5.2), so a
user can take ``-cap``/``-param`` lists from a QEMU command line or a
libvirt log and get the same answer: either the same settings, or the same
refusal.  On top of QEMU's rules sits one more: the engine implements only
part of QEMU's feature set (:data:`SUPPORTED_CAPABILITIES`, and a few
parameter values), and asking for the rest is refused up front with a
message saying which QEMU feature it would have been - never silently
ignored.

A :class:`MigrationOptions` is an immutable, always-valid pair of mappings
(every capability, every parameter).  ``with_capabilities`` and
``with_parameters`` return a new one after the same checks QEMU runs for
``migrate-set-capabilities`` and ``migrate-set-parameters``: each value on
its own (type, range), then the whole set (capability dependencies and
conflicts, and conflicts between capabilities and parameters such as
``zero-copy-send`` with compression).
"""
from __future__ import annotations

import difflib
import re
import shlex
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping

from engine.errors import (ConfigError, InvalidCapabilityError, InvalidParameterError,
                           ParameterValueError)

__all__ = [
    "CAPABILITIES",
    "SUPPORTED_CAPABILITIES",
    "ParameterSpec",
    "PARAMETERS",
    "ParameterValueError",
    "MigrationOptions",
    "parse_size",
    "parse_bool",
    "parse_cap_arg",
    "parse_param_arg",
    "options_from_args",
    "PROPERTIES",
    "parse_global_arg",
    "check_capabilities",
    "check_implemented",
    "check_parameter",
    "check_parameters",
]

SIZE_MAX = 2**64 - 1
"""Largest size/uint64 value (QEMU's SIZE_MAX on 64-bit hosts)."""

TARGET_PAGE_SIZE = 4096
"""x86 target page size; the lower bound of ``xbzrle-cache-size``."""

MAX_MIGRATE_DOWNTIME = 2000 * 1000
"""Upper bound of ``downtime-limit`` in ms (QEMU: 2000 seconds)."""

# --------------------------------------------------------------------------
# Capabilities

CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events",
    "postcopy-ram", "x-colo", "release-ram", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send",
    "postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram",
)
"""Every QEMU migration capability, in QEMU's enum order (all default off)."""

SUPPORTED_CAPABILITIES: frozenset[str] = frozenset({
    "events", "return-path", "pause-before-switchover", "multifd",
    "postcopy-ram", "postcopy-preempt", "postcopy-blocktime",
    "late-block-activate", "validate-uuid", "switchover-ack", "zero-blocks",
    "auto-converge", "xbzrle", "dirty-limit",
})
"""The capabilities this engine implements: the only list of them.  Turning
on any other is refused when a :class:`MigrationOptions` is made (so by
``--cap``, ``migrate-set-capabilities`` and the library alike), and the
migration drivers' :func:`check_implemented` reads this set too."""

# What the refused capabilities would do in QEMU, for the refusal message.
_UNSUPPORTED_CAPABILITY_FEATURES: Mapping[str, str] = MappingProxyType({
    "rdma-pin-all": "pinning all guest RAM for the RDMA transport",
    "x-colo": "COLO fault tolerance (needs the replication module)",
    "release-ram": "freeing source RAM as postcopy sends it",
    "dirty-bitmaps": "migration of block dirty bitmaps",
    "x-ignore-shared": "skipping shared file-backed RAM",
    "background-snapshot": "userfaultfd write-protect background snapshots",
    "zero-copy-send": "MSG_ZEROCOPY sends on multifd channels",
    "mapped-ram": "fixed-offset RAM layout for file migration",
})

# background-snapshot conflicts, in QEMU's check order (spec 5.1).
_BACKGROUND_SNAPSHOT_CONFLICTS: tuple[str, ...] = (
    "postcopy-ram", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "return-path", "multifd",
    "pause-before-switchover", "auto-converge", "release-ram",
    "rdma-pin-all", "xbzrle", "x-colo", "validate-uuid", "zero-copy-send",
)

# --------------------------------------------------------------------------
# Parameters

PARAMETER_KINDS = frozenset({"size", "uint", "bool", "enum", "str", "list"})


@dataclass(frozen=True)
class ParameterSpec:
    """One migration parameter: its type, QEMU default and valid range.

    ``kind`` is ``"size"`` (bytes or bytes/s, accepts K/M/G suffixes),
    ``"uint"`` (plain integer), ``"bool"``, ``"enum"`` (one of ``choices``),
    ``"str"`` or ``"list"`` (a list of strings, default unset).
    ``minimum``/``maximum`` bound ``size`` and ``uint`` values inclusively.
    ``unit`` is what ``info migrate_parameters`` prints after the value.
    """

    name: str
    kind: str
    default: Any
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in PARAMETER_KINDS:
            raise ValueError(f"bad kind {self.kind!r} for {self.name}")

    def describe_range(self) -> str:
        """QEMU's wording of the valid values, as in "expects <this>"."""
        if self.kind == "enum":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "bool":
            return "on or off"
        return f"a value between {self.minimum} and {self.maximum}"


def _p(name: str, kind: str, default: Any, lo: int | None = None,
       hi: int | None = None, *, choices: tuple[str, ...] = (), unit: str = "",
       doc: str = "") -> tuple[str, ParameterSpec]:
    return name, ParameterSpec(name, kind, default, lo, hi, choices, unit, doc)


_U8, _U32, _U64 = 255, 2**32 - 1, SIZE_MAX

# fmt: off
PARAMETERS: Mapping[str, ParameterSpec] = MappingProxyType(dict([
    _p("announce-initial", "size", 50, 0, 100000, unit="ms",
       doc="delay before the first self-announce after migration"),
    _p("announce-max", "size", 550, 0, 100000, unit="ms",
       doc="maximum delay between self-announce packets"),
    _p("announce-rounds", "size", 5, 0, 1000,
       doc="number of self-announce rounds"),
    _p("announce-step", "size", 100, 1, 10000, unit="ms",
       doc="increase of the delay between announce rounds"),
    _p("throttle-trigger-threshold", "uint", 50, 1, 100, unit="%",
       doc="dirty/transferred ratio (percent) that counts as not converging"),
    _p("cpu-throttle-initial", "uint", 20, 1, 99, unit="%",
       doc="first auto-converge throttle step"),
    _p("cpu-throttle-increment", "uint", 10, 1, 99, unit="%",
       doc="further auto-converge throttle steps"),
    _p("cpu-throttle-tailslow", "bool", False,
       doc="smaller throttle steps near the target"),
    _p("tls-creds", "str", "", doc="TLS credentials object id; empty = no TLS"),
    _p("tls-hostname", "str", "", doc="host name the TLS peer must present"),
    _p("tls-authz", "str", "", doc="authorization object for TLS clients"),
    _p("max-bandwidth", "size", 128 * 1024 * 1024, 0, SIZE_MAX, unit="bytes/second",
       doc="precopy rate limit; 0 = unlimited; applies live"),
    _p("avail-switchover-bandwidth", "size", 0, 0, SIZE_MAX, unit="bytes/second",
       doc="bandwidth assumed at switchover; 0 = use the measured one"),
    _p("downtime-limit", "uint", 300, 0, MAX_MIGRATE_DOWNTIME, unit="ms",
       doc="largest acceptable stop time at switchover"),
    _p("x-checkpoint-delay", "uint", 20000, 0, _U32, unit="ms",
       doc="COLO checkpoint interval"),
    _p("multifd-channels", "uint", 2, 1, _U8,
       doc="number of multifd channels"),
    _p("xbzrle-cache-size", "size", 64 * 1024 * 1024, TARGET_PAGE_SIZE, SIZE_MAX,
       unit="bytes", doc="XBZRLE cache; a power of two"),
    _p("max-postcopy-bandwidth", "size", 0, 0, SIZE_MAX, unit="bytes/second",
       doc="postcopy background rate limit; 0 = unlimited"),
    _p("max-cpu-throttle", "uint", 99, 1, 99, unit="%",
       doc="auto-converge ceiling; at least cpu-throttle-initial"),
    _p("multifd-compression", "enum", "none",
       choices=("none", "zlib", "zstd", "qatzip", "qpl", "uadk"),
       doc="multifd page codec"),
    _p("multifd-zlib-level", "uint", 1, 0, 9, doc="zlib level for multifd"),
    _p("multifd-qatzip-level", "uint", 1, 1, 9, doc="QATzip level for multifd"),
    _p("multifd-zstd-level", "uint", 1, 0, 20, doc="zstd level for multifd"),
    _p("block-bitmap-mapping", "list", None,
       doc="block node/bitmap alias map; unset = identity"),
    _p("x-vcpu-dirty-limit-period", "uint", 1000, 1, 1000, unit="ms",
       doc="dirty-limit measuring period"),
    _p("vcpu-dirty-limit", "uint", 1, 1, _U64, unit="MB/s",
       doc="per-vCPU dirty rate quota of the dirty-limit capability"),
    _p("mode", "enum", "normal",
       choices=("normal", "cpr-reboot", "cpr-transfer", "cpr-exec"),
       doc="migration mode"),
    _p("zero-page-detection", "enum", "multifd",
       choices=("none", "legacy", "multifd"),
       doc="where zero pages are found: not at all, main thread, multifd threads"),
    _p("direct-io", "bool", False,
       doc="O_DIRECT for mapped-ram file migration"),
    _p("cpr-exec-command", "list", None,
       doc="command run by the cpr-exec mode"),
]))
"""Every QEMU migration parameter (spec 5.2) with QEMU's default and range."""
# fmt: on

# --------------------------------------------------------------------------
# Properties of the migration object (QEMU's ``-global migration.NAME=VALUE``):
# compatibility switches that machine types set for older QEMUs.

PROPERTIES: Mapping[str, tuple[bool, str]] = MappingProxyType({
    "multifd-flush-after-each-section": (
        False, "sync every multifd channel at each RAM section's end, as QEMU "
               "before 8.1 does (off: once per dirty-bitmap round, with a "
               "MULTIFD_FLUSH record on the main channel)"),
    "send-switchover-start": (
        True, "send MIG_CMD_SWITCHOVER_START before the final RAM section "
              "(QEMU 10.0; before that QEMU refuses the command)"),
})
"""Migration object properties the engine honours: name -> (default, what it does)."""

# Values QEMU accepts but this engine does not implement.  Anything not here
# (and every capability in SUPPORTED_CAPABILITIES) works.
_UNBUILT_CODECS: Mapping[str, str] = MappingProxyType({
    "qatzip": "Intel QAT compression",
    "qpl": "Intel In-Memory Analytics Accelerator (QPL) compression",
    "uadk": "Huawei UADK compression",
})


def _engine_refusal(name: str, value: Any) -> str | None:
    """Why the engine cannot honour ``name = value`` (None if it can)."""
    if name == "tls-creds" and value:
        return "not supported by this engine (QEMU feature: TLS on migration channels)"
    if name == "multifd-compression" and value in _UNBUILT_CODECS:
        return (f"not built into this engine (QEMU feature: {_UNBUILT_CODECS[value]}, "
                "build dependent)")
    if name == "mode" and value != "normal":
        return "not supported by this engine (QEMU feature: CPR, checkpoint/restart modes)"
    if name == "direct-io" and value:
        return ("not supported by this engine "
                "(QEMU feature: O_DIRECT file migration with mapped-ram)")
    if name == "block-bitmap-mapping" and value is not None:
        return "not supported by this engine (QEMU feature: block dirty bitmap migration)"
    return None


# --------------------------------------------------------------------------
# Value parsing

_SIZE_SUFFIXES: Mapping[str, int] = MappingProxyType({
    "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
    "T": 1 << 40, "P": 1 << 50, "E": 1 << 60,
})
_SIZE_RE = re.compile(
    r"(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]*))?)"
    r"(?P<suffix>[bBkKmMgGtTpPeE])?")


def parse_size(text: str | int) -> int:
    """Parse a size in bytes the way QEMU's ``qemu_strtosz`` does.

    A decimal number with an optional fraction and an optional binary
    suffix ``B``, ``K``, ``M``, ``G``, ``T``, ``P``, ``E`` (any case; K is
    1024), e.g. ``"4096"``, ``"64M"``, ``"1.5G"``; or a hexadecimal number
    ``0x...`` without suffix or fraction.  A fraction needs a suffix other
    than ``B`` (no fractional bytes) and is truncated to whole bytes.  Ints
    pass through.  Raises :class:`ConfigError` for negative, empty, garbage
    or values above 2**64 - 1.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(f"invalid size {text!r}: expected a number of bytes")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.fullmatch(text.strip())
        if m is None:
            raise ConfigError(f"invalid size {text!r}: expected a number with an "
                              "optional B/K/M/G/T/P/E suffix")
        suffix = (m["suffix"] or "B").upper()
        mul = _SIZE_SUFFIXES[suffix]
        if m["hex"] is not None:
            if m["suffix"]:
                raise ConfigError(f"invalid size {text!r}: hexadecimal sizes "
                                  "take no suffix")
            value = int(m["hex"], 16)
        else:
            frac = Fraction(int(m["frac"]), 10 ** len(m["frac"])) if m["frac"] else 0
            if frac and mul == 1:
                raise ConfigError(f"invalid size {text!r}: fractional bytes")
            value = int(m["int"]) * mul + int(frac * mul)
    if value < 0:
        raise ConfigError(f"invalid size {text!r}: negative")
    if value > SIZE_MAX:
        raise ConfigError(f"invalid size {text!r}: larger than 2**64 - 1")
    return value


_TRUE_WORDS = frozenset({"on", "true", "yes", "1"})
_FALSE_WORDS = frozenset({"off", "false", "no", "0"})


def parse_bool(text: str | bool) -> bool:
    """``on/off``, ``true/false``, ``yes/no``, ``1/0`` (any case) or a bool."""
    if isinstance(text, bool):
        return text
    if isinstance(text, str):
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise ConfigError(f"invalid boolean {text!r}: expected on/off, true/false or yes/no")


def _canon(name: str) -> str:
    # Python callers write max_bandwidth; QEMU's names never contain '_'.
    return name.strip().replace("_", "-")


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _capability_name(name: str) -> str:
    cname = _canon(name)
    if cname not in CAPABILITIES:
        raise InvalidCapabilityError(
            name, "unknown capability" + _did_you_mean(cname, CAPABILITIES))
    return cname


def _parameter_spec(name: str) -> ParameterSpec:
    cname = _canon(name)
    spec = PARAMETERS.get(cname)
    if spec is None:
        raise InvalidParameterError(
            name, None, "unknown parameter" + _did_you_mean(cname, PARAMETERS))
    return spec


_UINT_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+", re.ASCII)


def _parse_uint(text: str) -> int:
    # QEMU's visitor reads ASCII digits only; int() would also take
    # Arabic-Indic or fullwidth digits, underscores and a sign.
    text = text.strip()
    if not _UINT_RE.fullmatch(text):
        raise ValueError(f"not an unsigned integer: {text!r}")
    return int(text, 0 if text[:2].lower() == "0x" else 10)


def _coerce(spec: ParameterSpec, value: Any) -> Any:
    """Type-check and range-check one value; strings are parsed."""
    name = spec.name
    if spec.kind in ("size", "uint"):
        if isinstance(value, str):
            try:
                if spec.kind == "size":
                    value = parse_size(value)
                else:
                    value = _parse_uint(value)
            except (ConfigError, ValueError, IndexError):
                what = "a size in bytes" if spec.kind == "size" else "an integer"
                raise ParameterValueError(name, value, what) from None
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ParameterValueError(name, value, "an integer")
        if not spec.minimum <= value <= spec.maximum:
            raise ParameterValueError(name, value, spec.describe_range())
        if name == "xbzrle-cache-size" and value & (value - 1):
            raise ParameterValueError(
                name, value, "a power of two no less than the target page size")
        return value
    if spec.kind == "bool":
        try:
            return parse_bool(value)
        except ConfigError:
            raise ParameterValueError(name, value, "on or off") from None
    if spec.kind == "enum":
        if value not in spec.choices:
            raise ParameterValueError(name, value, spec.describe_range())
        return value
    if spec.kind == "str":
        if value is None:  # QMP null resets to "" (QEMU's StrOrNull)
            return ""
        if not isinstance(value, str):
            raise ParameterValueError(name, value, "a string")
        return value
    # list of strings; None = unset
    if value is None:
        return None
    if isinstance(value, str):
        value = shlex.split(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ParameterValueError(name, value, "a list of strings")
    return tuple(value)


# --------------------------------------------------------------------------
# Whole-set checks (QEMU's migrate_caps_check and migrate_params_check)

def _conflicts(caps: Mapping[str, bool], params: Mapping[str, Any]) -> Iterator[ConfigError]:
    """Every QEMU cross-check failure of a complete caps/params pair, in order."""
    on = {c for c in CAPABILITIES if caps.get(c)}
    compression = params.get("multifd-compression", "none")
    tls = bool(params.get("tls-creds"))
    mode = params.get("mode", "normal")

    if {"postcopy-ram", "x-ignore-shared"} <= on:
        yield InvalidCapabilityError("postcopy-ram", "not compatible with x-ignore-shared")
    if "background-snapshot" in on:
        for other in _BACKGROUND_SNAPSHOT_CONFLICTS:
            if other in on:
                yield InvalidCapabilityError("background-snapshot",
                                             f"not compatible with {other}")
    if "zero-copy-send" in on:
        why = [w for w, bad in (("multifd is off", "multifd" not in on),
                                ("xbzrle is on", "xbzrle" in on),
                                (f"multifd-compression is {compression!r}",
                                 compression != "none"),
                                ("tls-creds is set", tls)) if bad]
        if why:
            yield InvalidCapabilityError(
                "zero-copy-send", "only available for non-compressed non-TLS multifd "
                f"migration ({', '.join(why)})")
    if "postcopy-preempt" in on and "postcopy-ram" not in on:
        yield InvalidCapabilityError("postcopy-preempt", "requires capability 'postcopy-ram'")
    if {"multifd", "xbzrle"} <= on:
        yield InvalidCapabilityError("multifd", "not compatible with xbzrle")
    if "switchover-ack" in on and "return-path" not in on:
        yield InvalidCapabilityError("switchover-ack", "requires capability 'return-path'")
    if {"dirty-limit", "auto-converge"} <= on:
        yield InvalidCapabilityError("dirty-limit", "conflicts with auto-converge")
    if "mapped-ram" in on:
        for other in ("xbzrle", "postcopy-ram"):
            if other in on:
                yield InvalidCapabilityError("mapped-ram", f"not compatible with {other}")
        if compression != "none" or tls:
            yield InvalidCapabilityError(
                "mapped-ram", "only available for non-compressed non-TLS multifd migration")
    if mode != "normal":
        for other in ("postcopy-ram", "background-snapshot", "x-colo"):
            if other in on:
                yield InvalidCapabilityError(other, f"not compatible with mode {mode!r}")

    if params.get("max-cpu-throttle", 99) < params.get("cpu-throttle-initial", 20):
        yield ParameterValueError("max-cpu-throttle", params["max-cpu-throttle"],
                                  "an integer in the range of cpu-throttle-initial to 99")


def check_capabilities(caps: Mapping[str, bool],
                       params: Mapping[str, Any] | None = None) -> None:
    """Run QEMU's capability cross-checks; raise the first failure.

    ``caps`` may be partial (missing = off); ``params`` defaults to QEMU's
    defaults.  This is QEMU's rule set only - whether the *engine* supports
    a capability is checked by :class:`MigrationOptions`.
    """
    full = {c: bool(caps.get(c, False)) for c in CAPABILITIES}
    p = {n: s.default for n, s in PARAMETERS.items()}
    p.update(params or {})
    for err in _conflicts(full, p):
        raise err


def check_parameter(name: str, value: Any) -> Any:
    """One parameter's value on its own (type, range and what this engine
    implements); returns it typed.  The rules between parameters are
    :func:`check_parameters`' and :class:`MigrationOptions`'."""
    spec = _parameter_spec(name)
    typed = _coerce(spec, value)
    why = _engine_refusal(spec.name, typed)
    if why:
        raise InvalidParameterError(spec.name, typed, why)
    return typed


def check_implemented(options: MigrationOptions) -> None:
    """Raise :class:`InvalidCapabilityError` for an enabled capability this
    engine does not implement.  :data:`SUPPORTED_CAPABILITIES` is the one
    list of them; a :class:`MigrationOptions` already refuses the rest when
    made, so this guards options built around that check (unpickled from an
    older engine, or made by a test with ``object.__new__``)."""
    for name in options.enabled_capabilities():
        if name not in SUPPORTED_CAPABILITIES:
            raise InvalidCapabilityError(
                name, "not supported by this engine (QEMU feature: "
                f"{_UNSUPPORTED_CAPABILITY_FEATURES[name]})")


def check_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a (partial) parameter mapping; return it typed and canonical.

    Checks types and ranges one by one, then the rules between parameters.
    Does not apply the engine's own limits (see :class:`MigrationOptions`).
    """
    out = {}
    for name, value in params.items():
        spec = _parameter_spec(name)
        out[spec.name] = _coerce(spec, value)
    full = {n: s.default for n, s in PARAMETERS.items()}
    full.update(out)
    for err in _conflicts({}, full):
        raise err
    return out


# --------------------------------------------------------------------------
# The options value

@dataclass(frozen=True)
class MigrationOptions:
    """An immutable, validated set of every capability and every parameter.

    Construct with :meth:`default` and derive with :meth:`with_capabilities`,
    :meth:`with_parameters` or :meth:`replace`; each returns a new instance
    after QEMU's checks plus the engine's own limits, so an instance that
    exists is one the engine can run.  Values are typed (ints in bytes,
    bytes/s or ms as :data:`PARAMETERS` documents; bools; strings).
    Picklable, so it can be handed to worker processes.
    """

    capabilities: Mapping[str, bool]
    parameters: Mapping[str, Any]
    #: the migration object's properties (:data:`PROPERTIES`); unset ones default
    properties: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        props = {n: default for n, (default, _) in PROPERTIES.items()}
        for name, value in self.properties.items():
            if name not in PROPERTIES:
                raise ConfigError(
                    f"migration has no property {name!r}{_did_you_mean(name, PROPERTIES)}; "
                    f"known: {', '.join(PROPERTIES)}")
            try:
                props[name] = parse_bool(value)
            except ConfigError as exc:
                raise ConfigError(f"property migration.{name}: {exc}") from None
        object.__setattr__(self, "properties", MappingProxyType(props))
        caps_in = {_capability_name(n): v for n, v in self.capabilities.items()}
        params_in = {_parameter_spec(n).name: v for n, v in self.parameters.items()}
        missing = [c for c in CAPABILITIES if c not in caps_in]
        missing += [p for p in PARAMETERS if p not in params_in]
        if missing:
            raise ConfigError(f"MigrationOptions needs every option; missing {missing}")
        caps = {}
        for name in CAPABILITIES:
            try:
                caps[name] = parse_bool(caps_in[name])
            except ConfigError as exc:
                raise InvalidCapabilityError(name, str(exc)) from None
            if caps[name] and name not in SUPPORTED_CAPABILITIES:
                raise InvalidCapabilityError(
                    name, "not supported by this engine (QEMU feature: "
                    f"{_UNSUPPORTED_CAPABILITY_FEATURES[name]})")
        params = {}
        for name, spec in PARAMETERS.items():
            params[name] = _coerce(spec, params_in[name])
            why = _engine_refusal(name, params[name])
            if why:
                raise InvalidParameterError(name, params[name], why)
        for err in _conflicts(caps, params):
            raise err
        object.__setattr__(self, "capabilities", MappingProxyType(caps))
        object.__setattr__(self, "parameters", MappingProxyType(params))

    def __hash__(self) -> int:
        return hash((tuple(self.capabilities.items()), tuple(self.parameters.items()),
                     tuple(self.properties.items())))

    def __reduce__(self):
        # mappingproxy does not pickle; rebuild (and re-validate) from dicts.
        return (type(self), (dict(self.capabilities), dict(self.parameters),
                             dict(self.properties)))

    def __repr__(self) -> str:
        changed = [f"{n}=on" for n, v in self.capabilities.items() if v]
        changed += [f"{n}={v!r}" for n, v in self.parameters.items()
                    if v != PARAMETERS[n].default]
        return f"MigrationOptions({', '.join(changed)})"

    @classmethod
    def default(cls) -> MigrationOptions:
        """Every capability off, every parameter at QEMU's default."""
        return cls({c: False for c in CAPABILITIES},
                   {n: s.default for n, s in PARAMETERS.items()})

    def cap(self, name: str) -> bool:
        """Whether capability ``name`` is on."""
        return self.capabilities[_capability_name(name)]

    def param(self, name: str) -> Any:
        """The typed value of parameter ``name``."""
        return self.parameters[_parameter_spec(name).name]

    def enabled_capabilities(self) -> tuple[str, ...]:
        """Names of the capabilities that are on, in QEMU's order."""
        return tuple(c for c, v in self.capabilities.items() if v)

    def replace(self, capabilities: Mapping[str, bool | str] | None = None,
                parameters: Mapping[str, Any] | None = None) -> MigrationOptions:
        """A copy with some capabilities and parameters changed, checked together.

        Raises :class:`InvalidCapabilityError` or :class:`InvalidParameterError`
        (both :class:`ConfigError`) naming the offending option.
        """
        caps = dict(self.capabilities)
        for name, value in (capabilities or {}).items():
            cname = _capability_name(name)
            try:
                caps[cname] = parse_bool(value)
            except ConfigError as exc:
                raise InvalidCapabilityError(cname, str(exc)) from None
        params = dict(self.parameters)
        for name, value in (parameters or {}).items():
            params[_parameter_spec(name).name] = value
        return type(self)(caps, params, self.properties)

    def prop(self, name: str) -> bool:
        """The migration object's property ``name`` (:data:`PROPERTIES`)."""
        return self.properties[name]

    def with_properties(self, properties: Mapping[str, bool | str]) -> MigrationOptions:
        """``-global migration.NAME=VALUE``: a copy with these properties set
        (values bool, or QEMU's on/off spellings)."""
        parsed = {}
        for name, value in properties.items():
            if name not in PROPERTIES:
                raise ConfigError(f"migration has no property {name!r}"
                                  f"{_did_you_mean(name, PROPERTIES)}")
            try:
                parsed[name] = value if isinstance(value, bool) else parse_bool(str(value))
            except ConfigError as exc:
                raise ConfigError(f"migration.{name}: {exc}") from None
        return type(self)(self.capabilities, self.parameters, {**self.properties, **parsed})

    def with_capabilities(self, capabilities: Mapping[str, bool | str]) -> MigrationOptions:
        """``migrate-set-capabilities``: a copy with these capabilities set."""
        return self.replace(capabilities=capabilities)

    def with_parameters(self, parameters: Mapping[str, Any]) -> MigrationOptions:
        """``migrate-set-parameters``: a copy with these parameters set.

        Values may be typed or strings from a command line (``"1G"``,
        ``"on"``, ``"8"``).
        """
        return self.replace(parameters=parameters)

    def to_qmp_capabilities(self) -> list[dict[str, Any]]:
        """``query-migrate-capabilities`` result: ``[{capability, state}]``."""
        return [{"capability": c, "state": v} for c, v in self.capabilities.items()]

    def to_qmp_parameters(self) -> dict[str, Any]:
        """``query-migrate-parameters`` result (unset list parameters omitted)."""
        return {n: (list(v) if isinstance(v, tuple) else v)
                for n, v in self.parameters.items() if v is not None}


# --------------------------------------------------------------------------
# Command-line helpers

def parse_cap_arg(arg: str) -> tuple[str, bool]:
    """``"multifd=on"`` -> ``("multifd", True)``; a bare name means on.

    Accepts on/off, true/false, yes/no, 1/0.  Raises
    :class:`InvalidCapabilityError` for unknown names or bad values.
    """
    name, sep, value = arg.partition("=")
    cname = _capability_name(name)
    if not sep:
        return cname, True
    try:
        return cname, parse_bool(value)
    except ConfigError as exc:
        raise InvalidCapabilityError(cname, str(exc)) from None


def parse_param_arg(arg: str) -> tuple[str, str]:
    """``"max-bandwidth=1G"`` -> ``("max-bandwidth", "1G")``.

    Only the name is checked here; the value is checked when applied.
    """
    name, sep, value = arg.partition("=")
    if not sep:
        raise ConfigError(f"invalid parameter argument {arg!r}: expected NAME=VALUE")
    return _parameter_spec(name).name, value


def parse_global_arg(arg: str) -> tuple[str, str]:
    """``"migration.multifd-flush-after-each-section=on"`` -> ``(name, "on")``:
    QEMU's ``-global DRIVER.PROPERTY=VALUE`` for the migration object (the
    value is checked when applied, by :meth:`MigrationOptions.with_properties`)."""
    head, sep, value = arg.partition("=")
    driver, dot, name = head.partition(".")
    if not sep or not dot:
        raise ConfigError(f"invalid --global {arg!r}: expected migration.PROPERTY=VALUE")
    if driver != "migration":
        raise ConfigError(f"--global {arg!r}: this engine has no device {driver!r}; "
                          "only migration.PROPERTY is known")
    if name not in PROPERTIES:
        raise ConfigError(f"--global {arg!r}: migration has no property {name!r}"
                          f"{_did_you_mean(name, PROPERTIES)}; known: {', '.join(PROPERTIES)}")
    return name, value


def options_from_args(caps: Iterable[str] = (), params: Iterable[str] = (),
                      base: MigrationOptions | None = None,
                      globals_: Iterable[str] = ()) -> MigrationOptions:
    """Build options from ``-cap NAME=on``, ``-param NAME=VALUE`` and
    ``-global migration.NAME=VALUE`` lists.

    Later mentions of the same name win.  Everything is validated together,
    on top of ``base`` (default: QEMU's defaults).
    """
    cap_values = dict(parse_cap_arg(a) for a in caps)
    param_values = dict(parse_param_arg(a) for a in params)
    prop_values = dict(parse_global_arg(a) for a in globals_)
    options = (base or MigrationOptions.default()).with_properties(prop_values)
    return options.replace(cap_values, param_values)
