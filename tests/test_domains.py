"""The toolstack's view of a host's domains (toolstack/domains.py)."""

from __future__ import annotations

import os

import trio

from protocol._gen_control_msgs import DomainConfig
from toolstack.host import Host, config_to_json


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_reattach_forgets_a_socket_that_hangs_up_and_keeps_no_fd_of_it(short_tmp):
    # Whatever listens on a domain's socket after a restart must answer
    # getinfo like a runner; one that hangs up is dropped, config and all,
    # and the pidfd opened for it is closed again.
    host = Host(os.path.join(short_tmp, "host"))
    with open(host.path("ghost", "json"), "wb") as f:
        f.write(config_to_json(DomainConfig(name="ghost", memory_bytes=1 << 20)))
    before = open_fds()
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(host.path("ghost", "sock"))
    listener.listen()

    async def hang_up() -> None:
        sock, _ = await listener.accept()
        sock.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang_up)
        found = await host.reattach()
    listener.close()

    assert found == [] and host.domains == {}
    assert not os.path.exists(host.path("ghost", "json"))
    assert not os.path.exists(host.path("ghost", "sock"))
    assert open_fds() == before
