"""Interrupted training: a run killed (SIGKILL) mid-epoch resumes from its last checkpoint and ends at the
same step count as an uninterrupted run, with no epoch lost or trained twice; with a fixed seed two runs
give the same loss curve."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--network_preset", "tiny", "--n_train_slices", "32", "--n_val_slices", "1", "--crop_size", "32",
        "--batch_size", "2", "--val_interval", "1", "--cache_workers", "0", "--torch_threads", "1",
        "--synthesis#matrix", "[64, 64]", "--max_epochs", "3", "--progress_bar", "False",
        "--train#handlers#1#iteration_log", "1"]
LINE = re.compile(r"Epoch: (\d+)/3, Iter: (\d+)/(\d+) -- train_loss: (\S+)")
VAL = re.compile(r"Epoch\[(\d+)\] Metrics -- .*?val_t1_mape: (\S+)")
BEST = re.compile(r"Key metric: val_t1_mape best value: (\S+) at epoch: (\d+)")


def _bundle(tmp_path, name):
    root = tmp_path / name
    shutil.copytree(REPO / "bundles" / "resnet" / "configs", root / "configs")
    return root


def _cmd(root):
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(root / "configs" / "train.json"),
            "--bundle_root", str(root), *ARGS]


def _run(root):
    r = subprocess.run(_cmd(root), capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def _curve(log):
    return [(int(e), int(i), float(v)) for e, i, _, v in LINE.findall(log)]


def test_killed_run_resumes_to_the_same_step_count_and_runs_are_reproducible(tmp_path):
    a = _run(_bundle(tmp_path, "a"))
    curve_a = _curve(a)
    n_per_epoch = int(LINE.search(a).group(3))
    assert len(curve_a) == 3 * n_per_epoch
    curve_b = _curve(_run(_bundle(tmp_path, "b")))
    assert curve_b == curve_a  # fixed seed: the same loss, iteration by iteration

    # kill a third run in the middle of epoch 2
    root = _bundle(tmp_path, "c")
    p = subprocess.Popen(_cmd(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killed_at = None
    before_kill = []
    for line in p.stdout:
        before_kill.append(line)
        m = LINE.search(line)
        if m and int(m.group(1)) == 2 and int(m.group(2)) == 2:
            p.send_signal(signal.SIGKILL)
            killed_at = (2, 2)
            break
    p.wait(timeout=120)
    assert killed_at and p.returncode == -signal.SIGKILL
    models = root / "models"
    state = torch.load(models / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == n_per_epoch  # epoch 1 was saved before the kill, epoch 2 not yet
    assert sorted(x.name for x in models.iterdir()) == ["checkpoint_last.pt", "model.json", "model.pt"]  # no temp files

    c = _run(root)
    curve_c = _curve(c)
    assert "resumed from" in c
    assert [e for e, _, _ in curve_c] == [2] * n_per_epoch + [3] * n_per_epoch  # epoch 1 not again, 2 and 3 whole
    final = torch.load(models / "checkpoint_last.pt", weights_only=True)["trainer"]
    assert final["iteration"] == 3 * n_per_epoch == len(curve_a)
    assert sorted(x.name for x in models.iterdir()) == ["checkpoint_last.pt", "model.json", "model.pt"]
    assert json.loads((models / "model.json").read_text())["method"] == "resnet"

    # the best validation survives the kill: model.pt is the best of all three epochs, not the best
    # of the epochs after the resume
    val = {int(e): float(v) for e, v in VAL.findall("".join(before_kill) + c)}
    assert sorted(val) == [1, 2, 3]
    best_epoch = min(val, key=val.get)
    final_best = BEST.findall(c)[-1]
    assert float(final_best[0]) == pytest.approx(val[best_epoch], abs=1e-4) and int(final_best[1]) == best_epoch
    best = torch.load(models / "checkpoint_last.pt", weights_only=True)["best"]
    assert best["best_metric_epoch"] == best_epoch and len(best["saved"]) == 1
