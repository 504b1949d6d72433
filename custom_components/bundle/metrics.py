"""Validation metrics of the learned methods: errors of the maps, not of the training loss.

Predictions and labels are in network (tanh) space; T1 and B decode without the signal scale, and
the relative PD error is scale-free, so the metrics decode both with scale 1.
"""

from __future__ import annotations

import torch
from ignite.metrics import Metric

from ..methods.scaling import decode_maps

CHANNELS = {"T1": 0, "PD": 1, "B": 2}


def relative_map_error(pred_phys: torch.Tensor, label_phys: torch.Tensor, channel: int, pd_floor: float = 0.1):
    """Sum of |pred - label| / label over tissue voxels (label PD > ``pd_floor``), and their count."""
    mask = label_phys[:, 1] > pd_floor
    err = (pred_phys[:, channel] - label_phys[:, channel]).abs() / label_phys[:, channel].abs().clamp_min(1e-6)
    return float(err[mask].sum()), int(mask.sum())


class RelativeMapError(Metric):
    """Mean absolute relative error (%) of one parameter over tissue voxels, on engine outputs
    (y_pred, y) in network space; y_pred may be an ensemble (B, S, 3, H, W) (its mean is used)."""

    def __init__(self, parameter: str = "T1", output_transform=lambda x: x, device="cpu"):
        self.channel = CHANNELS[parameter]
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        self._sum, self._n = 0.0, 0

    def update(self, output):
        y_pred, y = output
        if isinstance(y_pred, (list, tuple)):
            y_pred, y = torch.stack(list(y_pred)), torch.stack(list(y))
        y_pred, y = y_pred.detach().float().cpu(), y.detach().float().cpu()
        pred = decode_maps(y_pred, 1.0)
        if pred.ndim == 5:
            pred = pred.mean(dim=1)
        s, n = relative_map_error(pred, decode_maps(y, 1.0), self.channel)
        self._sum += s
        self._n += n

    def compute(self):
        return 100.0 * self._sum / max(self._n, 1)


__all__ = ["RelativeMapError", "relative_map_error"]
