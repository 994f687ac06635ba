"""QMP argument checks and their QEMU texts (engine.qmp.schema)."""
from __future__ import annotations

import pytest

from engine.qmp.errors import QMPError
from engine.qmp.schema import (BOOL, INT, STR, STR_OR_NULL, Arg, Enum, ListOf, Struct,
                               check_arguments)

CAP = Struct((Arg("capability", Enum(["events", "multifd"])), Arg("state", BOOL)))
ARGS = (Arg("uri", STR), Arg("resume", BOOL, optional=True),
        Arg("caps", ListOf(CAP), optional=True), Arg("n", INT, optional=True),
        Arg("creds", STR_OR_NULL, optional=True))


def _desc(arguments) -> str:
    with pytest.raises(QMPError) as info:
        check_arguments(ARGS, arguments)
    assert info.value.error_class == "GenericError"
    return info.value.desc


def test_valid_arguments_come_back_without_absent_optionals():
    assert check_arguments(ARGS, {"uri": "unix:/x", "n": 3, "creds": None}) == {
        "uri": "unix:/x", "n": 3, "creds": None}


@pytest.mark.parametrize("arguments, desc", [
    ({}, "Parameter 'uri' is missing"),
    ({"uri": 1}, "Invalid parameter type for 'uri', expected: string"),
    ({"uri": "u", "resume": "yes"}, "Invalid parameter type for 'resume', expected: boolean"),
    ({"uri": "u", "n": True}, "Invalid parameter type for 'n', expected: integer"),
    ({"uri": "u", "n": 1.5}, "Invalid parameter type for 'n', expected: integer"),
    ({"uri": "u", "n": 2**64}, "Parameter 'n' expects uint64"),
    ({"uri": "u", "creds": 5}, "Invalid parameter type for 'creds', expected: StrOrNull"),
    ({"uri": "u", "caps": {}}, "Invalid parameter type for 'caps', expected: array"),
    ({"uri": "u", "caps": [5]}, "Invalid parameter type for 'caps[0]', expected: object"),
    ({"uri": "u", "caps": [{"capability": "events", "state": True},
                           {"capability": "rdma-pin-all", "state": True}]},
     "Parameter 'caps[1].capability' does not accept value 'rdma-pin-all'"),
    ({"uri": "u", "caps": [{"capability": "events"}]}, "Parameter 'caps[0].state' is missing"),
    ({"uri": "u", "caps": [{"capability": "events", "state": True, "x": 1}]},
     "Parameter 'caps[0].x' is unexpected"),
    ({"uri": "u", "bogus": 1}, "Parameter 'bogus' is unexpected"),
])
def test_errors_name_the_member_as_qemu_does(arguments, desc):
    assert _desc(arguments) == desc


def test_known_members_are_checked_before_leftovers():
    # QEMU visits the declared members first, then complains about the rest.
    assert _desc({"bogus": 1}) == "Parameter 'uri' is missing"
