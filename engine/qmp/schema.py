"""Checking QMP arguments as QEMU's QAPI input visitor does, with its error texts.

A command's arguments are a tuple of :class:`Arg`; :func:`check_arguments`
walks them in order and raises :class:`~engine.qmp.protocol.QMPError`
(``GenericError``) with the text QEMU's visitor would produce:

* ``Parameter 'uri' is missing``
* ``Invalid parameter type for 'resume', expected: boolean``
* ``Parameter 'state' does not accept value 'bogus'``
* ``Parameter 'foo' is unexpected`` (checked after the known members, as
  QEMU checks a struct for leftovers once it has visited it)

Nested members are named like QEMU names them: ``capabilities[0].state``.
A flat union (:class:`Union`, QAPI's ``'union'`` with a ``'discriminator'``)
keeps its variant's members in the same JSON object as its base's, so
``channels[0].addr.host`` sits next to ``channels[0].addr.transport``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from engine.qmp.errors import ERROR_CLASS_GENERIC, QMPError

__all__ = ["Type", "STR", "BOOL", "INT", "NUMBER", "ANY", "STR_OR_NULL",
           "Enum", "ListOf", "Struct", "Union", "Arg", "check_arguments"]

#: QAPI integers travel as JSON numbers; uint64 is the widest QEMU takes.
_UINT64_MAX = 2**64 - 1


class Type:
    """A QAPI type: ``check(value, name)`` returns the value or raises."""

    def check(self, value: Any, name: str) -> Any:
        raise NotImplementedError


def _type_error(name: str, expected: str) -> QMPError:
    return QMPError(ERROR_CLASS_GENERIC,
                    f"Invalid parameter type for '{name}', expected: {expected}")


class _Scalar(Type):
    def __init__(self, expected: str, accepts):
        self.expected, self.accepts = expected, accepts

    def check(self, value, name):
        if not self.accepts(value):
            raise _type_error(name, self.expected)
        return value


class _Int(Type):
    def check(self, value, name):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, "integer")
        if not -2**63 <= value <= _UINT64_MAX:
            raise QMPError(ERROR_CLASS_GENERIC, f"Parameter '{name}' expects uint64")
        return value


STR: Type = _Scalar("string", lambda v: isinstance(v, str))
BOOL: Type = _Scalar("boolean", lambda v: isinstance(v, bool))
INT: Type = _Int()
NUMBER: Type = _Scalar("number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
ANY: Type = _Scalar("any", lambda v: True)
#: QAPI's StrOrNull alternate (tls-creds and friends: null resets to "")
STR_OR_NULL: Type = _Scalar("StrOrNull", lambda v: v is None or isinstance(v, str))


class Enum(Type):
    """A QAPI enum: one of ``values`` (strings)."""

    def __init__(self, values: Sequence[str]):
        self.values = frozenset(values)

    def check(self, value, name):
        if not isinstance(value, str):
            raise _type_error(name, "string")
        if value not in self.values:
            raise QMPError(ERROR_CLASS_GENERIC,
                           f"Parameter '{name}' does not accept value '{value}'")
        return value


class ListOf(Type):
    """A QAPI array of ``item``."""

    def __init__(self, item: Type):
        self.item = item

    def check(self, value, name):
        if not isinstance(value, list):
            raise _type_error(name, "array")
        return [self.item.check(v, f"{name}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Arg:
    """One member of a command's arguments (or of a struct)."""
    name: str
    type: Type
    optional: bool = False


class _Object(Type):
    """A QAPI type that is a JSON object: its members are visited first, then
    whatever is left over is refused (QEMU's visit_check_struct)."""

    def visit(self, given: Mapping[str, Any], prefix: str) -> tuple[dict, set[str]]:
        """(checked members, names of the members this type knows)."""
        raise NotImplementedError

    def check(self, value, name):
        if not isinstance(value, Mapping):
            raise _type_error(name, "object")
        out, known = self.visit(value, name + ".")
        _refuse_leftovers(value, known, name + ".")
        return out


class Struct(_Object):
    """A QAPI struct with members ``args``."""

    def __init__(self, args: Sequence[Arg]):
        self.args = tuple(args)

    def visit(self, given, prefix):
        out = {}
        for arg in self.args:
            full = prefix + arg.name
            if arg.name not in given:
                if not arg.optional:
                    raise QMPError(ERROR_CLASS_GENERIC, f"Parameter '{full}' is missing")
                continue
            out[arg.name] = arg.type.check(given[arg.name], full)
        return out, {a.name for a in self.args}


class Union(_Object):
    """A QAPI flat union: the ``base`` members, one of which (``discriminator``,
    an :class:`Enum`) picks the variant whose members follow in the same
    object.  A tag with no entry in ``variants`` has no members of its own
    (YankInstance's ``migration``)."""

    def __init__(self, base: Sequence[Arg], discriminator: str,
                 variants: Mapping[str, _Object]):
        self.base = Struct(base)
        self.discriminator = discriminator
        self.variants = dict(variants)

    def visit(self, given, prefix):
        out, known = self.base.visit(given, prefix)
        variant = self.variants.get(out[self.discriminator])
        if variant is not None:
            more, names = variant.visit(given, prefix)
            out.update(more)
            known |= names
        return out, known


def _refuse_leftovers(given: Mapping[str, Any], known: set[str], prefix: str) -> None:
    for key in given:
        if key not in known:
            raise QMPError(ERROR_CLASS_GENERIC, f"Parameter '{prefix}{key}' is unexpected")


def check_arguments(args: Sequence[Arg], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The command's ``arguments`` checked against ``args``; absent optional
    members are left out of the result."""
    out, known = Struct(args).visit(arguments, "")
    _refuse_leftovers(arguments, known, "")
    return out
