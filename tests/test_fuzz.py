"""Random and mutated bytes into every decoder that reads another process's
or host's bytes: only the documented error type may come out, quickly."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA, RemoteProtocolError, RpcConnection
from protocol import _gen_helper_msgs as hm
from protocol import _gen_runner_msgs as rm
from tests.streams import check_stream, libxc_stream, save_file

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
VALID = {"libxc": libxc_stream(), "xl": save_file()}


@FUZZ
@given(
    st.binary(max_size=2048), st.sampled_from([None, "xl", "libxl", "libxc"]), st.integers(1, 64)
)
def test_random_bytes_into_stream_decoders(data, fmt, chunk):
    check_stream(data, fmt, chunk)


@st.composite
def mutated(draw, base: bytes):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set32", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if not data:
            op = "insert"
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set32":
            value = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 1024, 1025, 4096]))
            data[pos : pos + 4] = value.to_bytes(4, "little")
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@FUZZ
@given(st.sampled_from(sorted(VALID)).flatmap(lambda k: mutated(VALID[k])), st.integers(1, 5000))
def test_mutated_valid_streams(stream, chunk):
    check_stream(stream, None, chunk)


def test_a_huge_length_field_allocates_nothing_large():
    # body_length 0xFFFFFFF0 on a PAGE_DATA record: refused before buffering.
    base = libxc_stream()
    evil = base[:48] + (1).to_bytes(4, "little") + (0xFFFFFFF0).to_bytes(4, "little")
    tracemalloc.start()
    check_stream(evil + bytes(64), "libxc", 16)
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def drain(conn: RpcConnection) -> None:
    try:
        while conn.next_event() is not NEED_DATA:
            pass
    except RemoteProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=512), st.sampled_from([hm, rm]))
def test_random_bytes_into_rpc_decoder(data, module):
    conn = RpcConnection(module.TABLE, sends=None, receives=module.DIRECTION)
    conn.receive_data(data)
    drain(conn)


@FUZZ
@given(st.data())
def test_mutated_rpc_frames(data):
    sender = RpcConnection(hm.TABLE, sends=hm.DIRECTION, receives=None)
    stats = hm.PrecopyStats(1, 2, -1, 3, 4, 5, 6, 7, 8, 0, 0)
    frame = sender.send_call(hm.PrecopyPolicy(stats)) + RpcConnection(
        hm.TABLE, sends=hm.DIRECTION, receives=None
    ).send_call(hm.Log(1, 0, "ctx", "msg"))
    conn = RpcConnection(hm.TABLE, sends=None, receives=hm.DIRECTION)
    conn.receive_data(data.draw(mutated(frame)))
    drain(conn)


def control_daemon_side() -> RpcConnection:
    from protocol import _gen_control_msgs as cm

    return RpcConnection(cm.TABLE, sends=cm.REVERSE_DIRECTION, receives=cm.DIRECTION)


def valid_control_frames() -> bytes:
    from protocol import _gen_control_msgs as cm

    config = cm.DomainConfig(name="vm1", memory_bytes=1 << 20, dirty_rate=10.0)
    frames = b""
    for message in (
        cm.Create(config=config, paused=True),
        cm.Migrate(name="vm1", address="h:1", settings={"downtime_limit": 5, "fallback": "abort"}),
        cm.JobControl(name="vm1", action="set", key="k", value="v"),
    ):
        frames += RpcConnection(cm.TABLE, sends=cm.DIRECTION, receives=None).send_call(message)
    return frames


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_into_the_control_api(data):
    conn = control_daemon_side()
    conn.receive_data(data)
    drain(conn)


@FUZZ
@given(st.data())
def test_mutated_control_calls(data):
    conn = control_daemon_side()
    conn.receive_data(data.draw(mutated(valid_control_frames())))
    drain(conn)


@FUZZ
@given(st.integers(1, 120), st.dictionaries(st.text(max_size=12), st.deferred(lambda: JSON_VALUES)))
def test_random_arguments_to_every_control_operation(msg_id, args):
    """Any map as any operation's arguments: decoded, or refused in one line."""
    from protocol import _gen_control_msgs as cm

    spec = cm.TABLE.get(msg_id)
    if spec is None:
        return
    try:
        spec.model.from_args(args)
    except RemoteProtocolError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_random_frames_into_the_handshake_receiver(chunks):
    from protocol.handshake import RECEIVER, Handshake

    conn = Handshake(RECEIVER)
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while conn.next_event() is not NEED_DATA:
                pass
    except RemoteProtocolError:
        pass


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)


@FUZZ
@given(JSON_VALUES, st.binary(max_size=64))
def test_hostile_domain_configs_get_one_clear_error(value, raw):
    import json

    from toolstack.host import ToolstackError, config_from_json

    for text in (json.dumps(value), raw):
        try:
            config_from_json(text)
        except ToolstackError as exc:
            assert str(exc).startswith("bad domain config")


def test_valid_config_fields_are_checked():
    from toolstack.host import ToolstackError, config_from_json

    ok = config_from_json('{"name": "vm", "memory_bytes": 4096}')
    assert ok.backend == "sim"
    for bad in (
        '{"name": "../etc", "memory_bytes": 4096}',
        '{"name": "vm", "memory_bytes": 4097}',
        '{"name": "vm", "memory_bytes": 4096, "backend": "xen"}',
        '{"name": "vm", "memory_bytes": 4096, "surprise": 1}',
        '{"name": "vm", "memory_bytes": 4096, "working_set": 2}',
    ):
        with pytest.raises(ToolstackError, match="bad domain config"):
            config_from_json(bad)
