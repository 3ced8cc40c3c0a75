"""The control API refuses what its schema does not allow, in one line that
names it, and keeps serving; nothing is silently dropped."""

from __future__ import annotations

import socket

import msgpack
import pytest

from protocol import _gen_control_msgs as cm
from protocol.rpc import CALL, ERROR, FRAME_HEADER, REPLY


def frame(body) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return FRAME_HEADER.pack(len(packed)) + packed


def read_frame(sock) -> list:
    header = sock.recv(4, socket.MSG_WAITALL)
    (length,) = FRAME_HEADER.unpack(header)
    return msgpack.unpackb(sock.recv(length, socket.MSG_WAITALL), raw=False)


@pytest.fixture
def control(cluster):
    daemon = cluster.daemon("a", listen=False)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(15)
    sock.connect(daemon.socket)
    yield sock
    sock.close()


CONFIG = {"name": "vm1", "memory_bytes": 1 << 20}


@pytest.mark.parametrize(
    "body, says",
    [
        ([CALL, 999, {}], "unknown message id 999"),
        (
            [CALL, cm.Create.SPEC.id, {"config": CONFIG, "pasued": True}],
            "create: unknown field 'pasued'",
        ),
        ([CALL, cm.Create.SPEC.id, {"paused": True}], "create: missing field 'config'"),
        (
            [CALL, cm.Create.SPEC.id, {"config": CONFIG, "paused": "yes"}],
            "create.paused: expected a boolean",
        ),
        (
            [CALL, cm.Create.SPEC.id, {"config": {**CONFIG, "memory_bytes": "1G"}}],
            "create.config.memory_bytes: expected an integer",
        ),
        (
            [CALL, cm.Migrate.SPEC.id, {"name": "vm1", "address": "h:1", "downtime_limit": 20}],
            "migrate: unknown field 'downtime_limit'",
        ),
        (
            [CALL, cm.Migrate.SPEC.id, {"name": "vm1", "address": "h:1", "settings": [1]}],
            "migrate.settings: expected a map",
        ),
        ([CALL, cm.Create.SPEC.id, [CONFIG]], "create: expected a map"),
        ([CALL, cm.Progress.SPEC.id, {"job": {}}], "progress goes daemon->client"),
        ([REPLY, cm.List.SPEC.id, []], "reply to list, which was not called"),
        ("junk", "not a [kind, id, payload] triple"),
    ],
)
def test_bad_calls_are_refused_by_name_and_the_daemon_serves_on(control, body, says):
    control.sendall(frame(body))
    kind, msg_id, text = read_frame(control)
    assert kind == ERROR and says in text, text
    assert "\n" not in text
    # the same connection still works
    control.sendall(frame([CALL, cm.List.SPEC.id, {}]))
    assert read_frame(control) == [REPLY, cm.List.SPEC.id, []]


def test_a_frame_length_above_the_limit_ends_the_connection(control):
    control.sendall((1 << 30).to_bytes(4, "big"))
    kind, _id, text = read_frame(control)
    assert kind == ERROR and "above the limit" in text
    assert control.recv(1) == b""


def test_an_operations_own_failure_is_one_line(control):
    control.sendall(frame([CALL, cm.Pause.SPEC.id, {"name": "nosuch"}]))
    assert read_frame(control) == [ERROR, cm.Pause.SPEC.id, "no domain named 'nosuch'"]
