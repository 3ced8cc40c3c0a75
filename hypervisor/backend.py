"""What a domain runner needs from a guest backend (sim or kvm).

The runner owns the state machine (running, paused, incoming) and the
control socket; a backend owns the guest: the code that writes to RAM and
the dirty log of those writes.  `lock` is held by the backend around every
guest write and by the runner around pause and log-dirty calls, which is
what makes `pause` final and `logdirty_clean` atomic with guest writes.
"""

from __future__ import annotations

from typing import Protocol

import msgpack

from .memory import GuestMemory


class Backend(Protocol):
    name: str
    memory: GuestMemory

    def start(self, incoming: bool) -> None:
        """Run the guest (after set_context when `incoming`)."""

    def stop(self) -> None:
        """Stop the guest; when this returns, it writes nothing more."""

    def logdirty(self, enable: bool) -> None: ...

    def dirty_bitmap(self, clear: bool) -> tuple[int, bytes]:
        """(count, little-endian bitmap) of pages written since the last clear."""

    def get_context(self) -> bytes: ...

    def set_context(self, blob: bytes) -> None: ...

    def writes(self) -> int:
        """The guest's progress counter: page writes made so far."""

    def guest_check(self) -> str:
        """The guest's verification of its own pages: 'ok' or what failed."""

    def close(self) -> None: ...


class BackendError(Exception):
    """A request the backend cannot carry out (answered as an RPC error)."""


MAX_CONTEXT = 64 << 10  # octets: a vCPU or workload context is a few hundred


def unpack_context(blob: bytes, what: str):
    """A context blob from a stream: bounded, plain msgpack, or BackendError."""
    if len(blob) > MAX_CONTEXT:
        raise BackendError(f"{what} context of {len(blob)} octets is above {MAX_CONTEXT}")
    try:
        return msgpack.unpackb(
            blob,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_CONTEXT,
            max_str_len=1024,
            max_array_len=64,
            max_map_len=64,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise BackendError(f"not a {what} context: {exc}") from None
