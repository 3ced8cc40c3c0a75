"""ferry's side of each measurement, driven through two real daemons.

Every number comes from the job reports the daemons return (the helpers
time their own streams and policy round trips); this module only sets the
scene: domains of the asked size, filled where the measurement needs every
page to hold data.
"""

from __future__ import annotations

import json
import time

from hypervisor import RunnerClient
from toolstack.demo import Hosts
from toolstack.domains import domain_path

SOURCE, DESTINATION = 0, 1


def create(hosts: Hosts, host: int, name: str, memory: int, dirty_rate: float = 0.0) -> None:
    config = {"name": name, "memory_bytes": memory, "dirty_rate": dirty_rate, "seed": 1}
    with hosts.client(host) as daemon:
        daemon.request("create", config=json.dumps(config), paused=True)


def fill(hosts: Hosts, host: int, name: str) -> None:
    """Write every page of a paused domain, then let it run: a guest that
    has used all its RAM, so no page travels as a never-touched hole."""
    with RunnerClient(domain_path(hosts.states[host], name, "sock")) as runner:
        ram = runner.map_guest_memory(writable=True)
        ram.bytes[:] = 0x5A
        ram.close()
        runner.unpause()


def unpause(hosts: Hosts, host: int, name: str) -> None:
    with hosts.client(host) as daemon:
        daemon.request("unpause", name=name)


def migrate(hosts: Hosts, name: str, policy: str, settings: dict) -> dict:
    with hosts.client(DESTINATION) as b:
        port = b.request("ping")["listen_port"]
    with hosts.client(SOURCE) as a:
        address = f"127.0.0.1:{port}"
        reply = a.request("migrate", name=name, address=address, policy=policy, settings=settings)
    return reply["report"]


def save(hosts: Hosts, host: int, name: str, path: str) -> dict:
    with hosts.client(host) as daemon:
        return daemon.request("save", name=name, file=path)["report"]


def restore(hosts: Hosts, host: int, path: str, name: str) -> tuple[dict, float]:
    """The restore job's report, and the whole command's wall time in s."""
    started = time.perf_counter()
    with hosts.client(host) as daemon:
        report = daemon.request("restore", file=path, name=name, paused=True)["report"]
    return report["job"], time.perf_counter() - started


def destroy(hosts: Hosts, host: int, name: str) -> None:
    with hosts.client(host) as daemon:
        daemon.request("destroy", name=name)
