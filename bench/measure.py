"""ferry's side of each measurement, driven through two real daemons.

Every number comes from the job reports the daemons return (the helpers
time their own streams and policy round trips); this module only sets the
scene: domains of the asked size, filled where the measurement needs every
page to hold data.
"""

from __future__ import annotations

import os
import time

from hypervisor import RunnerClient
from protocol._gen_control_msgs import DomainConfig
from toolstack.harness import LocalHosts
from toolstack.host.domains import domain_path

SOURCE, DESTINATION = 0, 1
FILL_CHUNK = 64 << 20


def start_hosts() -> LocalHosts:
    hosts = LocalHosts(prefix="ferry-bench-")
    try:
        hosts.start("host-a", listen=False)
        hosts.start("host-b")
    except BaseException:
        hosts.close()
        raise
    return hosts


def create(hosts: LocalHosts, host: int, name: str, memory: int, dirty_rate: float = 0.0) -> None:
    config = DomainConfig(name=name, memory_bytes=memory, dirty_rate=dirty_rate, seed=1)
    with hosts.daemons[host].client() as daemon:
        daemon.create(config=config, paused=True)


def fill(hosts: LocalHosts, host: int, name: str) -> None:
    """Write every page of a paused domain, then let it run: a guest that
    has used all its RAM, so no page travels as a never-touched hole."""
    with RunnerClient(domain_path(hosts.daemons[host].state, name, "sock")) as runner:
        ram = runner.map_guest_memory(writable=True)
        ram.bytes[:] = 0x5A
        ram.close()
        runner.unpause()


def fill_from(hosts: LocalHosts, host: int, name: str, path: str) -> None:
    """Copy a file of the domain's size (random bytes: nothing to compress or
    skip) into every page of a paused domain, then let it run."""
    with RunnerClient(domain_path(hosts.daemons[host].state, name, "sock")) as runner:
        ram = runner.map_guest_memory(writable=True)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size != ram.size:
                    raise ValueError(f"{path} does not hold {ram.size} octets")
                for offset in range(0, ram.size, FILL_CHUNK):
                    os.pwrite(ram.fd, f.read(FILL_CHUNK), offset)
        finally:
            ram.close()
        runner.unpause()


def state(hosts: LocalHosts, host: int, name: str) -> str:
    """running, paused, ... (DomainInfo.state)."""
    with hosts.daemons[host].client() as daemon:
        return daemon.info(name=name).state


def unpause(hosts: LocalHosts, host: int, name: str) -> None:
    with hosts.daemons[host].client() as daemon:
        daemon.unpause(name=name)


def migrate(hosts: LocalHosts, name: str, policy: str, settings: dict):
    address = hosts.daemons[DESTINATION].address
    with hosts.daemons[SOURCE].client() as a:
        return a.migrate(name=name, address=address, policy=policy, settings=settings, watch=True)


def save(hosts: LocalHosts, host: int, name: str, path: str):
    with hosts.daemons[host].client() as daemon:
        return daemon.save(name=name, file=path, watch=True)


def restore(hosts: LocalHosts, host: int, path: str, name: str):
    """The restore job's report, and the whole command's wall time in s."""
    started = time.perf_counter()
    with hosts.daemons[host].client() as daemon:
        report = daemon.restore(file=path, name=name, paused=True, watch=True)
    return report, time.perf_counter() - started


def destroy(hosts: LocalHosts, host: int, name: str) -> None:
    with hosts.daemons[host].client() as daemon:
        daemon.destroy(name=name)
