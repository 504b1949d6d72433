"""Network presets for the three bundles (the configs choose one by name).

The RIM lives in :mod:`custom_components.methods.rim` (it needs the signal model).

The Diffusor's denoiser is MONAI's ``DiffusionModelUNet`` (time embedding, no attention, so it
maps any matrix whose sides are multiples of 4) with the condition concatenated on the channel
axis: in_channels = 3 (noisy maps) + N_TI (images) [+ 3 (classical-fit maps) when fit-conditioned].
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

DIFFUSION_PRESETS = {
    # the paper: 3 levels, 128/256/256 channels (GPU)
    "paper": dict(channels=(128, 256, 256), num_res_blocks=2, norm_num_groups=32),
    # trains on 2 CPU cores: 32/64/64, one residual block per level
    "compact": dict(channels=(32, 64, 64), num_res_blocks=1, norm_num_groups=16),
    # for tests only
    "tiny": dict(channels=(8, 16, 16), num_res_blocks=1, norm_num_groups=8),
}


def condition_channels(n_images: int, fit_condition: bool = False, n_info: int = 0) -> int:
    """Condition channels: the images, then ``n_info`` information channels (the CRLB of a protocol-free
    model, :func:`custom_components.methods.scaling.encode_crlb`), then the classical fit (3)."""
    return int(n_images) + int(n_info) + (3 if fit_condition else 0)


def diffusion_unet(preset: str = "compact", n_images: int = 7, fit_condition: bool = False, n_params: int = 3,
                   fit_residual: bool = False, n_info: int = 0) -> DiffusionModelUNet:
    """The conditional denoiser: input = noisy maps (3) + condition (:func:`condition_channels`), output = 3 channels.

    ``fit_residual`` (the network diffuses maps - classical fit) needs the fit in the condition."""
    if fit_residual and not fit_condition:
        raise ValueError("fit_residual needs fit_condition: the residual is taken from the classical fit in the condition")
    if preset not in DIFFUSION_PRESETS:
        raise ValueError(f"unknown network preset {preset!r}; choose one of {sorted(DIFFUSION_PRESETS)}")
    p = DIFFUSION_PRESETS[preset]
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=n_params + condition_channels(n_images, fit_condition, n_info),
        out_channels=n_params,
        channels=p["channels"],
        attention_levels=(False,) * len(p["channels"]),
        num_res_blocks=p["num_res_blocks"],
        norm_num_groups=p["norm_num_groups"],
        num_head_channels=p["channels"][-1],
    )


RESNET_PRESETS = {
    # the public ResNet baseline for relaxometry: 6 residual stages (the width is ours: 64 on GPUs)
    "large": dict(channels=64, stages=6),
    "compact": dict(channels=32, stages=6),
    "tiny": dict(channels=8, stages=2),
}


class ResidualStage(nn.Module):
    """x + BN(conv3x3(ReLU(BN(conv3x3(x)))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetMapper(nn.Sequential):
    """Direct regression (the paper's ResNet baseline): images / s (B, N, H, W) -> maps in tanh
    space (B, 3, H, W); conv1x1 -> residual stages -> conv1x1. Fully convolutional (any matrix)."""

    def __init__(self, n_images: int = 7, channels: int = 32, stages: int = 6, n_params: int = 3):
        super().__init__(
            nn.Conv2d(int(n_images), channels, 1),
            *[ResidualStage(channels) for _ in range(int(stages))],
            nn.Conv2d(channels, n_params, 1),
        )


def resnet_mapper(preset: str = "compact", n_images: int = 7) -> ResNetMapper:
    if preset not in RESNET_PRESETS:
        raise ValueError(f"unknown network preset {preset!r}; choose one of {sorted(RESNET_PRESETS)}")
    return ResNetMapper(n_images=n_images, **RESNET_PRESETS[preset])


def n_parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())


__all__ = ["DIFFUSION_PRESETS", "diffusion_unet", "condition_channels", "n_parameters", "RESNET_PRESETS",
           "ResidualStage", "ResNetMapper", "resnet_mapper"]
