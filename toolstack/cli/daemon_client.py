"""The CLI's side of the control API: a blocking client of ferryd.

    with DaemonClient() as daemon:
        daemon.create(config=DomainConfig(name="vm1", memory_bytes=1 << 30))
        report = daemon.migrate(name="vm1", address="host-b:8002", watch=True)

One method per operation, generated from protocol/control_msgs.toml (the
stubs check nothing: the daemon checks every call and answers one line
when it refuses one).  Progress messages of a watched job go to
`on_progress`.  Every wait for the daemon has a deadline: a daemon that
sends nothing for `timeout` seconds (a watched job sends progress every
0.2 s) is taken for hung.
"""

from __future__ import annotations

import os
import socket

from hypervisor import ChannelClosed, RpcError, SyncChannel
from protocol import ProtocolError
from protocol import _gen_control_msgs as msgs

from ._gen_control_stubs import DaemonStubs

DEFAULT_SOCKET = "/run/ferry/control.sock"
SILENCE_TIMEOUT = 150.0  # s; above the longest single operation (a KVM guest check: 120 s)


def default_socket() -> str:
    return os.environ.get("FERRY_SOCKET") or DEFAULT_SOCKET


class DaemonError(Exception):
    """ferryd could not be reached, or answered with an error (one line)."""


class DaemonClient(DaemonStubs):
    def __init__(self, path: str | None = None, on_progress=None, timeout=SILENCE_TIMEOUT):
        self.path = path or default_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise DaemonError(
                f"cannot reach ferryd at {self.path} ({exc.strerror or exc}); is it running? "
                "(--connect or FERRY_SOCKET name another socket)"
            ) from None
        self.on_progress = on_progress
        channel = SyncChannel(
            sock,
            msgs.TABLE,
            sends=msgs.DIRECTION,
            receives=msgs.REVERSE_DIRECTION,
            on_call=self._notified,
        )
        super().__init__(_Calls(channel, timeout))

    def _notified(self, message) -> None:
        if isinstance(message, msgs.Progress) and self.on_progress is not None:
            self.on_progress(message.job)

    def close(self) -> None:
        self.channel.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Calls:
    """The channel under the stubs: its failures become one-line DaemonErrors."""

    def __init__(self, channel: SyncChannel, timeout: float) -> None:
        self.channel = channel
        self.timeout = timeout

    def call(self, message):
        try:
            return self.channel.call(message)
        except TimeoutError:
            raise DaemonError(f"ferryd sent nothing for {self.timeout:g} s") from None
        except OverflowError as exc:  # a number too large for its field's encoding
            raise DaemonError(
                f"{type(message).__name__.lower()}: a value is out of range ({exc})"
            ) from None
        except ChannelClosed:
            raise DaemonError("ferryd closed the connection") from None
        except RpcError as exc:
            # "migrate: <the daemon's line>": the operation is the user's own command
            text = str(exc).partition(": ")[2] or str(exc)
            raise DaemonError(text) from None
        except ProtocolError as exc:
            raise DaemonError(f"ferryd sent a bad reply: {exc}") from None
        except OSError as exc:
            raise DaemonError(f"lost the connection to ferryd ({exc.strerror or exc})") from None
