"""Numbers of QEMU's migration stream, under QEMU's names.

Everything here is a fact of the wire format (see the reference spec, sections
1 and 2); nothing is tunable.  Integers on the main stream and the return path
are big-endian.
"""
from __future__ import annotations

from enum import IntEnum

# -- file header (spec 1.1) ---------------------------------------------------
QEMU_VM_FILE_MAGIC = 0x5145564D          #: "QEVM"
QEMU_VM_FILE_VERSION = 3
QEMU_VM_FILE_VERSION_COMPAT = 2          #: obsolete; refused by every QEMU since 2010


class SectionType(IntEnum):
    """The one-byte tags of the main stream (spec 1.2)."""

    QEMU_VM_EOF = 0x00
    QEMU_VM_SECTION_START = 0x01
    QEMU_VM_SECTION_PART = 0x02
    QEMU_VM_SECTION_END = 0x03
    QEMU_VM_SECTION_FULL = 0x04
    QEMU_VM_SUBSECTION = 0x05
    QEMU_VM_VMDESCRIPTION = 0x06
    QEMU_VM_CONFIGURATION = 0x07
    QEMU_VM_COMMAND = 0x08
    QEMU_VM_SECTION_FOOTER = 0x7E


QEMU_VM_EOF = SectionType.QEMU_VM_EOF
QEMU_VM_SECTION_START = SectionType.QEMU_VM_SECTION_START
QEMU_VM_SECTION_PART = SectionType.QEMU_VM_SECTION_PART
QEMU_VM_SECTION_END = SectionType.QEMU_VM_SECTION_END
QEMU_VM_SECTION_FULL = SectionType.QEMU_VM_SECTION_FULL
QEMU_VM_SUBSECTION = SectionType.QEMU_VM_SUBSECTION
QEMU_VM_VMDESCRIPTION = SectionType.QEMU_VM_VMDESCRIPTION
QEMU_VM_CONFIGURATION = SectionType.QEMU_VM_CONFIGURATION
QEMU_VM_COMMAND = SectionType.QEMU_VM_COMMAND
QEMU_VM_SECTION_FOOTER = SectionType.QEMU_VM_SECTION_FOOTER

#: Name of the vmsd whose body follows the QEMU_VM_CONFIGURATION tag.
CONFIGURATION_VMSD_NAME = "configuration"

# -- RAM section (spec 2) -------------------------------------------------------
#: Flags live in the low bits of each record's be64 "address word"; the offset
#: is TARGET_PAGE_SIZE aligned, so the two never overlap.
RAM_SAVE_FLAG_FULL = 0x01           #: obsolete since 2009, never sent
RAM_SAVE_FLAG_ZERO = 0x02           #: all-zero page; one fill byte (must be 0) follows
RAM_SAVE_FLAG_MEM_SIZE = 0x04       #: RAM block list; high bits are the total RAM size
RAM_SAVE_FLAG_PAGE = 0x08           #: TARGET_PAGE_SIZE raw bytes follow
RAM_SAVE_FLAG_EOS = 0x10            #: end of this section's RAM data
RAM_SAVE_FLAG_CONTINUE = 0x20       #: same RAMBlock as the previous record: no name follows
RAM_SAVE_FLAG_XBZRLE = 0x40         #: delta-encoded page
#: the byte after an XBZRLE record's address word (QEMU's ENCODING_FLAG_XBZRLE)
ENCODING_FLAG_XBZRLE = 0x01
RAM_SAVE_FLAG_HOOK = 0x80           #: RDMA control
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100  #: compress threads, removed in QEMU 9.1
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200  #: multifd sync point (QEMU >= 8.0; 7.2 rejects it)

#: Every flag QEMU has ever defined; anything else in the low bits is malformed.
RAM_SAVE_FLAGS_ALL = 0x3FF

TARGET_PAGE_SIZE = 4096             #: bytes; x86 and arm64 KVM
RAM_SECTION_VERSION = 4             #: the RAM loader refuses anything else
RAM_SECTION_IDSTR = "ram"

# -- commands (spec 1.7) --------------------------------------------------------


