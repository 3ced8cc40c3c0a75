"""The migration handshake's state machine (protocol/handshake.py): the order
of messages, on both ends, and hostile sequences."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA, LocalProtocolError, RemoteProtocolError
from protocol import _gen_migration_msgs as msgs
from protocol._gen_control_msgs import DomainConfig
from protocol.handshake import (
    ACCEPTED,
    AUTHENTICATED,
    CLOSED,
    POSTCOPY,
    READY,
    RECEIVER,
    RUNNING,
    SENDER,
    STREAMING,
    TRANSITIONS,
    Handshake,
)
from protocol.rpc import Call, ErrorReply, Reply, RpcConnection

CONFIG = DomainConfig(name="vm1", memory_bytes=1 << 20)
CALLS = {
    "hello": msgs.Hello(version=2, nonce=b"n" * 32),
    "prove": msgs.Prove(proof=b"p" * 32),
    "migrate": msgs.Migrate(config=CONFIG, migration_id="a" * 32),
    "stream": msgs.Stream(),
    "go": msgs.Go(),
    "whereabouts": msgs.Whereabouts(name="vm1", migration_id="b" * 32),
    "finish": msgs.Finish(),
    "resume": msgs.Resume(name="vm1", migration_id="c" * 32),
}
REPLIES = {
    "hello": msgs.Challenge(nonce=b"s" * 32, proof=b"q" * 32),
    "prove": None,
    "migrate": msgs.Accepted(),
    "stream": msgs.Ready(),
    "go": None,
    "whereabouts": msgs.Location(state="absent"),
    "finish": msgs.Finished(requested=0),
    "resume": None,
}


def deliver(data: bytes, to: Handshake):
    to.receive_data(data)
    return to.next_event()


def exchange(sender: Handshake, receiver: Handshake, name: str) -> None:
    event = deliver(sender.send_call(CALLS[name]), receiver)
    assert isinstance(event, Call) and event.message.SPEC.name == name
    reply = deliver(receiver.send_reply(REPLIES[name]), sender)
    assert isinstance(reply, Reply)


def test_a_whole_migration_moves_both_ends_through_the_same_states():
    s, r = Handshake(SENDER), Handshake(RECEIVER)
    exchange(s, r, "hello")
    exchange(s, r, "prove")
    assert s.state == r.state == AUTHENTICATED and s.authenticated and r.authenticated
    exchange(s, r, "migrate")
    assert s.state == r.state == ACCEPTED
    deliver(s.send_call(CALLS["stream"]), r)
    assert s.state == r.state == STREAMING
    with pytest.raises(LocalProtocolError, match="stream octets are not frames"):
        r.receive_data(b"\0" * 8)  # the stream is not read through the handshake
    assert isinstance(deliver(r.send_reply(REPLIES["stream"]), s), Reply)
    assert s.state == r.state == READY
    exchange(s, r, "go")
    assert s.state == r.state == RUNNING


@pytest.mark.parametrize("state_calls", [[], ["hello"], ["hello", "prove"]])
def test_every_call_out_of_order_is_refused_by_the_receiver(state_calls):
    allowed_after = TRANSITIONS[[("start"), "challenged", "authenticated"][len(state_calls)]]
    for name in CALLS:
        if name in allowed_after:
            continue
        s, r = Handshake(SENDER), Handshake(RECEIVER)
        for done in state_calls:
            exchange(s, r, done)
        raw = RpcConnection(msgs.TABLE, sends=msgs.DIRECTION, receives=None)
        with pytest.raises(RemoteProtocolError, match=f"{name} is not allowed in state"):
            deliver(raw.send_call(CALLS[name]), r)


def test_the_sender_cannot_send_out_of_order_either():
    s = Handshake(SENDER)
    with pytest.raises(LocalProtocolError, match="migrate is not allowed in state start"):
        s.send_call(CALLS["migrate"])
    s.send_call(CALLS["hello"])
    with pytest.raises(LocalProtocolError, match="expected: the reply to hello"):
        s.send_call(CALLS["prove"])


def test_an_error_reply_closes_the_handshake():
    s, r = Handshake(SENDER), Handshake(RECEIVER)
    deliver(s.send_call(CALLS["hello"]), r)
    event = deliver(r.send_error("authentication failed"), s)
    assert isinstance(event, ErrorReply) and event.text == "authentication failed"
    assert s.state == r.state == CLOSED
    with pytest.raises(RemoteProtocolError, match="handshake is over"):
        s.next_event()


def test_a_frame_above_the_handshake_limit_is_refused_before_it_is_buffered():
    r = Handshake(RECEIVER)
    r.receive_data((1 << 20).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="above the limit of 65536"):
        r.next_event()


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(CALLS)), max_size=8))
def test_random_call_orders_are_followed_or_refused(names):
    """A receiver answers every call it accepts; the first out of order is refused
    with the rule, and the accepted ones follow the state table."""
    r = Handshake(RECEIVER)
    raw = RpcConnection(msgs.TABLE, sends=msgs.DIRECTION, receives=None)
    expected = "start"
    for name in names:
        frame = raw.send_call(CALLS[name])
        allowed = TRANSITIONS.get(expected, {})
        if name not in allowed:
            refusal = "is not allowed in state|the handshake is over"
            with pytest.raises(RemoteProtocolError, match=refusal):
                deliver(frame, r)
            return
        event = deliver(frame, r)
        assert isinstance(event, Call)
        raw.receive_data(r.send_reply(REPLIES[name]))
        assert raw.next_event() is not NEED_DATA
        expected = allowed[name][1]
        assert r.state == expected


def test_a_postcopy_ready_leads_to_postcopy_and_finish():
    s, r = Handshake(SENDER), Handshake(RECEIVER)
    for name in ("hello", "prove", "migrate"):
        exchange(s, r, name)
    deliver(s.send_call(CALLS["stream"]), r)
    deliver(r.send_reply(msgs.Ready(postcopy=True)), s)
    exchange(s, r, "go")
    assert s.state == r.state == POSTCOPY
    exchange(s, r, "finish")
    assert s.state == r.state == CLOSED
    # without postcopy, finish is not a step
    s, r = Handshake(SENDER), Handshake(RECEIVER)
    for name in ("hello", "prove", "migrate", "stream", "go"):
        exchange(s, r, name)
    with pytest.raises(LocalProtocolError, match="finish is not allowed in state running"):
        s.send_call(CALLS["finish"])
