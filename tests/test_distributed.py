"""Multi-process training with the bundles' multi_gpu_train.json under torchrun: 2 CPU processes (gloo)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--network_preset", "tiny", "--n_train_slices", "4", "--n_val_slices", "1", "--crop_size", "32",
        "--val_interval", "1", "--cache_workers", "0", "--torch_threads", "1", "--synthesis#matrix", "[64, 64]",
        "--batch_size", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch built without gloo")
def test_torchrun_two_ranks_train_together_and_only_rank0_writes(tmp_path):
    root = tmp_path / "resnet"
    shutil.copytree(REPO / "bundles" / "resnet" / "configs", root / "configs")
    configs = json.dumps([str(root / "configs" / "train.json"), str(root / "configs" / "multi_gpu_train.json")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "monai.bundle", "run", "training", "--config_file", configs,
           "--bundle_root", str(root), "--max_epochs", "2", *TINY,
           # each process gets its own output folder (torchrun sets RANK): a file written by rank 1 would show
           "--ckpt_dir", f"$os.path.join({str(root / 'models')!r}, 'rank' + os.environ['RANK'])"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    found = {int(m.group(1)): m for m in re.finditer(
        r"rank (\d) of 2 trained (\d+) epochs, (\d+) iterations \((\d+) per epoch\); weights checksum (\S+)", log)}
    assert sorted(found) == [0, 1], log[-3000:]
    assert "train [2/2]" in log  # rank 0's progress bar
    # both ranks ran every epoch, each on its half of the 4 training slices (DistributedSampler: batch 2 -> 1 iteration)
    for m in found.values():
        assert int(m.group(2)) == 2 and int(m.group(4)) == 1 and int(m.group(3)) == 2
    # DDP: gradients averaged, so both ranks end with the same weights
    assert float(found[0].group(5)) == pytest.approx(float(found[1].group(5)), rel=1e-6)
    # one writer: one checkpoint, one best model and its card; the model is rank 0's network
    models = root / "models" / "rank0"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_last.pt", "model.json", "model.pt"]
    assert [p for p in (root / "models").rglob("*") if p.is_file() and "rank0" not in p.parts] == []
    state = torch.load(models / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and state["trainer"]["epoch_length"] == 1
    saved = sum(float(v.double().sum()) for k, v in state["network"].items() if "running" not in k and "num_batches" not in k)
    assert saved == pytest.approx(float(found[0].group(5)), rel=1e-6)
