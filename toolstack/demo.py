"""`ferry demo`: two hosts on loopback, a busy domain, a live migration.

Starts two ferryd daemons (two state dirs: two hosts), creates a domain that
dirties its memory on the first, live-migrates it to the second with the
integrity check on, checks the guest runs on at the destination, prints the
report, and cleans up everything it started, whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .cli_commands import CliError, Command, memory_size
from .client import DaemonClient, DaemonError
from .report import progress_line

START_TIMEOUT = 30.0


class DemoError(Exception):
    pass


def kvm_usable() -> bool:
    from hypervisor.kvm_api import kvm_usable as usable

    return usable()


class Demo(Command):
    name = "demo"
    help = "live-migrate a busy domain between two local daemons"

    @staticmethod
    def configure(p) -> None:
        p.add_argument("--backend", choices=["sim", "kvm", "auto"], default="auto")
        p.add_argument("--memory", default="1GiB")
        p.add_argument("--dirty-rate", type=float, default=20_000, metavar="PAGES_PER_S")
        p.add_argument("--working-set", type=float, default=0.25, metavar="FRACTION")
        p.add_argument("--policy", default="converge", choices=["xen", "converge"])
        p.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS")
        p.add_argument("--json", action="store_true")

    @staticmethod
    def run(args) -> int:
        memory = memory_size(args.memory)
        backend = args.backend
        if backend == "auto":
            backend = "kvm" if kvm_usable() else "sim"
        try:
            with Hosts() as hosts:
                report = run_demo(hosts, args, backend, memory)
        except (DemoError, DaemonError) as exc:
            raise CliError(f"demo failed: {exc}") from None
        if args.json:
            print(json.dumps(report))
        else:
            print_summary(report)
        return 0 if report["integrity"] == "ok" else 1


class Hosts:
    """Two ferryd processes in a temporary directory; all gone on exit."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="ferry-demo-")
        self.procs: list[subprocess.Popen] = []
        self.states: list[str] = []  # each daemon's state dir
        self.sockets: list[str] = []

    def __enter__(self):
        key = os.path.join(self.root, "auth.key")
        with open(key, "w") as f:
            f.write(secrets.token_hex(32))
        for name, listen in (("host-a", None), ("host-b", "127.0.0.1:0")):
            state = os.path.join(self.root, name)
            cmd = [
                sys.executable,
                "-m",
                "toolstack.daemon",
                "--state-dir",
                state,
                "--auth-key",
                key,
            ]
            if listen:
                cmd += ["--listen", listen]
            log = open(os.path.join(self.root, f"{name}.log"), "w")
            self.procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            )
            log.close()
            self.states.append(state)
            self.sockets.append(os.path.join(state, "control.sock"))
        try:
            for proc, path in zip(self.procs, self.sockets, strict=True):
                wait_for_daemon(proc, path)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def client(self, index: int) -> DaemonClient:
        return DaemonClient(self.sockets[index])

    def __exit__(self, *exc) -> None:
        for i, _ in enumerate(self.procs):
            destroy_all(self, i)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for_daemon(proc: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"ferryd exited with status {proc.returncode} at start")
        try:
            with DaemonClient(path) as c:
                c.request("ping")
                return
        except DaemonError:
            time.sleep(0.05)
    raise DemoError("ferryd did not start in time")


def destroy_all(hosts: Hosts, index: int) -> None:
    if hosts.procs[index].poll() is not None:
        return
    try:
        with hosts.client(index) as c:
            for domain in c.request("list")["domains"]:
                c.request("destroy", name=domain["name"])
    except DaemonError:
        pass


def run_demo(hosts: Hosts, args, backend: str, memory: int) -> dict:
    config = {
        "name": "demo-vm",
        "memory_bytes": memory,
        "backend": backend,
        "dirty_rate": args.dirty_rate,
        "working_set": args.working_set,
        "seed": 42,
    }
    with hosts.client(0) as a:
        a.request("create", config=json.dumps(config))
    time.sleep(1.0)  # let the guest dirty its working set before migrating
    with hosts.client(1) as b:
        port = b.request("ping")["listen_port"]
    show = sys.stderr.isatty() and not args.json

    def progress(p: dict) -> None:
        print("\r" + progress_line(p), end="", file=sys.stderr, flush=True)

    with hosts.client(0) as a:
        try:
            fields = {
                "name": "demo-vm",
                "address": f"127.0.0.1:{port}",
                "policy": args.policy,
                "verify": True,
                "watch": show,
            }
            if args.policy == "converge":
                fields["downtime_limit"] = args.downtime_limit
            report = a.request("migrate", on_progress=progress if show else None, **fields)[
                "report"
            ]
        finally:
            if show:
                print(file=sys.stderr)
        remaining = [d["name"] for d in a.request("list")["domains"]]
    with hosts.client(1) as b:
        before = b.request("info", name="demo-vm")["domain"]
        time.sleep(0.5)
        after = b.request("info", name="demo-vm")["domain"]
        guest_check = b.request("guest-check", name="demo-vm")["guest_check"]
    total_s = report["elapsed_ms"] / 1000
    return {
        "backend": backend,
        "memory_bytes": memory,
        "policy": args.policy,
        "iterations": report["iterations"],
        "pages_sent": report["pages_sent"],
        "bytes_sent": report["bytes_sent"],
        "total_ms": report["elapsed_ms"],
        "downtime_ms": report["downtime_ms"],
        "verify_ms": report.get("verify_ms"),
        "policy_rpcs": report["policy_rpcs"],
        "policy_wait_p50_us": report["policy_wait_p50_us"],
        "policy_wait_p99_us": report["policy_wait_p99_us"],
        "throughput_mb_s": round(report["bytes_sent"] / 1e6 / total_s, 1) if total_s else None,
        "integrity": report.get("integrity", "mismatch"),
        "decision": report["decision"],
        "source_gone": "demo-vm" not in remaining,
        "destination_state": after["state"],
        "destination_writes_advancing": after["writes"] > before["writes"],
        "guest_check": guest_check,
    }


def print_summary(r: dict) -> None:
    print(f"ferry demo: {r['memory_bytes'] >> 20} MiB {r['backend']} domain, policy {r['policy']}")
    for i, it in enumerate(r["iterations"]):
        final = "  (stop-and-copy, guest paused)" if it.get("final") else ""
        print(f"  iteration {i:>2}: {it['pages']:>8} pages{final}")
    print(f"  pages sent:      {r['pages_sent']} ({r['bytes_sent'] / 1e6:.1f} MB)")
    print(f"  total time:      {r['total_ms']:.0f} ms, {r['throughput_mb_s']} MB/s")
    print(
        f"  downtime:        {r['downtime_ms']:.1f} ms (integrity check of {r['verify_ms'] or 0:.0f} ms excluded)"
    )
    print(
        f"  policy RPCs:     {r['policy_rpcs']} (wait p50 {r['policy_wait_p50_us']} us, p99 {r['policy_wait_p99_us']} us)"
    )
    print(f"  decision:        {r['decision']}")
    print(
        f"  integrity:       {r['integrity']} (source RAM digest at suspend == destination before unpause)"
    )
    print(
        f"  destination:     {r['destination_state']}, guest writing: {r['destination_writes_advancing']}, "
        f"guest check: {r['guest_check']}"
    )
    print(f"  source removed:  {r['source_gone']}")
