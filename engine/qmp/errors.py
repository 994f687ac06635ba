"""QMP errors: QEMU's error classes and the exception that carries one."""
from __future__ import annotations

from engine.errors import EngineError

__all__ = ["QMPError", "ERROR_CLASSES", "ERROR_CLASS_GENERIC",
           "ERROR_CLASS_COMMAND_NOT_FOUND", "ERROR_CLASS_DEVICE_NOT_ACTIVE",
           "ERROR_CLASS_DEVICE_NOT_FOUND", "ERROR_CLASS_KVM_MISSING_CAP"]

# QEMU's QapiErrorClass (qapi/error.json); almost everything is GenericError.
ERROR_CLASS_GENERIC = "GenericError"
ERROR_CLASS_COMMAND_NOT_FOUND = "CommandNotFound"
ERROR_CLASS_DEVICE_NOT_ACTIVE = "DeviceNotActive"
ERROR_CLASS_DEVICE_NOT_FOUND = "DeviceNotFound"
ERROR_CLASS_KVM_MISSING_CAP = "KVMMissingCap"

ERROR_CLASSES = frozenset({
    ERROR_CLASS_GENERIC, ERROR_CLASS_COMMAND_NOT_FOUND, ERROR_CLASS_DEVICE_NOT_ACTIVE,
    ERROR_CLASS_DEVICE_NOT_FOUND, ERROR_CLASS_KVM_MISSING_CAP,
})


class QMPError(EngineError):
    """A QMP command failed.

    ``error_class`` is one of QEMU's error classes, ``desc`` the human text
    (clients must not parse it).  A command handler raises it to answer with
    ``{"error": {"class", "desc"}}``; the client raises it for such an answer.
    """

    def __init__(self, error_class: str, desc: str):
        self.error_class, self.desc = error_class, desc
        super().__init__(f"{error_class}: {desc}")
