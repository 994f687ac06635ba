"""Whether a migration's options suit its transport (QEMU's
migration_channels_and_transport_compatible in migration.c).

Here rather than in a command, so that every front end (the command line,
the QMP machine, the library) asks the same question from below.
"""
from __future__ import annotations

import uuid as uuidlib

from engine.errors import ConfigError, MigrationError
from engine.options import MigrationOptions
from engine.transport import Address, TcpAddress, UnixAddress

__all__ = ["check_multifd_transport", "check_uuid"]


def check_multifd_transport(options: MigrationOptions, address: Address) -> None:
    """QEMU: multifd needs a socket transport (file: only with mapped-ram)."""
    if options.cap("multifd") and not isinstance(address, (TcpAddress, UnixAddress)):
        raise ConfigError(f"multifd needs a socket transport (tcp: or unix:), "
                          f"not {address.uri}")


def check_uuid(sent: bytes, local: bytes | None) -> str | None:
    """QEMU's vmstate_uuid_post_load (validate-uuid): raises on a mismatch; a
    warning to show when this side has no UUID (QEMU only warns: the user
    may not know it, e.g. for an old snapshot)."""
    theirs = uuidlib.UUID(bytes=bytes(sent))
    if local is None:
        return f"UUID is received {theirs}, but local uuid isn't set"
    if bytes(sent) != local:
        raise MigrationError(f"UUID received is {theirs} and local is "
                             f"{uuidlib.UUID(bytes=local)}")
    return None
