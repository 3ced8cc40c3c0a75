"""The kvm backend: a real VM, migrated, saved, restored and checked.

Skipped with the reason where /dev/kvm cannot run a guest."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest

from hypervisor.guest import GUEST_DIR
from hypervisor.kvm_api import kvm_usable
from protocol._gen_runner_msgs import DomainState, Workload
from tests.test_migration import (
    assert_running_and_writing,
    create,
    migrate,
    start_endless_migration,
)

needs_kvm = pytest.mark.skipif(
    not kvm_usable(), reason="/dev/kvm is missing or cannot create a VM here"
)
MiB = 1 << 20


def test_checked_in_guest_binary_matches_its_source():
    if not (shutil.which("as") and shutil.which("objcopy")):
        pytest.skip("GNU binutils (as, objcopy) are not installed")
    with tempfile.TemporaryDirectory() as d:
        obj, binary = os.path.join(d, "g.o"), os.path.join(d, "g.bin")
        subprocess.run(["as", "--32", "-o", obj, str(GUEST_DIR / "guest.S")], check=True)
        subprocess.run(["objcopy", "-O", "binary", obj, binary], check=True)
        assert open(binary, "rb").read() == (GUEST_DIR / "guest.bin").read_bytes(), (
            "run `make guest`"
        )


@needs_kvm
def test_guest_runs_dirties_memory_and_checks_itself(runners):
    _p, path = runners.start(
        memory=16 * MiB, backend="kvm", workload=Workload(20_000.0, 0.5, 0.0, 9)
    )
    with runners.client(path) as c:
        c.logdirty_enable()
        time.sleep(0.3)
        log = c.logdirty_clean()
        assert log.count > 0
        assert c.getinfo().writes > 1000
        assert c.guest_check() == "ok"
        c.pause()
        frozen = c.getinfo().writes
        c.logdirty_clean()  # what it wrote before it stopped
        time.sleep(0.2)
        assert c.getinfo().writes == frozen and c.logdirty_clean().count == 0
        assert c.guest_check() == "ok"  # paused: the runner checks by the guest's rules
        # corrupt every working-set page behind the guest's back: its own
        # check finds one (the guest may rewrite a few before it looks)
        ram = c.map_guest_memory(writable=True)
        _magic, ws, data_start = np.frombuffer(ram.map, dtype="<u4", count=3)
        ram.words[data_start : data_start + ws, 0] ^= np.uint64(1)
        ram.close()
        assert c.guest_check().startswith("runner: page 0 ")
        c.unpause()
        assert c.guest_check().startswith("guest: page ")


@needs_kvm
def test_live_migrate_a_busy_vm_between_daemons(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", memory=64 * MiB, rate=20_000, ws=0.5, backend="kvm")
    time.sleep(0.3)
    report = migrate(a, b, "vm1")
    assert report.integrity == "ok"
    assert a.call("list") == []
    assert_running_and_writing(b, "vm1")
    assert b.call("guest_check", name="vm1") == "ok"


@needs_kvm
def test_save_and_restore_a_vm(cluster, short_tmp):
    a = cluster.daemon("a", listen=False)
    create(a, "vm1", memory=32 * MiB, rate=10_000, backend="kvm")
    time.sleep(0.2)
    path = os.path.join(short_tmp, "vm1.save")
    a.call("save", name="vm1", file=path, live=True)
    a.call("restore", file=path, paused=True)
    assert a.call("guest_check", name="vm1") == "ok"
    a.call("unpause", name="vm1")
    assert_running_and_writing(a, "vm1")
    assert a.call("guest_check", name="vm1") == "ok"


@needs_kvm
def test_aborted_migration_leaves_the_vm_running_on_the_source(cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    create(a, "vm1", memory=32 * MiB, rate=20_000, backend="kvm")
    thread, outcome = start_endless_migration(a, b)
    a.call("job_control", name="vm1", action="abort")
    thread.join(60)
    assert "aborted by the operator" in outcome["error"]
    assert_running_and_writing(a, "vm1")
    assert a.call("guest_check", name="vm1") == "ok"
    deadline = time.monotonic() + 15
    while b.call("list") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.call("list") == []


@needs_kvm
def test_incoming_vm_needs_its_context_before_it_runs(runners):
    _p, path = runners.start(memory=4 * MiB, backend="kvm", incoming=True)
    with runners.client(path) as c:
        with pytest.raises(Exception, match="needs its vCPU context"):
            c.unpause()
        assert c.getinfo().state == DomainState.INCOMING
        with pytest.raises(Exception, match="not a kvm vCPU context"):
            c.set_context(b"junk")
