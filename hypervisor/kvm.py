"""The kvm backend: a real virtual machine whose vCPU runs guest/guest.S.

The runner process owns the VM (KVM refuses VM and vCPU ioctls from any
other process), with guest RAM = the runner's memfd as memory slot 0 under
dirty logging.  One vCPU thread runs the guest; the guest asks for work on
an I/O port, which is where the runner paces it to the domain's dirty rate,
stops it for pause, and asks it to verify its pages.  Dirty pages come from
KVM_GET_DIRTY_LOG; the vCPU registers travel in HVM_CONTEXT.
"""

from __future__ import annotations

import struct
import threading
import time

import msgpack
import numpy as np

from protocol._gen_runner_msgs import Workload

from . import kvm_api
from .backend import BackendError, unpack_context
from .guest import GUEST_DIR
from .memory import GuestMemory

GUEST_BIN = GUEST_DIR / "guest.bin"
CODE, STACK_TOP, TABLE_PAGE = 0x1000, 0x8000, 8
MAILBOX = struct.Struct("<IIIIIII")  # magic ws_pages data_start lcg writes result bad
MAGIC = 0x59525246  # "FRRY"
OFF_WRITES, OFF_RESULT, OFF_BAD = 0x10, 0x14, 0x18
PORT_COMMAND, PORT_RESULT = 0x10, 0x11
VERIFY = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MAX_GRANT = 256  # pages per command: bounds how long pause waits for the vCPU
TICK = 0.001  # s between pacing checks while the guest waits for work
CHECK_TIMEOUT = 120.0


