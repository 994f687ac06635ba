"""engine: live migration of shared-memory guests in QEMU's migration stream format."""
