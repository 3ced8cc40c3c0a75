"""The migration handshake between two daemons: which message may come when.

The messages and their shapes are generated from `migration_msgs.toml`; this
module owns their order.  Both ends keep the same state, moved by the same
table: the sender's calls and the receiver's replies.  As in h11, a message
that breaks the order is refused with the rule it broke, whichever side
tried it (`LocalProtocolError` for our own bug, `RemoteProtocolError` for
the peer's).

    state           sender's call   while it waits   after the reply
    start           hello           -                challenged
    challenged      prove           -                authenticated
    authenticated   migrate         -                accepted
    authenticated   whereabouts     -                closed
    authenticated   resume          -                postcopy
    authenticated   join            -                pages
    accepted        stream          streaming        ready
    ready           go              -                running, or postcopy
    postcopy        finish          postcopy         closed

A `join`ed connection is an extra one of a migration already accepted on
another: in `pages` it carries raw precopy page records only, no frames.
In `streaming` the migration stream travels as raw octets after the
`stream` frame; no frame may come until the receiver has consumed it and
replies.  A `Ready` that says postcopy was sent at the stream's
POSTCOPY_TRANSITION: after `go` the raw stream goes on, both ways (pages
one way, faults the other), until the sender's `finish`.  An error reply,
from any state, ends in `closed`.
"""

from __future__ import annotations

from . import _gen_migration_msgs as msgs
from . import limits
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import NEED_DATA, NeedData
from .rpc import Call, ErrorReply, Reply, RpcConnection

VERSION = 2

START = "start"
CHALLENGED = "challenged"
AUTHENTICATED = "authenticated"
ACCEPTED = "accepted"
STREAMING = "streaming"
READY = "ready"
RUNNING = "running"
POSTCOPY = "postcopy"
PAGES = "pages"
CLOSED = "closed"

# state -> {call: (state while its reply is awaited, state after the reply)}
TRANSITIONS: dict[str, dict[str, tuple[str, str]]] = {
    START: {"hello": (START, CHALLENGED)},
    CHALLENGED: {"prove": (CHALLENGED, AUTHENTICATED)},
    AUTHENTICATED: {
        "migrate": (AUTHENTICATED, ACCEPTED),
        "whereabouts": (AUTHENTICATED, CLOSED),
        "resume": (AUTHENTICATED, POSTCOPY),
        "join": (AUTHENTICATED, PAGES),
    },
    ACCEPTED: {"stream": (STREAMING, READY)},
    READY: {"go": (READY, RUNNING)},  # POSTCOPY instead after a postcopy Ready
    POSTCOPY: {"finish": (POSTCOPY, CLOSED)},
}
AUTHENTICATED_STATES = (AUTHENTICATED, ACCEPTED, STREAMING, READY, RUNNING, POSTCOPY, PAGES)

SENDER, RECEIVER = "sender", "receiver"


class Handshake:
    """One end of a migration connection: `role` is SENDER or RECEIVER.

    Bytes in with `receive_data()`, events out with `next_event()`; frames
    out with `send_call()` (sender) or `send_reply()`/`send_error()`
    (receiver).  `wanted` is the exact number of octets the next frame
    still needs, so a reader never takes stream octets that follow it."""

    def __init__(self, role: str) -> None:
        if role not in (SENDER, RECEIVER):
            raise LocalProtocolError(f"role is {SENDER} or {RECEIVER}, not {role!r}")
        self.role = role
        self.state = START
        self._pending: str | None = None  # the call whose reply is awaited
        self._after = START  # the state its reply leads to
        self.postcopy = False  # the receiver's Ready said postcopy
        sends, receives = (msgs.DIRECTION, None) if role == SENDER else (None, msgs.DIRECTION)
        self._rpc = RpcConnection(msgs.TABLE, sends, receives, limits.MAX_HANDSHAKE_FRAME)

    @property
    def authenticated(self) -> bool:
        return self.state in AUTHENTICATED_STATES

    @property
    def wanted(self) -> int:
        return self._rpc.wanted

    # -- the sender's side ---------------------------------------------------
    def send_call(self, message) -> bytes:
        if self.role != SENDER:
            raise LocalProtocolError("only the sender sends calls")
        self._enter(message.SPEC.name, LocalProtocolError)
        return self._rpc.send_call(message)

    # -- the receiver's side ---------------------------------------------------
    def send_reply(self, value=None) -> bytes:
        data = self._rpc.send_reply(value)
        self._leave(value)
        return data

    def send_error(self, text: str) -> bytes:
        data = self._rpc.send_error(text)
        self.state, self._pending = CLOSED, None
        return data

    def send_protocol_error(self, error: RemoteProtocolError) -> bytes:
        """The frame that tells the peer which rule it broke; the handshake ends."""
        self.state, self._pending = CLOSED, None
        return self._rpc.send_protocol_error(error)

    # -- either side -------------------------------------------------------------
    def receive_data(self, data) -> None:
        if self.state in (STREAMING, PAGES) and self.role == RECEIVER:
            raise LocalProtocolError("stream octets are not frames: read them elsewhere")
        self._rpc.receive_data(data)

    def next_event(self) -> Call | Reply | ErrorReply | NeedData:
        if self.state == CLOSED:
            raise RemoteProtocolError("the handshake is over: no more frames")
        event = self._rpc.next_event()
        if event is NEED_DATA:
            return event
        if isinstance(event, Call):
            self._enter(event.message.SPEC.name, RemoteProtocolError)
        elif isinstance(event, ErrorReply):
            self.state, self._pending = CLOSED, None
        else:
            self._leave(event.value)
        return event

    def _enter(self, name: str, error: type) -> None:
        allowed = TRANSITIONS.get(self.state, {})
        if self._pending is not None or name not in allowed:
            expected = f"the reply to {self._pending}" if self._pending else ", ".join(allowed)
            raise error(
                f"{name} is not allowed in state {self.state} (expected: {expected or 'nothing'})"
            )
        self._pending = name
        self.state, self._after = allowed[name]

    def _leave(self, value) -> None:
        if isinstance(value, msgs.Ready):
            self.postcopy = value.postcopy
        after = self._after
        if after == RUNNING and self.postcopy:
            after = POSTCOPY
        self.state, self._pending = after, None
