"""Recurrent inference machine (RIM) for inversion-recovery relaxometry (Sabidussi et al. 2021).

The RIM is an iterative, physics-driven estimator: starting from a fixed guess, at every one of
``n_steps`` steps a small recurrent network sees the current estimate and the gradient of the
log-likelihood of the data with respect to every parameter map, and proposes an update:

    eta_{t+1} = eta_t + g_phi(eta_t, grad log p(y | eta_t), h_t)

The gradient is computed by autograd through the foundation's signal model
(:func:`custom_components.physics.signal_model.signal`: S_n = |PD (1 - B exp(-TI_n/T1))|), so the same
trained RIM runs for any protocol (list of inversion times): only the physics changes, the
network's inputs (3 maps + 3 gradients) do not.

Units inside: images are divided by their robust signal scale s (as for every learned method
here), so eta = (T1 [s], PD [relative to s], B). Start: PD = max signal over TIs, B = 2, T1 = 1 s.
The gradient fed to the network is sigma^2 * grad log p: for the Gaussian likelihood that is
sum_n (y_n - S_n) dS_n/d(theta), independent of the noise level; for the Rician one
sum_n (y_n I1(y_n S_n/sigma^2)/I0(.) - S_n) dS_n/d(theta), which needs sigma (given, e.g. from the
synthetic data, or estimated from the image background). The network's outputs, and the loss on
every step, are in the tanh space of :mod:`custom_components.methods.scaling` like the other methods.

Cell (as in the public RIM code for relaxometry): conv3x3 -> ReLU -> per-pixel GRU -> conv3x3 ->
ReLU -> conv3x3 -> ReLU -> per-pixel GRU -> conv1x1 (the per-pixel GRUs have 1x1 gates).
"""

from __future__ import annotations

import torch
from torch import nn

from ..physics.protocol import Protocol, get_protocol
from .scaling import B_SCALE, T1_SCALE_S
from ..physics.signal_model import signal

RIM_PRESETS = {
    "large": dict(hidden=64),  # a GPU-size cell
    "compact": dict(hidden=32),  # trains on 2 CPU cores
    "tiny": dict(hidden=8),  # tests only
}
T1_START_S = 1.0
B_START = 2.0
T1_MIN_S = 5e-3  # the physics is evaluated at T1 >= 5 ms (an estimate may step below it)
LIKELIHOODS = ("gaussian", "rician")


def initial_estimate(images: torch.Tensor) -> torch.Tensor:
    """Start of the iterations for images (B, N, H, W): T1 = 1 s, PD = max over TIs, B = 2."""
    pd = images.amax(dim=1, keepdim=True)
    return torch.cat([torch.full_like(pd, T1_START_S), pd, torch.full_like(pd, B_START)], dim=1)


def _physical(eta: torch.Tensor) -> torch.Tensor:
    """Estimate -> parameters where the signal model is defined (T1 >= 5 ms, PD and B as they are)."""
    return torch.cat([eta[:, :1].clamp_min(T1_MIN_S), eta[:, 1:]], dim=1)


def _log_likelihood_of_model(model: torch.Tensor, images: torch.Tensor, sigma: torch.Tensor | None,
                             noise: str) -> torch.Tensor:
    """log p(images | model signal) per item (see :func:`log_likelihood`)."""
    if noise == "gaussian" or sigma is None:
        s2 = 1.0 if sigma is None else sigma.reshape(-1, 1, 1, 1) ** 2
        return (-0.5 * (images - model) ** 2 / s2).flatten(1).sum(1)
    if noise != "rician":
        raise ValueError(f"noise must be one of {LIKELIHOODS}, got {noise!r}")
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    z = images * model / s2
    # log I0(z) = log(i0e(z)) + z, stable for large z
    ll = -0.5 * model**2 / s2 + torch.log(torch.special.i0e(z)) + z
    return ll.flatten(1).sum(1)


def log_likelihood(params: torch.Tensor, images: torch.Tensor, protocol: Protocol, sigma: torch.Tensor | None = None,
                   noise: str = "rician") -> torch.Tensor:
    """log p(images | params) per item, up to terms that do not depend on the parameters.

    Args:
        params: (B, 3, H, W) = T1 [s], PD, B.
        images: (B, N, H, W) magnitude images (the same units as PD).
        sigma: (B,) noise std per real channel (same units); needed for "rician".
        noise: "gaussian" or "rician".
    """
    return _log_likelihood_of_model(signal(params, protocol, dim=1), images, sigma, noise)


