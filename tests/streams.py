"""Builders of valid streams for tests (not a test module)."""

from __future__ import annotations

import json

import numpy as np

from protocol import RemoteProtocolError, StreamChecker, libxc, libxl, xl
from protocol.limits import PAGE_SIZE


def page(pfn: int, version: int = 1) -> bytes:
    return np.full(PAGE_SIZE // 8, (pfn << 32) | version, dtype="<u8").tobytes()


def libxc_stream(pfns=(0, 1, 2, 5), context=b"ctx-blob", extra=()) -> bytes:
    bufs = [libxc.encode_image_header(), libxc.encode_domain_header()]
    bufs += libxc.encode_marker(libxc.REC_STATIC_DATA_END)
    pfns = np.asarray(pfns, dtype=np.uint64)
    if len(pfns):
        bufs += libxc.encode_page_data(pfns, [page(int(p)) for p in pfns])
    for rec in extra:
        bufs += rec
    bufs += libxc.encode_tsc_info(libxc.TscInfo(1, 2_000_000, 123, 4))
    bufs += libxc.encode_hvm_context(context)
    bufs += libxc.encode_hvm_params([(2, 0xFEFFF), (1, 7)])
    bufs += libxc.encode_marker(libxc.REC_END)
    return b"".join(bytes(b) for b in bufs)


def libxl_stream(inner: bytes | None = None) -> bytes:
    inner = libxc_stream() if inner is None else inner
    return b"".join(
        [
            libxl.encode_header(),
            libxl.encode_libxc_context(),
            inner,
            libxl.encode_emulator_context(libxl.EmulatorContext(2, 0, b"qemu-state")),
            libxl.encode_end(),
        ]
    )


def save_file(config: dict | None = None, stream: bytes | None = None) -> bytes:
    config = {"name": "vm1", "memory_bytes": 1 << 20} if config is None else config
    return xl.encode_header(json.dumps(config).encode()) + libxl_stream(stream)


def check_stream(data: bytes, fmt: str | None, chunk: int, max_pfns: int = 64) -> None:
    """Feed `data` to a StreamChecker `chunk` octets at a time: it may refuse
    the stream (RemoteProtocolError), and must raise nothing else."""
    checker = StreamChecker(fmt, max_pfns=max_pfns)
    try:
        for i in range(0, len(data), chunk):
            checker.feed(data[i : i + chunk])
        checker.finish()
    except RemoteProtocolError:
        pass
