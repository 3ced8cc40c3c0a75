"""The `peers` section of `ferry bench`: QEMU migrating the same RAM on this machine.

Two local QEMU processes (TCG, no disk, no kernel: SeaBIOS finds nothing to
boot and idles) migrate a guest whose RAM is a file of random bytes, so
every page holds data that neither zero-page detection nor compression can
shrink.  It is timed as a whole job, from the `migrate` request to the
guest running at the destination, once over one connection and once with
multifd on 2 channels, max-bandwidth unlimited.  QEMU's own figures
(downtime, total-time, ram.mbps, bytes transferred) come from query-migrate.
With `settle` (the bench's full run, and this command unless --no-settle),
each migration starts once memory freed before it has gone back to the
host, as ferry's do (settle.py).

Where qemu-system-x86_64 is missing the section is skipped, and a QEMU that
fails is reported in the section ("failed"): the peer never fails the bench.

    python -m bench.qemu_peer 2GiB [--rounds N] [--workdir DIR] [--no-settle]

prints the section as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from .settle import settle_free_memory

Settle = Callable[[], float]  # waits before a timed migration; the s it waited (settle.py)

BINARY = "qemu-system-x86_64"
SKIPPED = f"{BINARY} not installed"
MiB = 1 << 20
CHANNELS = (1, 2)  # one connection, then multifd on 2
VARIANTS = {1: "one_connection", 2: "multifd_2"}
UNLIMITED = 1 << 40  # bytes/s: QEMU's default max-bandwidth is 32 MiB/s
START_TIMEOUT = 20.0  # s for a QEMU to open its QMP socket
REPLY_TIMEOUT = 20.0  # s for any one QMP reply
MIGRATION_TIMEOUT = 120.0  # s for the whole migration, guest running at the destination
WRITE_CHUNK = 16 * MiB
SOCKET_DIR_MAX = 80  # AF_UNIX paths end at 108 octets
IDLE_MARK = b"No bootable device"  # SeaBIOS, when it has tried every boot device


class QemuPeerError(Exception):
    """A QEMU that would not start, answer or migrate; the message is one line."""


def qemu_binary() -> str | None:
    return shutil.which(BINARY)


def qemu_version(binary: str) -> str:
    """The first line of `--version`: "QEMU emulator version 7.2.22 (...)"."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuPeerError(f"{binary} --version: {exc}") from None
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def random_ram_file(workdir: str, size: int) -> str:
    """A file of `size` random octets in `workdir`, kept for the next call:
    writing 2 GiB of randomness takes longer than migrating it."""
    path = os.path.join(workdir, f"qemu-ram-{size}.bin")
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    partial = path + ".partial"  # renamed when whole, so a cut-short write is never reused
    try:
        with open(partial, "wb") as f:
            for offset in range(0, size, WRITE_CHUNK):
                f.write(os.urandom(min(WRITE_CHUNK, size - offset)))
            os.fsync(f.fileno())  # no writeback left to compete with the first migration
        os.replace(partial, path)
    except OSError as exc:  # a full disk, a missing workdir
        raise QemuPeerError(f"writing the guest's RAM file: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return path


class Qmp:
    """A synchronous QMP client on a unix socket: one command at a time;
    events that arrive meanwhile are kept for `wait_event`."""

    def __init__(self, path: str, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buffer = b""
        self.events: list[dict] = []
        try:
            self.sock.connect(path)
            self._read(time.monotonic() + REPLY_TIMEOUT)  # the greeting
            self.command("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def command(self, execute: str, **arguments) -> object:
        message = {"execute": execute}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            reply = self._read(deadline)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QemuPeerError(f"{self.name} {execute}: {reply['error'].get('desc')}")

    def wait_event(self, match: Callable[[dict], bool], deadline: float, what: str) -> dict:
        """The first event, kept or still to come, that `match` accepts."""
        while True:
            for event in self.events:
                if match(event):
                    self.events.remove(event)
                    return event
            self._read(deadline, what)

    def _read(self, deadline: float, what: str = "a QMP reply") -> dict:
        """The next message; events are also kept in self.events."""
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QemuPeerError(f"{self.name}: {what} did not come in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue  # the deadline check above says so
            except OSError as exc:
                raise QemuPeerError(f"{self.name} QMP: {exc}") from None
            if not data:
                raise QemuPeerError(f"{self.name} closed its QMP socket")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        if "event" in message:
            self.events.append(message)
        return message


class Qemu:
    """One QEMU process, an idle TCG PC with RAM from `memory_object`, and its
    QMP connection.  SeaBIOS writes its log to a file (isa-debugcon), which
    says when the guest has found nothing to boot and sits idle."""

    def __init__(self, name: str, binary: str, size: int, memory_object: str, run_dir: str):
        self.name = name
        self.qmp_path = os.path.join(run_dir, f"{name}.qmp")
        self.log_path = os.path.join(run_dir, f"{name}.log")
        self.bios_path = os.path.join(run_dir, f"{name}.bios")
        self.args = [
            binary,
            *("-accel", "tcg"),
            *("-machine", "pc,memory-backend=ram"),
            *("-m", f"{size // MiB}M"),  # a plain number would be read as MiB
            *("-object", memory_object),
            *("-nodefaults", "-display", "none"),
            *("-chardev", f"file,id=bios,path={self.bios_path}"),
            *("-device", "isa-debugcon,iobase=0x402,chardev=bios"),
            *("-qmp", f"unix:{self.qmp_path},server=on,wait=off"),
        ]
        self.proc: subprocess.Popen | None = None
        self.qmp: Qmp | None = None

    def start(self, *extra: str) -> Qmp:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.args, *extra], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT
        while self.qmp is None:
            self.check_alive(deadline, "opened no QMP socket")
            try:
                self.qmp = Qmp(self.qmp_path, self.name)
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)  # the socket is not there yet
        return self.qmp

    def wait_idle(self) -> None:
        """Until SeaBIOS has given up booting: its POST is over, the vCPU halts."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(FileNotFoundError), open(self.bios_path, "rb") as f:
                if IDLE_MARK in f.read():
                    return
            self.check_alive(deadline, "guest did not finish its BIOS")
            time.sleep(0.02)

    def check_alive(self, deadline: float, late: str) -> None:
        if self.proc.poll() is not None:
            raise QemuPeerError(self.exit_reason())
        if time.monotonic() > deadline:
            raise QemuPeerError(f"{self.name} QEMU {late} in {START_TIMEOUT:g} s")

    def exit_reason(self) -> str | None:
        """Why the process is gone, in one line; None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        how = f"signal {-code}" if code < 0 else f"status {code}"
        return f"{self.name} QEMU exited ({how}): {self.last_words()}"

    def last_words(self) -> str:
        """The last line QEMU wrote, for an error message."""
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            return "no output"
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)


def private_dir(workdir: str) -> str:
    """A directory for the QMP sockets and QEMU's logs, in `workdir` where
    its path is short enough for a unix socket."""
    short = len(os.path.abspath(workdir)) < SOCKET_DIR_MAX
    return tempfile.mkdtemp(prefix="ferry-qemu-", dir=workdir if short else None)


def migration_settings(qmp: Qmp, channels: int) -> None:
    """The same on both sides: events on, multifd for more than one channel,
    no bandwidth limit."""
    capabilities = [{"capability": "events", "state": True}]
    if channels > 1:
        capabilities.append({"capability": "multifd", "state": True})
    qmp.command("migrate-set-capabilities", capabilities=capabilities)
    parameters = {"max-bandwidth": UNLIMITED}
    if channels > 1:
        parameters["multifd-channels"] = channels
    qmp.command("migrate-set-parameters", **parameters)


def migration_status(event: dict, *statuses: str) -> bool:
    return event["event"] == "MIGRATION" and event["data"]["status"] in statuses


def event_time(event: dict) -> float:
    """QEMU stamps events with the wall clock (gettimeofday)."""
    stamp = event["timestamp"]
    return stamp["seconds"] + stamp["microseconds"] / 1e6


def qemu_migration(
    memory_bytes: int, channels: int, workdir: str, settle: Settle | None = None
) -> dict:
    """Migrate `memory_bytes` of random RAM between two local QEMUs over
    `channels` connections (multifd when more than one); the whole job's
    MB/s and QEMU's own figures."""
    binary = qemu_binary()
    if binary is None:
        raise QemuPeerError(SKIPPED)
    if memory_bytes <= 0 or memory_bytes % MiB:
        raise QemuPeerError(f"{memory_bytes} octets is not a whole number of MiB")
    ram_file = random_ram_file(workdir, memory_bytes)
    run_dir = private_dir(workdir)
    # share=off: the guest's writes stay in QEMU, the file is read only
    source_ram = f"memory-backend-file,id=ram,size={memory_bytes},mem-path={ram_file},share=off"
    # the destination starts from zeroed anonymous RAM: every page must travel
    destination_ram = f"memory-backend-ram,id=ram,size={memory_bytes}"
    source = Qemu("source", binary, memory_bytes, source_ram, run_dir)
    destination = Qemu("destination", binary, memory_bytes, destination_ram, run_dir)
    try:
        return migrate(source, destination, memory_bytes, channels, settle)
    except QemuPeerError:
        # a QEMU that died explains the failure better than its peer's view of it
        for reason in (source.exit_reason(), destination.exit_reason()):
            if reason:
                raise QemuPeerError(reason) from None
        raise
    finally:
        source.stop()
        destination.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def migrate(
    source: Qemu, destination: Qemu, memory_bytes: int, channels: int, settle: Settle | None
) -> dict:
    src, dst = source.start(), destination.start("-incoming", "defer")
    source.wait_idle()
    if src.command("query-status")["status"] != "running":
        raise QemuPeerError("source guest is not running")
    for qmp in (src, dst):
        migration_settings(qmp, channels)
    # port 0: QEMU picks a free port and reports it, so no other process can take it first
    dst.command("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.command("query-migrate")["socket-address"][0]["port"]
    settled = settle() if settle else 0.0  # both QEMUs up: their RAM is allocated
    started = time.time()  # the wall clock, like the events' timestamps
    src.command("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    end = src.wait_event(
        lambda e: migration_status(e, "completed", "failed", "cancelled"),
        deadline,
        "the end of the migration",
    )
    if end["data"]["status"] != "completed":
        why = src.command("query-migrate").get("error-desc") or destination.last_words()
        raise QemuPeerError(f"QEMU migration {end['data']['status']}: {why}")
    resumed = dst.wait_event(lambda e: e["event"] == "RESUME", deadline, "the guest's resume")
    info = final_figures(src, deadline)
    if dst.command("query-status")["status"] != "running":
        raise QemuPeerError("destination guest is not running after the migration")
    # QEMU stops the guest once what is left fits in this: its downtime is not a bare minimum
    info["downtime-limit"] = src.command("query-migrate-parameters")["downtime-limit"]
    report = migration_report(memory_bytes, channels, event_time(resumed) - started, info)
    report["settled_s"] = settled
    return report


def final_figures(src: Qmp, deadline: float) -> dict:
    """query-migrate once the source has its figures: its migration thread
    reports "completed" before it works out total-time and downtime, then
    sets the postmigrate run state under the same lock."""
    while src.command("query-status")["status"] != "postmigrate":
        if time.monotonic() > deadline:
            raise QemuPeerError("source: the postmigrate state did not come in time")
        time.sleep(0.005)
    return src.command("query-migrate")


def migration_report(memory_bytes: int, channels: int, seconds: float, info: dict) -> dict:
    ram = info["ram"]
    return {
        "channels": channels,
        "status": info["status"],
        "memory_bytes": memory_bytes,
        "seconds": round(seconds, 3),
        "mb_s": round(memory_bytes / 1e6 / seconds, 1),
        "downtime_ms": info["downtime"],
        "qemu_downtime_limit_ms": info["downtime-limit"],
        "qemu_total_ms": info["total-time"],
        "qemu_setup_ms": info.get("setup-time"),
        "transferred_bytes": ram["transferred"],
        "qemu_mb_s": round(ram["mbps"] / 8, 1),  # QEMU reports megabits
    }


def variant(samples: list[dict]) -> dict:
    """Best of the rounds, each figure on its own: the highest MB/s and the
    lowest downtime (not necessarily the same round's); every sample kept."""
    downtimes = [s["downtime_ms"] for s in samples if s.get("downtime_ms") is not None]
    return {
        "best_mb_s": max(s["mb_s"] for s in samples),
        "best_downtime_ms": min(downtimes) if downtimes else None,
        "samples_mb_s": [s["mb_s"] for s in samples],
        "samples_downtime_ms": [s.get("downtime_ms") for s in samples],
        "samples": samples,
    }


def peer_migration(memory_bytes: int, channels: int, workdir: str, settle: Settle | None) -> dict:
    """qemu_migration, any failure of it a QemuPeerError: a QEMU that cannot
    even be started (not executable), a QMP reply that is not JSON or lacks a
    figure, must not fail the bench either."""
    try:
        return qemu_migration(memory_bytes, channels, workdir, settle)
    except QemuPeerError:
        raise
    except Exception as exc:  # the peer is reported, never fatal
        raise QemuPeerError(f"{VARIANTS[channels]}: {type(exc).__name__}: {exc}") from None


def peers_section(
    memory_bytes: int,
    rounds: int,
    workdir: str,
    ferry_round: Callable[[], dict] | None = None,
    settle: Settle | None = None,
) -> dict:
    """QEMU's one connection and multifd-2 migrations, `rounds` times each,
    each round after one of `ferry_round` (ferry's own migration of as much
    RAM) when given, so that a noisy spell on this machine weighs on both.

    A QEMU failure ends the section as {"failed": why} (with ferry's samples
    so far, if any); what `ferry_round` raises, other than QemuPeerError, is
    ferry's failure and goes to the caller."""
    binary = qemu_binary()
    if binary is None:
        return {"skipped": SKIPPED}
    samples: dict[int, list[dict]] = {channels: [] for channels in CHANNELS}
    ferry_samples: list[dict] = []
    try:
        section = {"qemu": qemu_version(binary), "memory_bytes": memory_bytes, "rounds": rounds}
        for _ in range(rounds):
            if ferry_round is not None:
                ferry_samples.append(ferry_round())
            for channels in CHANNELS:
                samples[channels].append(peer_migration(memory_bytes, channels, workdir, settle))
    except QemuPeerError as exc:
        failed = {"failed": str(exc)}
        if ferry_samples:
            failed["ferry"] = variant(ferry_samples)
        return failed
    if ferry_round is not None:
        section["ferry"] = variant(ferry_samples)
    for channels in CHANNELS:
        section[VARIANTS[channels]] = variant(samples[channels])
    section.update(ferry_ratio(section))
    return section


def ferry_ratio(section: dict) -> dict:
    """ferry's best MB/s over the faster QEMU variant's best (and which that was)."""
    if "ferry" not in section:
        return {}
    faster = max(VARIANTS.values(), key=lambda name: section[name]["best_mb_s"])
    return {
        "ratio": round(section["ferry"]["best_mb_s"] / section[faster]["best_mb_s"], 3),
        "ratio_to": faster,
        "ratio_of": f"ferry.best_mb_s / {faster}.best_mb_s",
    }


def main(argv: list[str] | None = None) -> int:
    from hypervisor.sizes import parse_size

    p = argparse.ArgumentParser(
        prog="python -m bench.qemu_peer", description=__doc__.split("\n")[0]
    )
    p.add_argument("size", type=parse_size, help="guest RAM, e.g. 2GiB")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workdir", help="where the random RAM file stays (default: a temporary dir)")
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="start each migration at once, not once freed memory went back to the host",
    )
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            os.makedirs(args.workdir, exist_ok=True)
        workdir = args.workdir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="ferry-qemu-")
        )
        settle = None if args.no_settle else settle_free_memory
        section = peers_section(args.size, args.rounds, workdir, settle=settle)
    if "failed" in section:
        print(f"qemu_peer: {section['failed']}", file=sys.stderr)
        return 1
    print(json.dumps(section, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
