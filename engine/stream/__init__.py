"""QEMU's migration stream as a sans-I/O codec: constants, vmstate, events, encoder,
decoder, return path and the VMDESCRIPTION trailer.  No sockets here: bytes in,
events out, and back.
"""
from . import constants, encoder
from .constants import *  # noqa: F401,F403  (QEMU's names, listed in constants.__all__)
from .decoder import StreamDecoder, parse_config_capabilities
from .events import *  # noqa: F401,F403
from .events import __all__ as _events_all
from .returnpath import (
    Pong, ReceivedBitmap, RecvBitmapMsg, ReqPages, ResumeAck, ReturnPathDecoder, RpEvent,
    Shut, SwitchoverAck, bitmap_bits, decode_recv_bitmap, encode_recv_bitmap,
    recv_bitmap_size, rp_pong, rp_recv_bitmap, rp_req_pages, rp_req_pages_id,
    rp_resume_ack, rp_shut, rp_switchover_ack,
)
from .encoder import RamRecordEncoder
from .vmdesc import build_vmdesc, describe_device
from .vmstate import Field, NeedData, Subsection, VMStateDescription, present

__all__ = (
    ["constants", "encoder", "StreamDecoder", "parse_config_capabilities",
     "RamRecordEncoder", "build_vmdesc", "describe_device",
     "Field", "NeedData", "Subsection", "VMStateDescription", "present",
     "Pong", "ReceivedBitmap", "RecvBitmapMsg", "ReqPages", "ResumeAck",
     "ReturnPathDecoder", "RpEvent", "Shut", "SwitchoverAck", "bitmap_bits",
     "decode_recv_bitmap", "encode_recv_bitmap", "recv_bitmap_size", "rp_pong",
     "rp_recv_bitmap", "rp_req_pages", "rp_req_pages_id", "rp_resume_ack", "rp_shut",
     "rp_switchover_ack"]
    + list(constants.__all__) + list(_events_all)
)
