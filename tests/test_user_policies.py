"""Policies users write: loaded by ferryd from --policy-module or entry points,
steering real migrations, and failing only their own job when they misbehave."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time

import pytest
from conftest import ferry

from hypervisor import RunnerClient
from toolstack.harness.local import executable

POLICY_FILE = textwrap.dedent(
    '''
    """Test policies, outside the project."""
    import time

    from toolstack import Decision, Policy


    class StopAt(Policy):
        """Stop and copy at a chosen iteration."""

        SETTINGS = {"at": int, "label": str}

        def __init__(self):
            super().__init__()
            self.at = 2
            self.label = "custom"

        def rule(self, stats, estimate):
            if stats.iteration >= self.at:
                self.reason = f"{self.label}: reached iteration {self.at}"
                return Decision.STOP_AND_COPY
            return Decision.CONTINUE_PRECOPY


    class Raises(Policy):
        def rule(self, stats, estimate):
            if stats.iteration >= 1:
                return 1 / 0
            return Decision.CONTINUE_PRECOPY


    class AnswersJunk(Policy):
        def rule(self, stats, estimate):
            return "stop" if stats.iteration >= 1 else Decision.CONTINUE_PRECOPY


    class Slow(Policy):
        def rule(self, stats, estimate):
            if stats.iteration >= 1:
                end = time.perf_counter() + 0.02
                while time.perf_counter() < end:  # 20 ms of CPU
                    pass
            return Decision.CONTINUE_PRECOPY if stats.iteration < 3 else Decision.STOP_AND_COPY


    class Hangs(Policy):
        def rule(self, stats, estimate):
            if stats.iteration >= 1:
                time.sleep(30)
            return Decision.CONTINUE_PRECOPY


    class Exits(Policy):
        def rule(self, stats, estimate):
            raise SystemExit(3)


    class SlowCheck(Policy):
        SETTINGS = {"x": int}

        def __init__(self):
            super().__init__()
            self.x = 1

        def check_setting(self, key, value):
            time.sleep(5)

        def rule(self, stats, estimate):
            return Decision.STOP_AND_COPY


    POLICIES = {
        "stop-at": StopAt,
        "raises": Raises,
        "answers-junk": AnswersJunk,
        "slow": Slow,
        "hangs": Hangs,
        "exits": Exits,
        "slow-check": SlowCheck,
    }
    '''
)
MiB = 1 << 20


@pytest.fixture
def policy_file(short_tmp):
    path = os.path.join(short_tmp, "my_policies.py")
    with open(path, "w") as f:
        f.write(POLICY_FILE)
    return path


def start_pair(cluster, *args, env=None):
    a = cluster.daemon("a", listen=False, args=args, env=env)
    b = cluster.daemon("b")
    ferry(a, "create", "vm1", "--memory", "32M", "--dirty-rate", "30000")
    return a, b


def test_a_policy_from_a_file_outside_the_project_steers_a_real_migration(cluster, policy_file):
    a, b = start_pair(cluster, "--policy-module", policy_file)
    listed = {p["name"]: p for p in json.loads(ferry(a, "policies", "--json").stdout)}
    assert listed["stop-at"]["origin"] == f"--policy-module {policy_file}"
    assert listed["stop-at"]["doc"] == "Stop and copy at a chosen iteration."
    assert {s["name"]: s["default"] for s in listed["stop-at"]["settings"]} == {
        "at": 2,
        "label": "custom",
    }
    r = ferry(
        a,
        "migrate",
        "vm1",
        b.address,
        "--policy",
        "stop-at",
        "--set",
        "at=3",
        "--set",
        "label=mine",
        "--verify",
        "--json",
    )
    report = json.loads(r.stdout)
    assert report["policy"] == "stop-at" and report["settings"] == {"at": 3, "label": "mine"}
    assert "mine: reached iteration 3" in report["decision"]
    assert report["integrity"] == "ok"
    assert b.call("guest_check", name="vm1") == "ok"
    bad = ferry(b, "migrate", "vm1", "127.0.0.1:1", "--policy", "stop-at", check=False)
    assert bad.returncode == 1 and "unknown policy 'stop-at'" in bad.stderr  # b did not load it


@pytest.mark.parametrize(
    "policy, says",
    [
        ("raises", "policy 'raises' raised ZeroDivisionError: division by zero"),
        ("answers-junk", "policy 'answers-junk' answered 'stop', which is not a Decision"),
        ("slow", "policy 'slow' took"),
        ("hangs", "policy 'hangs' did not answer within 50 ms and was stopped"),
        ("exits", "policy 'exits' raised SystemExit: 3"),
    ],
)
def test_a_policy_that_breaks_its_contract_fails_only_its_job(cluster, policy_file, policy, says):
    a, b = start_pair(cluster, "--policy-module", policy_file)
    started = time.monotonic()
    r = ferry(a, "migrate", "vm1", b.address, "--policy", policy, check=False)
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30  # a hung policy was stopped, not waited for
    if policy == "slow":
        assert "over its budget of 2 ms" in r.stderr
    # the source is exactly as it was: running, log-dirty off, nobody owns it
    with RunnerClient(os.path.join(a.state, "domains", "vm1.sock"), timeout=10) as runner:
        info = runner.getinfo()
        assert info.state.name == "RUNNING" and not info.logdirty
    assert a.call("info", name="vm1").job is None
    job = a.call("job", name="vm1")
    assert job.phase == "failed" and says in job.error
    # ferryd serves on, and the destination holds nothing
    assert [d.name for d in a.call("list")] == ["vm1"]
    deadline = time.monotonic() + 15
    while b.call("list") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.call("list") == []


def test_the_budget_is_the_daemons_to_set(cluster, policy_file):
    a, b = start_pair(cluster, "--policy-module", policy_file, "--policy-budget-ms", "100")
    report = json.loads(ferry(a, "migrate", "vm1", b.address, "--policy", "slow", "--json").stdout)
    assert report["phase"] == "completed"
    assert json.loads(ferry(a, "policies", "--json").stdout)[0]["budget_ms"] == 100.0


def test_a_policy_module_by_its_importable_name(cluster, policy_file, short_tmp):
    env = dict(os.environ, PYTHONPATH=short_tmp)
    a, _b = start_pair(cluster, "--policy-module", "my_policies", env=env)
    names = [p["name"] for p in json.loads(ferry(a, "policies", "--json").stdout)]
    assert "stop-at" in names and "xen" in names


def test_policies_from_installed_entry_points(cluster, short_tmp):
    site = os.path.join(short_tmp, "site")
    dist = os.path.join(site, "ferry_test_policies-1.0.dist-info")
    os.makedirs(dist)
    with open(os.path.join(site, "ferry_test_policies.py"), "w") as f:
        f.write(POLICY_FILE)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: ferry-test-policies\nVersion: 1.0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write("[ferry.policies]\nep-stop = ferry_test_policies:StopAt\n")
    env = dict(os.environ, PYTHONPATH=site)
    a, b = start_pair(cluster, env=env)
    listed = {p["name"]: p for p in json.loads(ferry(a, "policies", "--json").stdout)}
    assert listed["ep-stop"]["origin"] == "entry point ep-stop (ferry-test-policies)"
    report = json.loads(
        ferry(a, "migrate", "vm1", b.address, "--policy", "ep-stop", "--json").stdout
    )
    assert "custom: reached iteration 2" in report["decision"]


@pytest.mark.parametrize(
    "module, says",
    [
        ("/nonexistent/policies.py", "no such file"),
        ("no_such_module_anywhere", "ModuleNotFoundError"),
        ("EMPTY", "defines no POLICIES"),
        ("CLASH", "the name is taken by builtin"),
        ("NOTAPOLICY", "is not a subclass of toolstack.Policy"),
        ("SYNTAX", "SyntaxError"),
    ],
)
def test_a_broken_policy_module_stops_ferryd_with_one_line(short_tmp, module, says):
    bodies = {
        "EMPTY": "x = 1\n",
        "CLASH": "from toolstack.policies import XenPolicy\nPOLICIES = {'xen': XenPolicy}\n",
        "NOTAPOLICY": "POLICIES = {'thing': dict}\n",
        "SYNTAX": "def broken(:\n",
    }
    if module in bodies:
        path = os.path.join(short_tmp, f"{module.lower()}.py")
        with open(path, "w") as f:
            f.write(bodies[module])
        module = path
    cmd = executable("ferryd", "toolstack.daemon")
    r = subprocess.run(
        [*cmd, "--state-dir", os.path.join(short_tmp, "s"), "--policy-module", module],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_policys_own_setting_check_runs_under_the_budget_too(cluster, policy_file):
    a, b = start_pair(cluster, "--policy-module", policy_file)
    started = time.monotonic()
    r = ferry(a, "migrate", "vm1", b.address, "--policy", "slow-check", "--set", "x=2", check=False)
    assert r.returncode == 1 and "policy 'slow-check' did not take x within 50 ms" in r.stderr
    assert time.monotonic() - started < 3  # not the 5 s it wanted
    assert [d.name for d in a.call("list")] == ["vm1"]


@pytest.mark.parametrize(
    "body, says",
    [
        (
            "class P(Policy):\n    def __init__(self):\n        raise RuntimeError('no')\n"
            "    def rule(self, s, e): pass\n",
            "policy 'p' raised RuntimeError: no",
        ),
        (
            "class P(Policy):\n    SETTINGS = {'reason': str}\n    def rule(self, s, e): pass\n",
            "'reason' cannot be a setting's name",
        ),
        (
            "class P(Policy):\n    SETTINGS = {'ghost': int}\n    def rule(self, s, e): pass\n",
            "has no 'ghost' (its default)",
        ),
        (
            "class P(Policy):\n    SETTINGS = {'x': int}\n    x = 2**70\n    def rule(self, s, e): pass\n",
            "default of x: 1180591620717411303424 is out of range",
        ),
        (
            "class P(Policy):\n    SETTINGS = ['x']\n    def rule(self, s, e): pass\n",
            "SETTINGS is not a dict",
        ),
        ("import sys\nsys.exit(0)\n", "SystemExit"),
    ],
)
def test_a_policy_class_is_checked_whole_when_it_loads(short_tmp, body, says):
    path = os.path.join(short_tmp, "bad_policy.py")
    with open(path, "w") as f:
        f.write(
            "from toolstack import Policy\n" + body + "POLICIES = {'p': P}\n"
            if "class" in body
            else body
        )
    cmd = executable("ferryd", "toolstack.daemon")
    r = subprocess.run(
        [*cmd, "--state-dir", os.path.join(short_tmp, "s"), "--policy-module", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
