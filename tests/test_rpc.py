"""The generated RPC tables and the sans-IO RpcConnection."""

from __future__ import annotations

import msgpack
import pytest

from protocol import NEED_DATA, Call, ErrorReply, LocalProtocolError, RemoteProtocolError, Reply
from protocol import _gen_helper_msgs as hm
from protocol import _gen_runner_msgs as rm
from protocol.rpc import CALL, FRAME_HEADER, REPLY, RpcConnection

STATS = hm.PrecopyStats(2, 5000, 300, 100, 200, 409_600, 20_000_000, 262_144, 123_456_789, 100, 0)

HELPER_SAMPLES = {
    "log": hm.Log(3, -5, "save", "hello"),
    "progress": hm.Progress("save", "iteration 1", 10, 20),
    "suspend": hm.Suspend(),
    "postcopy": hm.Postcopy(),
    "checkpoint": hm.Checkpoint(),
    "wait_checkpoint": hm.WaitCheckpoint(),
    "switch_logdirty": hm.SwitchLogdirty(True),
    "static_data_done": hm.StaticDataDone(0),
    "restore_results": hm.RestoreResults(1, 2, 3),
    "complete": hm.Complete(0, 0, "", 0, 0),
    "precopy_policy": hm.PrecopyPolicy(STATS),
    "restore_progress": hm.RestoreProgress(1024, 4202496),
    "postcopy_transition": hm.PostcopyTransition(),
    "postcopy_progress": hm.PostcopyProgress(300, 200, 50, 1 << 20, [120, 900]),
    "start": hm.Start(),
}
HELPER_REPLIES = {
    "suspend": True,
    "postcopy": False,
    "checkpoint": 1,
    "wait_checkpoint": 0,
    "switch_logdirty": True,
    "static_data_done": 0,
    "precopy_policy": hm.PrecopyDecision.STOP_AND_COPY,
    "postcopy_transition": True,
    "start": True,
}
WORKLOAD = rm.Workload(1000.0, 0.5, 0.2, 7)
RUNNER_SAMPLES = {
    "getinfo": (
        rm.Getinfo(),
        rm.DomainInfo("vm", "sim", rm.DomainState.RUNNING, 256, WORKLOAD, 9, "", True),
    ),
    "pause": (rm.Pause(), None),
    "unpause": (rm.Unpause(), None),
    "logdirty_enable": (rm.LogdirtyEnable(), None),
    "logdirty_disable": (rm.LogdirtyDisable(), None),
    "logdirty_clean": (rm.LogdirtyClean(), rm.DirtyLog(3, b"\x07" + bytes(31))),
    "logdirty_peek": (rm.LogdirtyPeek(), rm.DirtyLog(0, bytes(32))),
    "get_context": (rm.GetContext(), b"blob"),
    "set_context": (rm.SetContext(b"blob"), None),
    "map_memory": (rm.MapMemory(), 256),
    "digest": (rm.Digest(), "ab" * 32),
    "destroy": (rm.Destroy(), None),
    "guest_check": (rm.GuestCheck(), "ok"),
    "postcopy_register": (rm.PostcopyRegister(), 1 << 40),
    "postcopy_done": (rm.PostcopyDone(), None),
    "postcopy_set": (rm.PostcopySet(b"\x0f" + bytes(31)), None),
    "postcopy_pending": (rm.PostcopyPending(), b"\x0f" + bytes(31)),
    "postcopy_mapped": (rm.PostcopyMapped(), b"\x03" + bytes(31)),
}


def pair(module):
    caller, callee = module.DIRECTION.split("->")
    a = RpcConnection(module.TABLE, sends=module.DIRECTION, receives=None)
    b = RpcConnection(module.TABLE, sends=None, receives=module.DIRECTION)
    return a, b


def round_trip(module, message, reply):
    a, b = pair(module)
    b.receive_data(a.send_call(message))
    event = b.next_event()
    assert event == Call(message)
    if message.SPEC.wants_reply:
        a.receive_data(b.send_reply(reply))
        assert a.next_event() == Reply(message.SPEC.id, reply)
    assert a.next_event() is NEED_DATA and b.next_event() is NEED_DATA


