"""Tests against a real qemu-system-x86_64 (Debian's 7.2); skipped without it."""