def layout(pages: int, working_set: float) -> tuple[int, int]:
    """(working-set pages, first data page) for a VM of `pages` pages."""
    table_pages = -(-max(pages - TABLE_PAGE, 1) // 1024)
    data_start = TABLE_PAGE + table_pages
    if pages <= data_start:
        raise BackendError(f"a kvm domain needs more than {data_start * 4} KiB of memory")
    ws = max(1, int((pages - data_start) * working_set))
    return ws, data_start


def expected_words(versions: np.ndarray) -> np.ndarray:
    """What each working-set page holds, as guest.S writes it."""
    index = np.arange(len(versions), dtype=np.uint32)
    with np.errstate(over="ignore"):
        words = index ^ (versions.astype(np.uint32) * np.uint32(GOLDEN))
    return np.where(versions == 0, np.uint32(0), words)


class KvmGuest:
    name = "kvm"

    def __init__(self, memory: GuestMemory, workload: Workload, lock: threading.Lock) -> None:
        self.memory = memory
        self.workload = workload
        self.vm = kvm_api.Vm(memory.map, memory.size)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._booted = False
        self._context: dict | None = None
        self._logdirty = False
        self._pending = np.zeros(len(self.vm.dirty_log()), dtype=np.uint8)
        self._check_wanted = threading.Event()
        self._check_done = threading.Event()
        self._check_result = ""
        self.failure = ""

    # -- running ----------------------------------------------------------
    def start(self, incoming: bool) -> None:
        if self.failure:
            raise BackendError(self.failure)
        if not self._booted:
            self._load_context() if incoming else self._boot()
            self._booted = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_vcpu, name="vcpu0", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _boot(self) -> None:
        ws, data_start = layout(self.memory.pages, self.workload.working_set)
        code = GUEST_BIN.read_bytes()
        self.memory.view[CODE : CODE + len(code)] = code
        seed = self.workload.seed & 0xFFFFFFFF
        self.memory.view[: MAILBOX.size] = MAILBOX.pack(MAGIC, ws, data_start, seed, 0, 0, 0)
        self.vm.set_sregs(kvm_api.flat_protected_mode(self.vm.get_sregs()))
        self.vm.set_regs(kvm_api.boot_regs(CODE, STACK_TOP))

    def _load_context(self) -> None:
        if self._context is None:
            raise BackendError("an incoming kvm domain needs its vCPU context (HVM_CONTEXT) first")
        self.vm.set_sregs(self._context["sregs"])
        self.vm.set_regs(self._context["regs"])

    def _run_vcpu(self) -> None:
        started, granted = time.monotonic(), 0
        while True:
            reason = self.vm.enter()
            if reason == -1:
                continue
            if reason != kvm_api.EXIT_IO:
                self.failure = f"the guest stopped: KVM exit reason {reason}"
                self._check_done.set()
                return
            direction, _size, port, offset = self.vm.io_exit()
            if port == PORT_COMMAND and direction == kvm_api.IO_IN:
                command = self._next_command(started, granted)
                if command != VERIFY:
                    granted += command
                struct.pack_into("<I", self.vm.run, offset, command)
                if self._stop.is_set():
                    self.vm.complete_pending_io()  # registers consistent for get_context
                    return
            elif port == PORT_RESULT and direction == kvm_api.IO_OUT:
                self._check_result = describe_result(self.memory)
                self._check_done.set()
            else:
                self.failure = f"the guest used I/O port {port:#x}, which ferry does not emulate"
                self._check_done.set()
                return

    def _next_command(self, started: float, granted: int) -> int:
        """Work for the guest: a verify request, or pages due at the dirty rate."""
        while not self._stop.is_set():
            if self._check_wanted.is_set():
                self._check_wanted.clear()
                return VERIFY
            due = int(self.workload.dirty_rate * (time.monotonic() - started)) - granted
            if due > 0:
                return min(due, MAX_GRANT)
            time.sleep(TICK)
        return 0

    # -- log-dirty --------------------------------------------------------
    def logdirty(self, enable: bool) -> None:
        self.vm.dirty_log()  # KVM logs all the time: drop what came before
        self._pending[:] = 0
        self._logdirty = enable

    def dirty_bitmap(self, clear: bool) -> tuple[int, bytes]:
        # KVM has no "peek": what it reports is kept here until a clean.
        self._pending |= np.frombuffer(self.vm.dirty_log(), dtype=np.uint8)
        bitmap = np.packbits(
            np.unpackbits(self._pending, bitorder="little")[: self.memory.pages], bitorder="little"
        )
        count = int(np.unpackbits(bitmap).sum())
        if clear:
            self._pending[:] = 0
        return count, bitmap.tobytes()

    # -- context ----------------------------------------------------------
    def get_context(self) -> bytes:
        if not self._booted:
            raise BackendError("the guest has not run yet: no vCPU context")
        return msgpack.packb({"regs": self.vm.get_regs(), "sregs": self.vm.get_sregs()})

    def set_context(self, blob: bytes) -> None:
        ctx = unpack_context(blob, "kvm vCPU")
        regs = ctx.get("regs") if isinstance(ctx, dict) else None
        sregs = ctx.get("sregs") if isinstance(ctx, dict) else None
        if type(regs) is not bytes or type(sregs) is not bytes:
            raise BackendError("not a kvm vCPU context: no regs and sregs")
        if len(regs) != kvm_api.REGS_SIZE or len(sregs) != kvm_api.SREGS_SIZE:
            raise BackendError("kvm vCPU context has the wrong register sizes")
        if self._booted:
            raise BackendError("the guest already runs from its own context")
        self._context = {"regs": regs, "sregs": sregs}

    def writes(self) -> int:
        self.memory.ensure_present([0])  # the mailbox page may still be on its way
        return struct.unpack_from("<I", self.memory.map, OFF_WRITES)[0]

    def guest_check(self) -> str:
        """Running: the guest verifies its own pages.  Paused: the runner does,
        by the same rules, reading guest RAM."""
        if self.failure:
            return self.failure
        if self._thread is None:
            return check_in_host(self.memory)
        self._check_done.clear()
        self._check_wanted.set()
        if not self._check_done.wait(CHECK_TIMEOUT):
            return "the guest did not answer the check request"
        return self.failure or self._check_result

    def close(self) -> None:
        self.stop()
        self.vm.close()


def describe_result(memory: GuestMemory) -> str:
    result, bad = struct.unpack_from("<II", memory.map, OFF_RESULT)
    if result == 0:
        return "ok"
    if result == 1:
        return f"guest: page {bad} of its working set does not hold what it wrote"
    return f"guest: its page versions do not add up to its {struct.unpack_from('<I', memory.map, OFF_WRITES)[0]} writes"


def check_in_host(memory: GuestMemory) -> str:
    magic, ws, data_start, _lcg, writes, _r, _b = MAILBOX.unpack_from(memory.map, 0)
    if magic != MAGIC:
        return "no guest in this memory (mailbox magic missing)"
    if data_start + ws > memory.pages:
        return "the guest mailbox describes pages outside its memory"
    table = np.frombuffer(memory.map, dtype="<u4", count=ws, offset=TABLE_PAGE * 4096)
    pages = np.frombuffer(memory.map, dtype="<u4").reshape(memory.pages, 1024)[
        data_start : data_start + ws
    ]
    expected = expected_words(table)
    wrong = np.flatnonzero((pages[:, 0] != expected) | (pages[:, -1] != expected))
    if len(wrong):
        return f"runner: page {int(wrong[0])} of the working set does not hold what the guest wrote"
    if int(table.sum(dtype=np.uint64)) & 0xFFFFFFFF != writes:
        return f"runner: page versions do not add up to the guest's {writes} writes"
    return "ok"
