"""Every option of every `ferry` command, through the installed executable
against real daemons, asserting what it changed (not only the exit status)."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import ferry
from streams import libxc_stream, save_file

MiB = 1 << 20


def as_json(r):
    return json.loads(r.stdout)


def create(daemon, name, *flags):
    return as_json(ferry(daemon, "create", name, "--memory", "32M", *flags, "--json"))


def wait_gone(daemon, name, seconds=15):
    deadline = time.monotonic() + seconds
    while any(d.name == name for d in daemon.call("list")) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture
def pair(cluster):
    return cluster.daemon("a", listen=False), cluster.daemon("b")


def test_create_flags_reach_the_domain(pair):
    a, _b = pair
    made = create(
        a,
        "vm1",
        "--backend",
        "sim",
        "--dirty-rate",
        "1234",
        "--working-set",
        "0.5",
        "--skew",
        "0.25",
        "--seed",
        "7",
        "--paused",
    )
    assert made["state"] == "paused" and made["memory_bytes"] == 32 * MiB
    listed = as_json(ferry(a, "list", "--json"))
    assert listed[0]["config"] == {
        "name": "vm1",
        "memory_bytes": 32 * MiB,
        "backend": "sim",
        "dirty_rate": 1234.0,
        "working_set": 0.5,
        "skew": 0.25,
        "seed": 7,
    }
    assert listed[0]["writes"] == 0  # paused from the start: it never ran
    ferry(a, "unpause", "vm1")
    time.sleep(0.3)
    assert a.call("info", name="vm1").writes > 0
    ferry(a, "pause", "vm1")
    digest = ferry(a, "digest", "vm1").stdout.strip()
    assert digest == ferry(a, "digest", "vm1").stdout.strip() and len(digest) == 64
    assert ferry(a, "guest-check", "vm1").stdout.strip() == "ok"
    ferry(a, "destroy", "vm1")
    assert as_json(ferry(a, "list", "--json")) == []


def test_migrate_flags_reach_the_converge_policy(pair):
    a, b = pair
    create(a, "vm1", "--dirty-rate", "20000")
    report = as_json(
        ferry(
            a,
            "migrate",
            "vm1",
            b.address,
            "--policy",
            "converge",
            "--downtime-limit",
            "20",
            "--max-iterations",
            "200",
            "--precopy-timeout",
            "600",
            "--fallback",
            "abort",
            "--verify",
            "--json",
        )
    )
    assert report["settings"] == {
        "downtime_limit": 20.0,
        "max_iterations": 200,
        "precopy_timeout": 600.0,
        "fallback": "abort",
    }
    assert report["integrity"] == "ok" and "within 20 ms" in report["decision"]
    assert as_json(ferry(a, "job", "vm1", "--json"))["settings"]["downtime_limit"] == 20.0


def test_the_fallback_abort_leaves_the_source_running(pair):
    a, b = pair
    create(a, "vm1", "--dirty-rate", "40000")
    r = ferry(
        a,
        "migrate",
        "vm1",
        b.address,
        "--downtime-limit",
        "0",
        "--max-iterations",
        "2",
        "--fallback",
        "abort",
        check=False,
    )
    assert r.returncode == 1
    assert "2 iterations without converging; fallback: abort" in r.stderr
    assert a.call("info", name="vm1").state == "running"
    wait_gone(b, "vm1")
    assert b.call("list") == []


def test_a_precopy_timeout_takes_the_fallback(pair):
    a, b = pair
    create(a, "vm1", "--dirty-rate", "40000")
    report = as_json(
        ferry(
            a,
            "migrate",
            "vm1",
            b.address,
            "--set",
            "downtime_limit=0",
            "--set",
            "max_iterations=1000000",
            "--precopy-timeout",
            "0.5",
            "--fallback",
            "stop-and-copy",
            "--json",
        )
    )
    assert "precopy timeout of 0.5 s reached; fallback: stop-and-copy" in report["decision"]
    assert b.call("info", name="vm1").state == "running"


def test_xens_own_flag_names_steer_the_xen_policy(pair):
    a, b = pair
    create(a, "vm1", "--dirty-rate", "40000")
    report = as_json(
        ferry(
            a,
            "migrate",
            "vm1",
            b.address,
            "--policy",
            "xen",
            "--precopy-iterations",
            "3",
            "--precopy-threshold",
            "0",
            "--json",
        )
    )
    assert report["settings"] == {"max_dirty": 0, "max_iterations": 3}
    assert "3 iterations done" in report["decision"]
    passes = report["iterations"]
    assert passes[-1]["final"] and len([p for p in passes if p["pages"]]) <= 5


def test_bad_settings_are_refused_before_anything_starts(pair):
    a, b = pair
    create(a, "vm1")
    cases = [
        (
            ["--policy", "xen", "--downtime-limit", "20"],
            "policy xen has no setting 'downtime_limit'",
        ),
        (["--set", "max_iterations=3", "--max-iterations", "4"], "already set"),
        (["--set", "nonsense"], "--set needs KEY=VALUE"),
        (["--set", "downtime_limit=soon"], "downtime_limit: 'soon' is not a number"),
        (["--set", "max_iterations=-1"], "max_iterations must not be negative"),
        (["--set", "max_iterations=99999999999999999999999"], "is not an integer"),
        (["--set", "max_iterations=\u0663"], "is not an integer"),  # an Arabic-Indic 3
        (["--policy", "nosuch"], "unknown policy 'nosuch'"),
        (["--max-iterations", "99999999999999999999999"], "is not an integer"),
    ]
    for flags, text in cases:
        r = ferry(a, "migrate", "vm1", b.address, *flags, check=False)
        assert r.returncode == 1 and text in r.stderr, (flags, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    for n in ("0", "9", "99999999999999999999999", "two"):  # argparse's own refusal
        r = ferry(a, "migrate", "vm1", b.address, "--parallel-connections", n, check=False)
        assert r.returncode == 2 and "--parallel-connections" in r.stderr, r.stderr
    assert a.call("info", name="vm1").state == "running"
    assert b.call("list") == []


def test_json_errors_are_json_on_stdout(pair):
    a, _b = pair
    r = ferry(a, "migrate", "nosuch", "127.0.0.1:1", "--json", check=False)
    assert r.returncode == 1 and r.stderr == ""
    assert as_json(r) == {"command": "migrate", "error": "no domain named 'nosuch'"}
    r = ferry(a, "job", "nosuch", "--json", check=False)
    assert as_json(r)["error"] == "no job for domain 'nosuch'"
    r = ferry(a, "create", "bad name", "--memory", "1M", "--json", check=False)
    assert "names are" in as_json(r)["error"]
    r = ferry(a, "migrate", "vm1", "h:1", "--max-iterations", "abc", "--json", check=False)
    assert r.returncode == 2 and r.stderr == ""  # a usage error, as JSON too
    assert as_json(r)["command"] == "migrate" and "invalid int value" in as_json(r)["error"]


def test_save_flags_and_restore_flags(pair, short_tmp):
    a, _b = pair
    create(a, "vm1", "--dirty-rate", "20000")
    path = os.path.join(short_tmp, "vm1.save")
    r = ferry(a, "save", "vm1", path, "--set", "max_iterations=1", check=False)
    assert r.returncode == 1 and "add --live" in r.stderr
    r = ferry(a, "save", "vm1", path, "--policy", "converge", check=False)
    assert r.returncode == 1 and "add --live" in r.stderr
    saved = as_json(
        ferry(
            a,
            "save",
            "vm1",
            path,
            "--live",
            "--keep",
            "--policy",
            "xen",
            "--set",
            "max_iterations=1",
            "--json",
        )
    )
    assert saved["kind"] == "save" and saved["phase"] == "completed"
    assert saved["running_after_ms"] is None  # a save runs no guest anywhere
    assert saved["policy"] == "xen" and saved["settings"]["max_iterations"] == 1
    assert "1 iterations done" in saved["decision"]
    assert a.call("info", name="vm1").state == "running"  # --keep
    restored = as_json(ferry(a, "restore", path, "--name", "copy", "--paused", "--json"))
    assert restored["kind"] == "restore" and restored["domain"] == "copy"
    assert restored["phase"] == "completed" and restored["running"] is False
    pages = restored["memory_total_bytes"] // 4096
    assert restored["pages_sent"] >= pages  # every page counted, not the last progress's
    assert restored["memory_remaining_bytes"] in (None, 0)
    assert a.call("info", name="copy").state == "paused"
    assert as_json(ferry(a, "job", "copy", "--json"))["kind"] == "restore"
    assert ferry(a, "guest-check", "copy").stdout.strip() == "ok"
    human = ferry(a, "restore", path, "--name", "third").stdout
    assert "restored third (running)" in human
    assert a.call("info", name="third").state == "running"
    ferry(a, "save", "third", path)
    assert all(d.name != "third" for d in a.call("list"))  # gone without --keep


def test_job_control_refuses_what_makes_no_sense(pair):
    a, _b = pair
    create(a, "vm1")
    r = ferry(a, "job-control", "vm1", "abort", "x=1", check=False)
    assert r.returncode == 1 and "abort takes no KEY=VALUE" in r.stderr
    r = ferry(a, "job-control", "vm1", "set", check=False)
    assert r.returncode == 1 and "set needs KEY=VALUE" in r.stderr
    r = ferry(a, "job-control", "vm1", "stop-and-copy", check=False)
    assert r.returncode == 1 and "no running job" in r.stderr


def test_policies_lists_settings_and_defaults(pair):
    a, _b = pair
    listed = {p["name"]: p for p in as_json(ferry(a, "policies", "--json"))}
    assert set(listed) == {"xen", "converge"}
    converge = {s["name"]: s for s in listed["converge"]["settings"]}
    assert converge["downtime_limit"] == {
        "name": "downtime_limit",
        "type": "float",
        "default": 300.0,
    }
    assert listed["xen"]["origin"] == "builtin" and listed["xen"]["budget_ms"] == 2.0
    human = ferry(a, "policies").stdout
    assert "max_dirty (int, default 50)" in human


def test_verify_stream_flags(pair, short_tmp):
    a, _b = pair
    libxc = os.path.join(short_tmp, "bare.libxc")
    with open(libxc, "wb") as f:
        f.write(libxc_stream())
    r = ferry(a, "verify-stream", libxc, "--format", "libxc", "--json")
    report = as_json(r)
    assert report["valid"] and report["format"] == "libxc" and report["pages"] == 4
    wrong = ferry(a, "verify-stream", libxc, "--format", "xl", "--json", check=False)
    assert wrong.returncode == 1 and as_json(wrong)["valid"] is False
    assert "bad magic" in as_json(wrong)["error"] and as_json(wrong)["offset"] == 0
    verbose = ferry(a, "verify-stream", libxc, "-v").stdout
    assert (
        "X86_TSC_INFO" in verbose and "X86_TSC_INFO" not in ferry(a, "verify-stream", libxc).stdout
    )
    also_verbose = ferry(a, "verify-stream", libxc, "--verbose").stdout
    assert also_verbose == verbose
    cut = os.path.join(short_tmp, "cut.save")
    with open(cut, "wb") as f:
        f.write(save_file()[:-20])
    bad = ferry(a, "verify-stream", cut, "--json", check=False)
    report = as_json(bad)
    assert bad.returncode == 1 and report["valid"] is False and "truncated" in report["error"]
    assert report["format"] == "xl" and report["offset"] > 0


def test_a_domain_belongs_to_one_job_however_fast_the_requests_come(pair):
    """Migrations of one domain asked for at once: one runs, the others are refused."""
    import threading

    from toolstack.cli import DaemonClient, DaemonError

    a, b = pair
    create(a, "vm1", "--dirty-rate", "20000")
    outcomes = []

    def ask():
        try:
            with DaemonClient(a.socket) as d:
                outcomes.append(d.migrate(name="vm1", address=b.address).phase)
        except DaemonError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes.count("completed") == 1
    refused = [o for o in outcomes if o != "completed"]
    assert all("belongs to a migrate job" in o or "no domain named" in o for o in refused), refused
    assert b.call("guest_check", name="vm1") == "ok"


def test_a_failed_restore_does_not_hide_a_running_job(pair, short_tmp):
    a, b = pair
    create(a, "vm1", "--dirty-rate", "40000")
    path = os.path.join(short_tmp, "other.save")
    create(a, "other")
    ferry(a, "save", "other", path)
    import threading

    endless = ["--policy", "xen", "--set", "max_dirty=0", "--set", "max_iterations=1000000"]
    thread = threading.Thread(target=ferry, args=(a, "migrate", "vm1", b.address, *endless))
    thread.start()
    deadline = time.monotonic() + 30
    while a.call("job", name="vm1").phase != "precopy" if _has_job(a) else True:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = ferry(a, "restore", path, "--name", "vm1", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    job = a.call("job", name="vm1")
    assert job.kind == "migrate" and job.running
    ferry(a, "job-control", "vm1", "stop-and-copy")
    thread.join(60)
    assert b.call("info", name="vm1").state == "running"


def _has_job(daemon) -> bool:
    from toolstack.cli import DaemonError

    try:
        daemon.call("job", name="vm1")
        return True
    except DaemonError:
        return False


def test_converge_takes_an_empty_pass_for_convergence(pair):
    """A quiet guest whose passes find nothing dirty has converged, even before a
    bandwidth could be measured: no abort for 'not converging'."""
    a, b = pair
    ferry(a, "create", "vm1", "--memory", "16M", "--dirty-rate", "200")
    r = ferry(
        a, "migrate", "vm1", b.address, "--max-iterations", "3", "--fallback", "abort", "--json"
    )
    assert json.loads(r.stdout)["phase"] == "completed"


def test_restore_refuses_what_is_not_a_save_file(pair, short_tmp):
    a, _b = pair
    for path, says in (("/", "not a regular file"), ("/dev/null", "not a regular file")):
        r = ferry(a, "restore", path, check=False)
        assert r.returncode == 1 and says in r.stderr, r.stderr
    from toolstack.cli import DaemonClient, DaemonError

    with DaemonClient(a.socket) as d:
        with pytest.raises(DaemonError, match="cannot read"):
            d.restore(file="/tmp/with\0nul")
        assert d.list() == []  # and the connection still serves


def test_a_number_too_large_to_encode_is_one_line_not_a_traceback():
    """The CLI's last guard: whatever value slips past the flags' own checks
    and cannot be packed is a DaemonError that names the call."""
    from toolstack.cli.daemon_client import DaemonError, _Calls

    class Unpackable:
        def call(self, message):
            raise OverflowError("int too big to convert")

    class Migrate:
        pass

    with pytest.raises(DaemonError, match=r"^migrate: a value is out of range \(int too big"):
        _Calls(Unpackable(), 1.0).call(Migrate())