def likelihood_gradient(eta: torch.Tensor, images: torch.Tensor, protocol: Protocol, sigma: torch.Tensor | None = None,
                        noise: str = "rician") -> torch.Tensor:
    """sigma^2 * d log p / d(T1, PD, B) per voxel (B, 3, H, W), by autograd through the signal model.

    Items whose ``sigma`` is not finite (noise level unknown) use the Gaussian likelihood, whose
    scaled gradient does not depend on sigma. The result is detached (an input of the network).
    """
    with torch.enable_grad():
        p = _physical(eta.detach()).requires_grad_(True)
        model = signal(p, protocol, dim=1)  # the signal model once, for both likelihoods
        ll_g = _log_likelihood_of_model(model, images, None, "gaussian")
        if noise == "rician" and sigma is not None:
            sig = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).reshape(-1)
            known = torch.isfinite(sig) & (sig > 0)
            sig_r = torch.where(known, sig, torch.ones_like(sig))
            ll_r = _log_likelihood_of_model(model, images, sig_r, "rician")
            # scale each item's log-likelihood by its sigma^2 so the gradient is sigma^2 * grad
            ll = torch.where(known, ll_r * sig_r**2, ll_g).sum()
        else:
            ll = ll_g.sum()
        (grad,) = torch.autograd.grad(ll, p)
    return grad.detach()


def to_network_space(eta: torch.Tensor) -> torch.Tensor:
    """Estimate (T1 s, PD/s, B) -> the tanh space of :func:`custom_components.methods.scaling.encode_maps`
    (without its clamp at 0, so the loss keeps a gradient for an estimate that steps below 0)."""
    scales = torch.tensor([T1_SCALE_S, 1.0, B_SCALE], dtype=eta.dtype, device=eta.device).reshape(1, 3, 1, 1)
    return 2.0 * torch.tanh(eta / scales) - 1.0


