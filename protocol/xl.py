"""xl's save-file header: what makes a save image self-describing.

    magic            32 octets "Xen saved domain, xl format\\n \\0 \\r"
    byteorder        u32 0x01020304 in the writer's byte order
    mandatory_flags  u32: STREAMv2 (bit 1), JSON config (bit 0)
    optional_flags   u32
    optional_data_len u32
    optional data    u32 config_len, then the domain config (JSON)

After it comes the libxl-layer stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import limits
from .errors import RemoteProtocolError

MAGIC = b"Xen saved domain, xl format\n \0 \r"
assert len(MAGIC) == 32
BYTEORDER = 0x01020304
FLAG_JSON = 1 << 0
FLAG_STREAMV2 = 1 << 1
KNOWN_MANDATORY = FLAG_JSON | FLAG_STREAMV2
FIXED = struct.Struct("<32sIIII")
CONFIG_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class XlHeader:
    config: bytes  # the domain config as JSON
    mandatory_flags: int = FLAG_STREAMV2 | FLAG_JSON
    optional_flags: int = 0


def encode_header(config: bytes) -> bytes:
    flags = FLAG_STREAMV2 | (FLAG_JSON if config else 0)
    optional = CONFIG_LEN.pack(len(config)) + config
    return FIXED.pack(MAGIC, BYTEORDER, flags, 0, len(optional)) + optional


def header_length(fixed: bytes) -> int:
    """Total header length, from its first FIXED.size octets (checked)."""
    magic, byteorder, mandatory, _optional, opt_len = FIXED.unpack(fixed)
    if magic != MAGIC:
        raise RemoteProtocolError("xl header: not an xl save file (bad magic)", 0)
    if byteorder != BYTEORDER:
        raise RemoteProtocolError("xl header: byte order is not little-endian", 32)
    if mandatory & ~KNOWN_MANDATORY:
        unknown = mandatory & ~KNOWN_MANDATORY
        raise RemoteProtocolError(f"xl header: unsupported mandatory flags {unknown:#x}", 36)
    if not mandatory & FLAG_STREAMV2:
        raise RemoteProtocolError("xl header: legacy (pre-STREAMv2) images are not supported", 36)
    if opt_len > limits.MAX_XL_OPTIONAL_DATA:
        raise RemoteProtocolError(
            f"xl header: optional_data_len {opt_len} is above the limit of "
            f"{limits.MAX_XL_OPTIONAL_DATA}",
            44,
        )
    return FIXED.size + opt_len


def decode_header(raw: bytes) -> XlHeader:
    """Decode a complete header of `header_length()` octets."""
    _magic, _bo, mandatory, optional_flags, opt_len = FIXED.unpack_from(raw)
    optional = memoryview(raw)[FIXED.size : FIXED.size + opt_len]
    config = b""
    if mandatory & FLAG_JSON:
        if len(optional) < CONFIG_LEN.size:
            raise RemoteProtocolError("xl header: JSON flag set but no config length", FIXED.size)
        (config_len,) = CONFIG_LEN.unpack_from(optional)
        if config_len > len(optional) - CONFIG_LEN.size:
            raise RemoteProtocolError(
                f"xl header: config_len {config_len} exceeds the optional data", FIXED.size
            )
        config = bytes(optional[4 : 4 + config_len])
    return XlHeader(config, mandatory, optional_flags)
