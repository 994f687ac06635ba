"""Whether a migration's options suit its transport (QEMU's
migration_channels_and_transport_compatible in migration.c).

Here rather than in a command, so that every front end (the command line,
the QMP machine, the library) asks the same question from below.
"""
from __future__ import annotations

from engine.errors import ConfigError
from engine.options import MigrationOptions
from engine.transport import Address, TcpAddress, UnixAddress

__all__ = ["check_multifd_transport"]


def check_multifd_transport(options: MigrationOptions, address: Address) -> None:
    """QEMU: multifd needs a socket transport (file: only with mapped-ram)."""
    if options.cap("multifd") and not isinstance(address, (TcpAddress, UnixAddress)):
        raise ConfigError(f"multifd needs a socket transport (tcp: or unix:), "
                          f"not {address.uri}")
