"""The few KVM ioctls ferry uses, through fcntl and ctypes (no QEMU).

Numbers and layouts are from <linux/kvm.h> (x86); see also
../shared/KVM-NOTES.md for what was observed on this machine kind.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct

KVMIO = 0xAE


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (KVMIO << 8) | nr


REGS_SIZE = 144  # struct kvm_regs: 16 GPRs, rip, rflags
SREGS_SIZE = 312  # struct kvm_sregs
MEMORY_REGION = struct.Struct("<IIQQQ")  # slot, flags, guest_phys_addr, memory_size, userspace_addr
DIRTY_LOG = struct.Struct("<IIQ")  # slot, padding, dirty_bitmap pointer

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, DIRTY_LOG.size)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, MEMORY_REGION.size)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, REGS_SIZE)
KVM_SET_REGS = _iow(0x82, REGS_SIZE)
KVM_GET_SREGS = _ior(0x83, SREGS_SIZE)
KVM_SET_SREGS = _iow(0x84, SREGS_SIZE)

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

EXIT_IO, EXIT_HLT, EXIT_SHUTDOWN, EXIT_FAIL_ENTRY, EXIT_INTERNAL_ERROR = 2, 5, 8, 9, 17
IO_IN, IO_OUT = 0, 1

# struct kvm_run: immediate_exit at 1, exit_reason at 8, the io exit at 32
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
RUN_IO_OFFSET = 32

# struct kvm_regs: rip at 128, rflags at 136, rsp is GPR 6
REG_RSP, REG_RIP, REG_RFLAGS = 6 * 8, 128, 136
# struct kvm_sregs: 8 segments of 24 octets (cs ds es fs gs ss tr ldt), cr0 at 224
SEGMENT = struct.Struct(
    "<QIHBBBBBBBBBx"
)  # base limit selector type present dpl db s l g avl unusable
SREG_CR0 = 224


class KvmError(OSError):
    pass


def ioctl(fd: int, request: int, arg=0):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise KvmError(exc.errno, f"KVM ioctl {request:#x}: {exc.strerror}") from None


class Vm:
    """One VM with one memory slot and one vCPU, all owned by this process."""

    def __init__(self, memory_map: mmap.mmap, size: int) -> None:
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        try:
            if ioctl(self.kvm, KVM_GET_API_VERSION) != 12:
                raise KvmError(0, "unexpected KVM API version")
            self.fd = ioctl(self.kvm, KVM_CREATE_VM, 0)
            self.size = size
            self._host = ctypes.c_char.from_buffer(memory_map)  # pins the mapping
            region = MEMORY_REGION.pack(
                0, KVM_MEM_LOG_DIRTY_PAGES, 0, size, ctypes.addressof(self._host)
            )
            ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
            self.vcpu = ioctl(self.fd, KVM_CREATE_VCPU, 0)
            run_size = ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
            self.run = mmap.mmap(
                self.vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self.kvm)
            raise
        pages = size >> 12
        self._bitmap = ctypes.create_string_buffer(((pages + 63) // 64) * 8)

    # -- vCPU ---------------------------------------------------------------
    def enter(self) -> int:
        """KVM_RUN once; the exit reason (or -1 when interrupted)."""
        try:
            fcntl.ioctl(self.vcpu, KVM_RUN, 0)
        except InterruptedError:
            return -1
        except OSError as exc:
            raise KvmError(exc.errno, f"KVM_RUN: {exc.strerror}") from None
        return struct.unpack_from("<I", self.run, RUN_EXIT_REASON)[0]

    def complete_pending_io(self) -> None:
        """Finish an I/O exit so the registers are consistent (KVM's api.rst:
        re-enter with immediate_exit set before reading state for migration)."""
        self.run[RUN_IMMEDIATE_EXIT] = 1
        try:
            self.enter()
        finally:
            self.run[RUN_IMMEDIATE_EXIT] = 0

    def io_exit(self) -> tuple[int, int, int, int]:
        direction, size, port, _count, offset = RUN_IO.unpack_from(self.run, RUN_IO_OFFSET)
        return direction, size, port, offset

    def get_regs(self) -> bytes:
        return bytes(ioctl(self.vcpu, KVM_GET_REGS, bytes(REGS_SIZE)))

    def set_regs(self, regs: bytes) -> None:
        ioctl(self.vcpu, KVM_SET_REGS, regs)

    def get_sregs(self) -> bytes:
        return bytes(ioctl(self.vcpu, KVM_GET_SREGS, bytes(SREGS_SIZE)))

    def set_sregs(self, sregs: bytes) -> None:
        ioctl(self.vcpu, KVM_SET_SREGS, sregs)

    # -- dirty log ------------------------------------------------------------
    def dirty_log(self) -> bytes:
        """Pages the guest wrote since the last call (KVM clears as it reports)."""
        ctypes.memset(self._bitmap, 0, len(self._bitmap))
        ioctl(self.fd, KVM_GET_DIRTY_LOG, DIRTY_LOG.pack(0, 0, ctypes.addressof(self._bitmap)))
        return self._bitmap.raw

    def close(self) -> None:
        self.run.close()
        os.close(self.vcpu)
        os.close(self.fd)
        os.close(self.kvm)
        del self._host


def flat_protected_mode(sregs: bytes) -> bytes:
    """Flat 32-bit segments and CR0.PE, as KVM-NOTES.md found sufficient."""
    out = bytearray(sregs)
    code = SEGMENT.pack(0, 0xFFFFFFFF, 0x08, 0xB, 1, 0, 1, 1, 0, 1, 0, 0)
    data = SEGMENT.pack(0, 0xFFFFFFFF, 0x10, 0x3, 1, 0, 1, 1, 0, 1, 0, 0)
    for index in range(6):  # cs ds es fs gs ss
        out[index * 24 : index * 24 + 24] = code if index == 0 else data
    cr0 = struct.unpack_from("<Q", out, SREG_CR0)[0]
    struct.pack_into("<Q", out, SREG_CR0, cr0 | 1)
    return bytes(out)


def boot_regs(rip: int, rsp: int) -> bytes:
    regs = bytearray(REGS_SIZE)
    struct.pack_into("<Q", regs, REG_RSP, rsp)
    struct.pack_into("<Q", regs, REG_RIP, rip)
    struct.pack_into("<Q", regs, REG_RFLAGS, 0x2)
    return bytes(regs)


def kvm_usable() -> bool:
    """True where /dev/kvm opens and a VM can be created here."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != 12:
            return False
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
