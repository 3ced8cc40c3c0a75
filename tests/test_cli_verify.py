"""`ferry verify-stream` on valid, truncated and random files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.streams import libxc_stream, libxl_stream, save_file


def ferry(*args):
    return subprocess.run(
        [sys.executable, "-m", "toolstack", *args], capture_output=True, text=True, timeout=60
    )


def test_valid_save_file(tmp_path):
    path = tmp_path / "vm.save"
    path.write_bytes(save_file())
    r = ferry("verify-stream", str(path), "-v")
    assert r.returncode == 0, r.stderr
    assert "valid xl stream" in r.stdout and "pages: 4" in r.stdout
    assert "PAGE_DATA: 1 record(s)" in r.stdout


def test_json_summary_and_explicit_formats(tmp_path):
    for fmt, data in (("libxl", libxl_stream()), ("libxc", libxc_stream())):
        path = tmp_path / fmt
        path.write_bytes(data)
        r = ferry("verify-stream", str(path), "--format", fmt, "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["format"] == fmt and out["pages"] == 4 and out["valid"]


def test_truncated_file_names_the_offset(tmp_path):
    path = tmp_path / "cut.save"
    path.write_bytes(save_file()[:-100])
    r = ferry("verify-stream", str(path))
    assert r.returncode == 1
    assert "truncated" in r.stderr and "at offset" in r.stderr
    assert "Traceback" not in r.stderr


def test_random_file_and_missing_file(tmp_path):
    path = tmp_path / "random"
    path.write_bytes(os.urandom(10_000))
    r = ferry("verify-stream", str(path))
    assert r.returncode == 1 and "invalid" in r.stderr and "Traceback" not in r.stderr
    r = ferry("verify-stream", str(tmp_path / "nope"))
    assert r.returncode == 1 and "No such file" in r.stderr and "Traceback" not in r.stderr