def test_every_helper_message_is_in_the_samples_and_round_trips():
    assert set(HELPER_SAMPLES) == {spec.name for spec in hm.TABLE.values()}
    for name, message in HELPER_SAMPLES.items():
        round_trip(hm, message, HELPER_REPLIES.get(name))


def test_every_runner_message_round_trips():
    assert set(RUNNER_SAMPLES) == {spec.name for spec in rm.TABLE.values()}
    for message, reply in RUNNER_SAMPLES.values():
        round_trip(rm, message, reply)


def test_message_ids_are_explicit_and_stable():
    # Renumbering would break helpers and toolstacks of different builds.
    assert hm.PrecopyPolicy.SPEC.id == 11 and hm.Log.SPEC.id == 1 and hm.Complete.SPEC.id == 10
    assert rm.MapMemory.SPEC.passes_fd and not rm.Digest.SPEC.passes_fd
    assert hm.PrecopyDecision.ABORT == -1 and hm.PrecopyDecision.POSTCOPY == 2


def test_frames_fed_one_byte_at_a_time():
    a, b = pair(hm)
    data = a.send_call(hm.PrecopyPolicy(STATS))
    for i in range(len(data) - 1):
        b.receive_data(data[i : i + 1])
        assert b.next_event() is NEED_DATA
    b.receive_data(data[-1:])
    assert b.next_event() == Call(hm.PrecopyPolicy(STATS))


def raw_frame(body) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return FRAME_HEADER.pack(len(packed)) + packed


@pytest.mark.parametrize(
    "frame, rule",
    [
        (raw_frame([CALL, 99, []]), "unknown message id 99"),
        (raw_frame([CALL, 11, [[1, 2]]]), "expected a list of 12 items"),
        (raw_frame([CALL, 11, [[-1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]]), "stats.iteration"),
        (raw_frame([CALL, 1, [3, 0, "c"]]), "expected a list of 4 items"),
        (raw_frame([CALL, 1, [256, 0, "c", "m"]]), "log.level"),
        (raw_frame([CALL, 1, [1, 0, b"bytes", "m"]]), "log.context"),
        (raw_frame([REPLY, 3, True]), "was not called"),
        (raw_frame([7, 3, True]), "frame kind 7"),
        (raw_frame({"a": 1}), "triple"),
        (FRAME_HEADER.pack(3) + b"\x93\x00\x01", "not valid msgpack"),
        (FRAME_HEADER.pack(2) + b"\x01\x02", "trailing bytes"),
        (FRAME_HEADER.pack(1 << 30), "above the limit"),
    ],
)
def test_toolstack_end_rejects_bad_frames_with_the_rule(frame, rule):
    _a, b = pair(hm)
    b.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match=rule):
        while b.next_event() is not NEED_DATA:
            pass


def test_wrong_direction_is_refused():
    a, b = pair(hm)
    # a call from the toolstack to the helper: no message goes that way
    a.receive_data(raw_frame([CALL, 3, []]))
    with pytest.raises(RemoteProtocolError, match="may not be sent to this end"):
        a.next_event()
    with pytest.raises(LocalProtocolError):
        b.send_call(hm.Suspend())


def test_reply_decoding_checks_the_type():
    a, b = pair(hm)
    b.receive_data(a.send_call(hm.PrecopyPolicy(STATS)))
    b.next_event()
    a.receive_data(raw_frame([REPLY, 11, 5]))
    with pytest.raises(RemoteProtocolError, match="is not a PrecopyDecision"):
        a.next_event()


def test_synchronous_rules():
    a, b = pair(hm)
    a.send_call(hm.Suspend())
    with pytest.raises(LocalProtocolError, match="awaits its reply"):
        a.send_call(hm.Suspend())
    with pytest.raises(LocalProtocolError, match="no call awaiting"):
        b.send_reply(True)


def test_error_reply():
    a, b = pair(rm)
    b.receive_data(a.send_call(rm.Digest()))
    b.next_event()
    a.receive_data(b.send_error("domain is running"))
    assert a.next_event() == ErrorReply(11, "domain is running")
