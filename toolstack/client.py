"""The CLI's side of the control API: a blocking client of ferryd."""

from __future__ import annotations

import os
import socket

from protocol import ProtocolError
from protocol.control import HEADER_SIZE, body_length, decode_body, encode_frame

DEFAULT_SOCKET = "/run/ferry/control.sock"


def default_socket() -> str:
    return os.environ.get("FERRY_SOCKET") or DEFAULT_SOCKET


class DaemonError(Exception):
    """ferryd could not be reached, or answered with an error."""


class DaemonClient:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise DaemonError(
                f"cannot reach ferryd at {self.path} ({exc.strerror}); is it running? "
                "(--connect or FERRY_SOCKET name another socket)"
            ) from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, op: str, on_progress=None, **args) -> dict:
        """Send one request; progress frames go to `on_progress`; the reply's
        fields come back, or DaemonError with the daemon's one-line error."""
        self.sock.sendall(encode_frame({"op": op, **args}))
        while True:
            reply = self._read_frame()
            if "progress" in reply:
                if on_progress:
                    on_progress(reply["progress"])
                continue
            if not reply.get("ok"):
                raise DaemonError(str(reply.get("error", "the daemon failed without a reason")))
            return reply

    def _read_frame(self) -> dict:
        try:
            length = body_length(self._read_exact(HEADER_SIZE))
            return decode_body(self._read_exact(length))
        except ProtocolError as exc:
            raise DaemonError(f"ferryd sent a bad reply: {exc}") from None

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise DaemonError("ferryd closed the connection")
            data += chunk
        return data
