"""Hand-driven migration peers for tests (not a test module): a blocking
socket speaking the handshake through protocol.handshake, so a test can
play a hostile sender or a lying destination one frame at a time."""

from __future__ import annotations

import socket

from protocol import NEED_DATA, auth
from protocol import _gen_migration_msgs as msgs
from protocol.handshake import RECEIVER, SENDER, VERSION, Handshake
from protocol.rpc import ErrorReply

TIMEOUT = 15.0


class Peer:
    def __init__(self, sock: socket.socket, role: str) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.handshake = Handshake(role)

    @classmethod
    def connect(cls, port: int) -> Peer:
        return cls(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT), SENDER)

    def next_event(self):
        while (event := self.handshake.next_event()) is NEED_DATA:
            data = self.sock.recv(self.handshake.wanted)
            if not data:
                raise EOFError("the peer closed the connection")
            self.handshake.receive_data(data)
        return event

    def call(self, message):
        """Send a call; the reply's value, or the ErrorReply itself."""
        self.sock.sendall(self.handshake.send_call(message))
        event = self.next_event()
        return event if isinstance(event, ErrorReply) else event.value

    def answer(self, value=None) -> None:
        self.sock.sendall(self.handshake.send_reply(value))

    def authenticate(self, key: bytes):
        nonce = auth.new_nonce()
        challenge = self.call(msgs.Hello(version=VERSION, nonce=nonce))
        assert auth.verify(key, b"server", nonce, challenge.nonce, challenge.proof)
        return self.call(msgs.Prove(proof=auth.proof(key, b"client", nonce, challenge.nonce)))

    def close(self) -> None:
        self.sock.close()


def serve_as_destination(listener: socket.socket, key: bytes) -> Peer:
    """Accept one sender and authenticate it like a real receiver would."""
    conn, _ = listener.accept()
    peer = Peer(conn, RECEIVER)
    hello = peer.next_event().message
    server_nonce = auth.new_nonce()
    peer.answer(
        msgs.Challenge(
            nonce=server_nonce, proof=auth.proof(key, b"server", hello.nonce, server_nonce)
        )
    )
    peer.next_event()
    peer.answer()
    return peer
