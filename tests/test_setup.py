"""The Makefile's torch install (issue 19, item 9): the CPU index by default, an override for a plain
index, and a fallback where the CPU index cannot be reached or fails -- run for real by make, with a
stand-in for the venv's python that records every call instead of installing anything."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# The stand-in: logs its arguments; the torch version check fails (no torch yet) unless FAKE_TORCH=yes,
# the reachability probe and the install from an index succeed only when told to.
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$*" in
  *importlib.metadata*) [ "$FAKE_TORCH" = yes ] && exit 0 || exit 1 ;;
  *urlopen*) [ "$FAKE_PROBE" = ok ] && exit 0 || exit 1 ;;
  *--index-url*) [ "$FAKE_INDEX" = ok ] && exit 0 || exit 1 ;;
  *) exit 0 ;;
esac
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make_venv(tmp_path, probe="ok", index="ok", torch_installed=False, *make_args):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(py.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_PROBE": probe, "FAKE_INDEX": index,
           "FAKE_TORCH": "yes" if torch_installed else "no"}
    env.pop("TORCH_INDEX", None)
    env.pop("MAKEFLAGS", None)
    r = subprocess.run(["make", "--no-print-directory", "-B", "-C", str(REPO), "venv", f"VENV={venv}", *make_args],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text().splitlines()
    torch_installs = [c for c in calls if c.startswith("-m pip install") and "torch==2.13.0" in c]
    assert (venv / ".installed").exists()
    return r.stdout, calls, torch_installs


def test_default_installs_torch_from_the_cpu_index(tmp_path):
    out, calls, installs = make_venv(tmp_path, "ok", "ok")
    assert installs == [f"-m pip install -q torch==2.13.0 --index-url {CPU_INDEX}"]
    assert any(f"urlopen('{CPU_INDEX}/torch/'" in c for c in calls)
    assert calls.index("-m pip install -q -e .[test,plots]") > calls.index(installs[0])  # the project after torch


def test_failed_cpu_index_install_falls_back_to_the_plain_pin(tmp_path):
    out, calls, installs = make_venv(tmp_path, "ok", "fail")
    assert installs == [f"-m pip install -q torch==2.13.0 --index-url {CPU_INDEX}", "-m pip install -q torch==2.13.0"]
    assert "falling back" in out


def test_unreachable_cpu_index_is_not_tried_and_the_plain_pin_is_installed(tmp_path):
    # an unreachable index would cost pip's retries for torch and each of its dependencies
    out, calls, installs = make_venv(tmp_path, "fail", "fail")
    assert installs == ["-m pip install -q torch==2.13.0"]
    assert "cannot be reached" in out


def test_empty_torch_index_uses_pip_configuration_without_probe(tmp_path):
    out, calls, installs = make_venv(tmp_path, "ok", "ok", False, "TORCH_INDEX=")
    assert installs == ["-m pip install -q torch==2.13.0"]
    assert not any("urlopen" in c for c in calls)


def test_other_index_is_passed_through(tmp_path):
    idx = "https://example.invalid/whl/cu128"
    out, calls, installs = make_venv(tmp_path, "ok", "ok", False, f"TORCH_INDEX={idx}")
    assert installs == [f"-m pip install -q torch==2.13.0 --index-url {idx}"]


def test_installed_torch_is_kept(tmp_path):
    out, calls, installs = make_venv(tmp_path, "fail", "fail", True)
    assert installs == [] and not any("urlopen" in c for c in calls)
