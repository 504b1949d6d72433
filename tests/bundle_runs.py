"""Shared helpers of the tests that run a bundle's configs through `python -m monai.bundle` in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "diffusor"


def tiny_training(root: Path, extra_config: str, model_name: str, *args: str) -> tuple[str, dict, dict]:
    """`monai.bundle run training` with the diffusor's train.json + ``extra_config`` (a file name in its
    configs/) in a copy of the configs under ``root``: a tiny network, 2 slices, one epoch, 32 x 32 crops.
    Asserts that it succeeded; returns its output, the card and the tensors of ``models/<model_name>``."""
    shutil.copytree(BUNDLE / "configs", root / "configs")
    cfg = str([str(root / "configs" / "train.json"), str(root / "configs" / extra_config)])
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", cfg,
                           "--bundle_root", str(root), "--network_preset", "tiny", "--n_train_slices", "2",
                           "--n_val_slices", "1", "--max_epochs", "1", "--val_interval", "1", "--cache_workers", "0",
                           "--torch_threads", "1", "--crop_size", "32", "--progress_bar", "false", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    card = json.loads((root / "models" / f"{model_name}.json").read_text())
    return r.stdout + r.stderr, card, torch.load(root / "models" / f"{model_name}.pt", weights_only=True)


def bundle_inference(root: Path, weights: Path, input_path: Path, output_dir: Path) -> subprocess.CompletedProcess:
    """`monai.bundle run` with ``root``'s configs/inference.json on one input, with the given weights."""
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(root / "configs" / "inference.json"),
                           "--bundle_root", str(root), "--ckpt_path", str(weights), "--input_path", str(input_path),
                           "--output_dir", str(output_dir)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)