class PixelGRU(nn.Module):
    """GRU cell applied independently at every pixel (1x1 convolutional gates)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(channels + hidden, 2 * hidden, 1)
        self.candidate = nn.Conv2d(channels + hidden, hidden, 1)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        r, z = torch.sigmoid(self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        n = torch.tanh(self.candidate(torch.cat([x, r * h], dim=1)))
        return (1.0 - z) * n + z * h


class RIMCell(nn.Module):
    """conv3x3 -> GRU -> conv3x3 -> conv3x3 -> GRU -> conv1x1: (estimate, gradient, hidden) -> update."""

    def __init__(self, n_params: int = 3, hidden: int = 32):
        super().__init__()
        self.hidden = hidden
        self.conv1 = nn.Conv2d(2 * n_params, hidden, 3, padding=1)
        self.gru1 = PixelGRU(hidden, hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.gru2 = PixelGRU(hidden, hidden)
        self.out = nn.Conv2d(hidden, n_params, 1)
        nn.init.zeros_(self.out.weight)  # untrained, the RIM stays at its start (no random drift)
        nn.init.zeros_(self.out.bias)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor):
        a = self.act(self.conv1(x))
        h1 = self.gru1(a, h1)
        a = self.act(self.conv3(self.act(self.conv2(h1))))
        h2 = self.gru2(a, h2)
        return self.out(h2), h1, h2


class RecurrentInferenceMachine(nn.Module):
    """The RIM: ``forward(images, sigma=None, all_steps=False)``.

    Args:
        protocol: the protocol (name or :class:`Protocol`) whose inversion times the images have;
            change it (``rim.protocol = ...``) to run the same weights on another protocol.
        preset: "compact" (hidden 32), "large" (64) or "tiny" (8).
        n_steps: inference steps (the qMRI Diffusor paper: 9; the RIM paper: 6).
        noise: likelihood, "rician" (default) or "gaussian".

    ``forward`` takes images (B, N, H, W) divided by their signal scale and ``sigma`` (B,) the noise
    std in the same units (NaN or None: unknown, the Gaussian likelihood is used). It returns the
    final estimate in tanh space (B, 3, H, W), or every step's estimate (B, n_steps, 3, H, W) with
    ``all_steps=True`` (training: the loss is taken on every step). ``protocol`` (a Protocol, a
    preset name or its JSON) overrides the RIM's own for this call.
    """

    def __init__(self, protocol="paper", preset: str = "compact", n_steps: int = 9, noise: str = "rician"):
        super().__init__()
        if preset not in RIM_PRESETS:
            raise ValueError(f"unknown RIM preset {preset!r}; choose one of {sorted(RIM_PRESETS)}")
        if noise not in LIKELIHOODS:
            raise ValueError(f"noise must be one of {LIKELIHOODS}, got {noise!r}")
        if int(n_steps) < 1:
            raise ValueError("n_steps must be >= 1")
        self.protocol = get_protocol(protocol)
        self.n_steps = int(n_steps)
        self.noise = noise
        self.cell = RIMCell(3, RIM_PRESETS[preset]["hidden"])

    def estimates(self, images: torch.Tensor, sigma: torch.Tensor | None = None, protocol=None) -> list[torch.Tensor]:
        """Physical estimates eta_1 .. eta_T (each (B, 3, H, W): T1 s, PD/s, B)."""
        protocol = self.protocol if protocol is None else get_protocol(protocol)
        if protocol.n_images != images.shape[1]:
            raise ValueError(f"the images have {images.shape[1]} inversion times, the protocol {protocol.n_images}")
        images = images.float()
        eta = initial_estimate(images)
        b, _, h, w = images.shape
        h1 = images.new_zeros(b, self.cell.hidden, h, w)
        h2 = images.new_zeros(b, self.cell.hidden, h, w)
        out = []
        for _ in range(self.n_steps):
            grad = likelihood_gradient(eta, images, protocol, sigma, self.noise)
            delta, h1, h2 = self.cell(torch.cat([eta, grad], dim=1), h1, h2)
            eta = eta + delta
            out.append(eta)
        return out

    def forward(self, images: torch.Tensor, sigma: torch.Tensor | None = None, all_steps: bool = False,
                protocol=None) -> torch.Tensor:
        etas = self.estimates(images, sigma, protocol)
        if all_steps:
            return torch.stack([to_network_space(e) for e in etas], dim=1)
        return to_network_space(etas[-1])


class StepwiseMSELoss(nn.Module):
    """Mean over steps of the MSE between every step's estimate (B, T, 3, H, W) and the label (B, 3, H, W)."""

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if pred.ndim == label.ndim:
            return torch.mean((pred - label) ** 2)
        return torch.mean((pred - label.unsqueeze(1)) ** 2)


class RIMPrepareBatch:
    """Ignite prepare-batch: inputs = images, targets = labels, kwargs = sigma [+ all_steps].

    ``sigma`` (B,) in the images' units: the key ``sigma_key`` if the batch has it, else
    1 / (snr x scale) from the synthetic data's SNR (PD of water = 1 before scaling).
    """

    def __init__(self, all_steps: bool = True, image_key: str = "image", label_key: str = "label",
                 sigma_key: str = "sigma"):
        self.all_steps = bool(all_steps)
        self.image_key, self.label_key, self.sigma_key = image_key, label_key, sigma_key

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        images = batchdata[self.image_key].to(device, non_blocking=non_blocking)
        label = batchdata.get(self.label_key)
        if label is not None:
            label = label.to(device, non_blocking=non_blocking)
        if self.sigma_key in batchdata:
            sigma = torch.as_tensor(batchdata[self.sigma_key]).reshape(-1)
        elif "snr" in batchdata:
            sigma = 1.0 / (torch.as_tensor(batchdata["snr"]).reshape(-1) * torch.as_tensor(batchdata["scale"]).reshape(-1))
        else:
            sigma = None
        if sigma is not None:
            sigma = sigma.to(device=device, dtype=torch.float32)
        return images, label, (), {"sigma": sigma, "all_steps": self.all_steps}


__all__ = ["RecurrentInferenceMachine", "RIMCell", "PixelGRU", "RIM_PRESETS", "initial_estimate", "log_likelihood",
           "likelihood_gradient", "to_network_space", "StepwiseMSELoss", "RIMPrepareBatch"]
