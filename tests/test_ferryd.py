"""ferryd's own command line: every flag, through the installed executable."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from conftest import ferry

from toolstack.harness import LocalHosts
from toolstack.harness.local import executable


def test_control_puts_the_socket_elsewhere_and_log_level_sets_what_is_logged(short_tmp):
    hosts = LocalHosts(root=short_tmp)
    try:
        custom = os.path.join(short_tmp, "elsewhere.sock")
        quiet = hosts.start(
            "quiet", listen=False, args=["--control", custom, "--log-level", "warning"]
        )
        assert quiet.socket == custom
        assert ferry(quiet, "list", "--json").stdout.strip() == "[]"
        assert not os.path.exists(os.path.join(quiet.state, "control.sock"))
        assert oct(os.stat(custom).st_mode & 0o777) == "0o600"
        loud = hosts.start("loud", listen=False, args=["--log-level", "debug"])
        ferry(loud, "list")
    finally:
        hosts.close()
    with open(quiet.log) as f:
        assert "ferryd serving" not in f.read()  # info lines are below warning
    with open(loud.log) as f:
        text = f.read()
    assert "ferryd serving" in text and "control: list" in text


@pytest.mark.parametrize(
    "args, says",
    [
        (["--listen", "127.0.0.1:0"], "--listen needs --auth-key"),
        (["--policy-budget-ms", "0"], "--policy-budget-ms must be within"),
        (["--policy-budget-ms", "inf"], "--policy-budget-ms must be within"),
        (["--max-overcommit", "0"], "--max-overcommit must be within"),
        (["--deadline", "helper=fast"], "is not a number"),
        (["--deadline", "coffee=3"], "NAME one of"),
        (["--auth-key", "OPEN"], "is readable by others"),
        (["--listen", "nowhere", "--auth-key", "KEY"], "is not HOST:PORT"),
        (["--auth-key", "/nonexistent/key"], "cannot read auth key"),
        (["--auth-key", "SHORT"], "shorter than 16 octets"),
    ],
)
def test_bad_ferryd_flags_are_one_line(short_tmp, args, says):
    key = os.path.join(short_tmp, "key")
    short = os.path.join(short_tmp, "short")
    open_key = os.path.join(short_tmp, "open")
    for path, text, mode in (
        (key, "k" * 32, 0o600),
        (short, "k" * 4, 0o600),
        (open_key, "k" * 32, 0o644),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
        os.write(fd, text.encode())
        os.close(fd)
        os.chmod(path, mode)
    names = {"KEY": key, "SHORT": short, "OPEN": open_key}
    args = [names.get(a, a) for a in args]
    r = subprocess.run(
        [*executable("ferryd", "toolstack.daemon"), "--state-dir", short_tmp + "/s", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_one_ferryd_per_state_dir(cluster):
    a = cluster.daemon("a", listen=False)
    r = subprocess.run(
        [*executable("ferryd", "toolstack.daemon"), "--state-dir", a.state],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "another ferryd runs on --state-dir" in r.stderr
    assert ferry(a, "list", "--json").stdout.strip() == "[]"  # the first serves on


def test_the_deadline_table_in_the_docs_is_the_one_ferryd_uses():
    from dataclasses import fields
    from pathlib import Path

    from toolstack.host.deadlines import Deadlines

    text = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([\d.]+) s \|", text, re.M))
    assert rows == {f.name: f"{f.default:g}" for f in fields(Deadlines)}
