"""Hand-driven migration peers for tests (not a test module): a blocking
socket speaking the handshake through protocol.handshake, so a test can
play a hostile sender or a lying destination one frame at a time."""

from __future__ import annotations

import secrets
import socket

import numpy as np

from protocol import NEED_DATA, auth, libxc, libxl
from protocol import _gen_migration_msgs as msgs
from protocol.handshake import RECEIVER, SENDER, VERSION, Handshake
from protocol.limits import PAGE_SIZE
from protocol.postcopy import ForwardRules
from protocol.rpc import ErrorReply
from tests.streams import page

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


# -- a postcopy destination played by hand -----------------------------------------
LIBXL_PREFIX = libxl.HEADER.size + 8  # the libxl header and LIBXC_CONTEXT's record header


def recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError(f"the peer closed the connection ({got} of {n} octets)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class ForwardStream:
    """The source's libxl stream as a destination reads it: never an octet past
    what the next record needs (handshake frames come in between), every octet
    kept in `captured` (a libxl stream once read to its end), the order checked
    by the same ForwardRules the restore helper uses."""

    def __init__(self, sock: socket.socket, pages: int) -> None:
        self.sock = sock
        self.captured = bytearray(recv_exact(sock, LIBXL_PREFIX))
        self.decoder = libxc.LibxcDecoder(max_pfns=pages, start_offset=LIBXL_PREFIX)
        self.rules = ForwardRules()
        self.page_records: list[tuple[int, int]] = []  # POSTCOPY_PAGE_DATA: (start, end)

    def _read(self, n: int) -> bytes:
        data = recv_exact(self.sock, n)
        self.captured += data
        return data

    def next_event(self):
        start = len(self.captured)
        while (event := self.decoder.next_event()) is NEED_DATA:
            self.decoder.feed(self._read(self.decoder.wanted))
        self.rules.event(event, start)
        if isinstance(event, libxc.PageData) and event.postcopy:
            self.page_records.append((start, len(self.captured)))
        return event

    def until(self, rtype: int) -> None:
        """Read records up to and including the marker `rtype`."""
        while True:
            event = self.next_event()
            if isinstance(event, libxc.Marker) and event.type == rtype:
                return

    def libxl_tail(self) -> None:
        """The libxl records after the libxc END, up to the libxl END."""
        decoder = libxl.LibxlDecoder(inner=False, expect_header=False)
        while not isinstance(event := decoder.next_event(), libxl.LibxlEnd):
            if event is NEED_DATA:
                decoder.feed(self._read(decoder.wanted))


def play_postcopy_destination(listener: socket.socket, key: bytes) -> tuple[Peer, ForwardStream]:
    """Take a sender's migration up to the switch, as a real receiver would:
    accept it with postcopy, read its stream to POSTCOPY_TRANSITION, answer
    Ready(postcopy=True), answer its go.  From here the raw stream runs both
    ways: POSTCOPY_PAGE_DATA in (`stream`), POSTCOPY_FAULT records out."""
    peer = serve_as_destination(listener, key)
    try:
        request = peer.next_event().message
        peer.answer(msgs.Accepted(postcopy=True))
        peer.next_event()  # stream
        stream = ForwardStream(peer.sock, request.config.memory_bytes // PAGE_SIZE)
        stream.until(libxc.REC_POSTCOPY_TRANSITION)
        peer.answer(msgs.Ready(postcopy=True))
        peer.next_event()  # go
        peer.answer()
    except BaseException:
        peer.close()
        raise
    return peer, stream


def raw(bufs) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def fault_record(pfns) -> bytes:
    """A raw POSTCOPY_FAULT record (destination -> source) asking for `pfns`."""
    return raw(libxc.encode_pfn_list(pfns, fault=True))


def play_postcopy_source(port: int, key: bytes, config, precopy, pset, context: bytes) -> Peer:
    """Migrate `config` to the daemon on `port` as a sender would, up to the
    switch: precopy's pages (`precopy`, each page(pfn) of tests/streams.py),
    POSTCOPY_BEGIN, the vCPU `context`, the set `pset`, TRANSITION; Ready
    (postcopy) awaited, go sent and answered.  The raw stream runs both ways
    from here (POSTCOPY_PAGE_DATA out, the destination's records in)."""
    peer = Peer.connect(port)
    try:
        peer.authenticate(key)
        accepted = peer.call(
            msgs.Migrate(config=config, migration_id=secrets.token_hex(16), postcopy=True)
        )
        assert isinstance(accepted, msgs.Accepted) and accepted.postcopy, accepted
        peer.sock.sendall(peer.handshake.send_call(msgs.Stream()))
        stream = [libxl.encode_header(), libxl.encode_libxc_context()]
        stream += [libxc.encode_image_header(), libxc.encode_domain_header()]
        stream.append(raw(libxc.encode_marker(libxc.REC_STATIC_DATA_END)))
        if len(precopy):
            pfns = np.asarray(precopy, np.uint64)
            stream.append(raw(libxc.encode_page_data(pfns, [page(int(p)) for p in pfns])))
        stream.append(raw(libxc.encode_marker(libxc.REC_POSTCOPY_BEGIN)))
        stream.append(raw(libxc.encode_tsc_info(libxc.TscInfo())))
        stream.append(raw(libxc.encode_hvm_context(context)))
        stream.append(raw(libxc.encode_hvm_params([])))
        stream.append(raw(libxc.encode_marker(libxc.REC_POSTCOPY_PFNS_BEGIN)))
        stream.append(raw(libxc.encode_pfn_list(np.asarray(pset, np.uint64))))
        stream.append(raw(libxc.encode_marker(libxc.REC_POSTCOPY_TRANSITION)))
        peer.sock.sendall(b"".join(stream))
        ready = peer.next_event()
        assert getattr(ready, "value", None) == msgs.Ready(postcopy=True), ready
        assert peer.call(msgs.Go()) is None
    except BaseException:
        peer.close()
        raise
    return peer
