"""QMP errors: QEMU's error classes and the exception that carries one."""
from __future__ import annotations

from engine.errors import QMPError

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


