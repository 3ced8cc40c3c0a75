"""`ferry demo`: the main job, end to end, leaving nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest

from hypervisor.kvm_api import kvm_usable
from tests.conftest import FERRY, processes_mentioning

KEYS = {
    "backend",
    "memory_bytes",
    "iterations",
    "pages_sent",
    "bytes_sent",
    "total_ms",
    "downtime_ms",
    "policy_rpcs",
    "policy_rpc_p50_us",
    "policy_rpc_p99_us",
    "policy_wait_p50_us",
    "policy_wait_p99_us",
    "throughput_mb_s",
    "integrity",
    "guest_check",
}


def run_demo(*args, expect=0):
    before = set(os.listdir(tempfile.gettempdir()))
    r = subprocess.run(
        [FERRY, "demo", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == expect, r.stderr
    report = json.loads(r.stdout)
    if expect:
        return report
    assert KEYS <= set(report)
    left = {
        d for d in set(os.listdir(tempfile.gettempdir())) - before if d.startswith("ferry-demo-")
    }
    assert not left, f"demo left {left} behind"
    assert not processes_mentioning("ferry-demo-")
    return report


def test_demo_sim():
    r = run_demo("--backend", "sim", "--memory", "64M", "--dirty-rate", "10000")
    assert r["backend"] == "sim" and r["memory_bytes"] == 64 << 20
    assert r["integrity"] == "ok" and r["guest_check"] == "ok"
    assert r["iterations"][0]["pages"] == (64 << 20) // 4096
    assert r["pages_sent"] >= (64 << 20) // 4096 and r["downtime_ms"] > 0
    assert r["source_gone"] and r["destination_state"] == "running"
    assert r["destination_writes_advancing"]


@pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm is missing or cannot create a VM here")
def test_demo_kvm():
    r = run_demo("--backend", "kvm", "--memory", "64M")
    assert r["backend"] == "kvm" and r["integrity"] == "ok" and r["guest_check"] == "ok"
    assert r["destination_writes_advancing"]


def test_demo_steering_flags_reach_the_policy():
    small_ws = run_demo(
        "--backend",
        "sim",
        "--memory",
        "64M",
        "--dirty-rate",
        "20000",
        "--working-set",
        "0.05",
        "--policy",
        "converge",
        "--downtime-limit",
        "5000",
    )
    assert small_ws["settings"]["downtime_limit"] == 5000.0
    assert "within 5000 ms" in small_ws["decision"]
    working_set_pages = int(0.05 * (64 << 20) // 4096)
    assert all(it["pages"] <= working_set_pages for it in small_ws["iterations"][1:])
    xen = run_demo("--backend", "sim", "--memory", "32M", "--policy", "xen")
    assert xen["policy"] == "xen" and set(xen["settings"]) == {"max_dirty", "max_iterations"}
    refused = run_demo(
        "--backend", "sim", "--memory", "32M", "--policy", "xen", "--downtime-limit", "5", expect=1
    )
    assert "policy xen has no setting 'downtime_limit'" in refused["error"]
    assert refused["command"] == "demo"


def postcopy_skip_reason() -> str | None:
    from hypervisor import uffd

    usable, why = uffd.usable()
    return None if usable else why


@pytest.mark.skipif(postcopy_skip_reason() is not None, reason=str(postcopy_skip_reason()))
@pytest.mark.parametrize("backend", ["sim", "kvm"])
def test_demo_postcopy(backend):
    if backend == "kvm" and not kvm_usable():
        pytest.skip("/dev/kvm is missing or cannot create a VM here")
    r = run_demo("--postcopy", "--backend", backend, "--memory", "128M")
    pc = r["postcopy"]
    assert "postcopy after precopy" in r["decision"]
    assert pc["pages"] > 0 and pc["pushed"] + pc["requested"] == pc["pages"]
    assert r["integrity"] == "ok" and r["guest_check"] == "ok"
    assert r["source_gone"] and r["destination_state"] == "running"
    assert r["destination_writes_advancing"]
    assert r["downtime_ms"] > 0 and r["verify_ms"] is None