class MigCmd(IntEnum):
    """``QEMU_VM_COMMAND`` sub-commands (``be16 cmd``)."""

    MIG_CMD_INVALID = 0
    MIG_CMD_OPEN_RETURN_PATH = 1
    MIG_CMD_PING = 2
    MIG_CMD_POSTCOPY_ADVISE = 3
    MIG_CMD_POSTCOPY_LISTEN = 4
    MIG_CMD_POSTCOPY_RUN = 5
    MIG_CMD_POSTCOPY_RAM_DISCARD = 6
    MIG_CMD_PACKAGED = 7
    MIG_CMD_ENABLE_COLO = 8
    MIG_CMD_POSTCOPY_RESUME = 9
    MIG_CMD_RECV_BITMAP = 10
    MIG_CMD_SWITCHOVER_START = 11   #: QEMU >= 10.0; 7.2 stops at RECV_BITMAP


MIG_CMD_MAX = 12                    #: first command id a receiver refuses

#: Payload length of each command, or None where it varies (checked by the
#: command's own parser).  The receiver refuses any other length.
MIG_CMD_LEN: dict[MigCmd, int | None] = {
    MigCmd.MIG_CMD_OPEN_RETURN_PATH: 0,
    MigCmd.MIG_CMD_PING: 4,
    MigCmd.MIG_CMD_POSTCOPY_ADVISE: None,      # 0 (dirty bitmaps only) or 16
    MigCmd.MIG_CMD_POSTCOPY_LISTEN: 0,
    MigCmd.MIG_CMD_POSTCOPY_RUN: 0,
    MigCmd.MIG_CMD_POSTCOPY_RAM_DISCARD: None,
    MigCmd.MIG_CMD_PACKAGED: 4,
    MigCmd.MIG_CMD_ENABLE_COLO: 0,
    MigCmd.MIG_CMD_POSTCOPY_RESUME: 0,
    MigCmd.MIG_CMD_RECV_BITMAP: None,
    MigCmd.MIG_CMD_SWITCHOVER_START: 0,
}

QEMU_VM_PING_PACKAGED_LOADED = 0x42  #: PING value meaning "package loaded" (QEMU 10.2)
MAX_VM_CMD_PACKAGED_SIZE = 0xFFFFFFFF  #: bytes; the blob length is a be32
POSTCOPY_RAM_DISCARD_VERSION = 0
MAX_DISCARDS_PER_COMMAND = 12        #: ranges per POSTCOPY_RAM_DISCARD command
POSTCOPY_ADVISE_LEN = 16             #: be64 page-size summary + be64 TPS

# -- return path (spec 1.8, 2.9) ------------------------------------------------


class MigRpMsg(IntEnum):
    """Return-path message types (``be16 type``), destination to source."""

    MIG_RP_MSG_INVALID = 0
    MIG_RP_MSG_SHUT = 1
    MIG_RP_MSG_PONG = 2
    MIG_RP_MSG_REQ_PAGES_ID = 3
    MIG_RP_MSG_REQ_PAGES = 4
    MIG_RP_MSG_RECV_BITMAP = 5
    MIG_RP_MSG_RESUME_ACK = 6
    MIG_RP_MSG_SWITCHOVER_ACK = 7


MIG_RP_MSG_MAX = 8                   #: first message type the source refuses
MIG_RP_MSG_MAX_LEN = 512             #: bytes of payload the source accepts at most

#: Payload length of each return-path message, or None where it varies.
MIG_RP_MSG_LEN: dict[MigRpMsg, int | None] = {
    MigRpMsg.MIG_RP_MSG_SHUT: 4,
    MigRpMsg.MIG_RP_MSG_PONG: 4,
    MigRpMsg.MIG_RP_MSG_REQ_PAGES_ID: None,    # 13 + name length
    MigRpMsg.MIG_RP_MSG_REQ_PAGES: 12,
    MigRpMsg.MIG_RP_MSG_RECV_BITMAP: None,     # 1 + name length
    MigRpMsg.MIG_RP_MSG_RESUME_ACK: 4,
    MigRpMsg.MIG_RP_MSG_SWITCHOVER_ACK: 0,
}

RAMBLOCK_RECV_BITMAP_ENDING = 0x0123456789ABCDEF  #: end marker of the received bitmap

__all__ = [name for name in dir() if name.isupper() and not name.startswith("_")] + [
    "SectionType", "MigCmd", "MigRpMsg"]
