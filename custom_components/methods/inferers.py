"""Training and sampling of the conditional DDPM (the qMRI Diffusor), on MONAI's generative core.

Notation (Ho et al. 2020): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t = 0..T-1, abar_t the
cumulative product of 1 - beta_t (MONAI ``DDPMScheduler.alphas_cumprod``, linear betas 1e-4..0.02
over T = 1000 steps: the original schedule). The network sees [x_t, condition] and predicts, by
``prediction_type``:

    "epsilon":       eps                                  (the paper)
    "v_prediction":  v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022)
    "sample":        x0

Samplers (both draw all ensemble members of all inputs in one batch):

- ``"ddpm"``: the full ancestral DDPM chain, T network evaluations (MONAI ``DDPMScheduler.step``).
  MONAI's DDPMScheduler cannot skip steps (with fewer inference steps its posterior uses the wrong
  alphas), so it is only used with all T steps.
- ``"ddim"``: DDIM (Song et al. 2021) on a *consistent* grid t_K > ... > t_1 = 0,
  t_i = round(linspace(T-1, 0, K)), each step going from t_i to t_{i+1} with the abar of those very
  steps (MONAI's DDIMScheduler derives its grid and its stride differently, which disagree):

      x0_hat = f(net(x_t), x_t)                 (clipped to [-1, 1], the data range)
      eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)
      sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s)
      x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z

  with s the next grid point (abar_s = 1 after t = 0, so the last step returns x0_hat):
  K network evaluations. eta = 1 is a stochastic (DDPM-like) sampler on the coarse grid.
- ``"dpm++2m"`` (default few-step sampler): DPM-Solver++(2M) (Lu et al. 2022), the second-order
  multistep solver of the probability-flow ODE in the data-prediction form, on a grid uniform in
  log-SNR lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t)) (rounded to integer t, t_1 = 0). With
  h = lambda_s - lambda_t and D = (1 + 1/2r) x0_i - (1/2r) x0_{i-1}, r = h_{i-1} / h_i:

      x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D          (alpha = sqrt(abar), sigma = sqrt(1 - abar))

  (first step: D = x0_i, which is DDIM). On a Gaussian posterior with the exact denoiser (tests)
  10 steps give the right mean and 80-100 % of the spread, where DDIM on a linear grid gives 20-70 %.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from monai.engines.utils import DiffusionPrepareBatch, PrepareBatch
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.schedulers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SAMPLERS = ("dpm++2m", "ddim", "ddpm")
#: how many frames (orientations of the image grid) each symmetry setting spreads the ensemble over
SYMMETRIES = {"none": 1, "flips": 4, "dihedral": 8}


def ddpm_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon") -> DDPMScheduler:
    """The paper's scheduler: linear betas (1e-4 .. 0.02), T = 1000; no clipping (done by the samplers)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule="linear_beta", prediction_type=prediction_type,
                         clip_sample=False)


def to_x0_eps(output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str):
    """(x0, eps) from a network output of any prediction type at noise level abar_t."""
    a = abar_t.sqrt()
    b = (1 - abar_t).sqrt()
    if prediction_type == "epsilon":
        return (x_t - b * output) / a, output
    if prediction_type == "v_prediction":
        return a * x_t - b * output, b * x_t + a * output
    if prediction_type == "sample":
        return output, (x_t - a * output) / b
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def target_for(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network is trained to output (see module doc)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return abar_t.sqrt() * noise - (1 - abar_t).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def ddim_timesteps(num_train_timesteps: int, steps: int, t_max: int | None = None) -> np.ndarray:
    """The consistent grid t_max = t_K > ... > t_1 = 0 (integers, distinct; ``t_max`` None: T-1)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    t_max = num_train_timesteps - 1 if t_max is None else int(t_max)
    if not 0 <= t_max < num_train_timesteps:
        raise ValueError(f"t_max must be in 0..{num_train_timesteps - 1}, got {t_max}")
    ts = np.unique(np.round(np.linspace(t_max, 0, steps)).astype(int))[::-1]
    return ts


def logsnr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t))."""
    a = alphas_cumprod.to(torch.float64)
    return 0.5 * (torch.log(a) - torch.log1p(-a))


def logsnr_timesteps(alphas_cumprod: torch.Tensor, steps: int, t_max: int | None = None) -> np.ndarray:
    """Integer timesteps t_max = t_K > ... > t_1 = 0 nearest to a grid uniform in log-SNR (``t_max``
    None: T-1, the start from pure noise)."""
    lam = logsnr(alphas_cumprod)
    t_max = len(lam) - 1 if t_max is None else int(t_max)
    if not 0 <= t_max < len(lam):
        raise ValueError(f"t_max must be in 0..{len(lam) - 1}, got {t_max}")
    if not 1 <= steps <= len(lam):
        raise ValueError(f"steps must be in 1..{len(lam)}, got {steps}")
    if steps == 1:
        return np.array([t_max])
    targets = torch.linspace(float(lam[t_max]), float(lam[0]), steps, dtype=torch.float64)
    ts = [int(torch.argmin((lam[:t_max + 1] - v).abs())) for v in targets]
    return np.array(sorted(set(ts), reverse=True))


def ddim_sample(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor,
                alphas_cumprod: torch.Tensor, steps: int, prediction_type: str = "epsilon", eta: float = 0.0,
                clip: float | None = 1.0, generator: torch.Generator | None = None, progress: bool = False,
                x0_hook: Callable[[torch.Tensor, int], torch.Tensor] | None = None, t_max: int | None = None) -> torch.Tensor:
    """DDIM from x_T with ``steps`` network evaluations (see module doc). ``model(x_t, t)`` -> output.
    ``x0_hook(x0, t)``: applied to every step's x0 estimate (at timestep t) after the clip
    (data-consistency), before eps is re-derived from it. ``t_max``: the timestep of ``x_T`` (None: T-1, pure noise)."""
    abar = alphas_cumprod.to(device=x_T.device, dtype=torch.float64)
    ts = ddim_timesteps(len(abar), steps, t_max)
    x = x_T
    it = range(len(ts))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"DDIM {len(ts)} steps", leave=False)
    for i in it:
        t = int(ts[i])
        a_t = abar[t].to(x.dtype)
        out = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        x0, eps = to_x0_eps(out, x, a_t, prediction_type)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if x0_hook is not None:
            x0 = x0_hook(x0, t)
        if clip is not None or x0_hook is not None:
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        a_s = abar[int(ts[i + 1])].to(x.dtype) if i + 1 < len(ts) else torch.ones((), dtype=x.dtype, device=x.device)
        sigma = eta * ((1 - a_s) / (1 - a_t)).sqrt() * (1 - a_t / a_s).sqrt() if eta > 0 else torch.zeros((), dtype=x.dtype)
        x = a_s.sqrt() * x0 + (1 - a_s - sigma**2).clamp_min(0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def dpmpp2m_sample(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor,
                   alphas_cumprod: torch.Tensor, steps: int, prediction_type: str = "epsilon",
                   clip: float | None = 1.0, progress: bool = False,
                   x0_hook: Callable[[torch.Tensor, int], torch.Tensor] | None = None, t_max: int | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) on a log-SNR grid, ``steps`` network evaluations (see module doc); ``x0_hook(x0, t)``
    is applied to every step's x0 estimate after the clip (data-consistency), the last one included.
    ``t_max``: the timestep of ``x_T`` (None: T-1, pure noise)."""
    abar = alphas_cumprod.to(device=x_T.device, dtype=torch.float64)
    lam = logsnr(abar)
    ts = logsnr_timesteps(abar, steps, t_max)
    x = x_T
    prev_x0, prev_h = None, None
    it = range(len(ts))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"DPM-Solver++(2M) {len(ts)} steps", leave=False)
    for i in it:
        t = int(ts[i])
        a_t = abar[t].to(x.dtype)
        out = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        x0, _ = to_x0_eps(out, x, a_t, prediction_type)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if x0_hook is not None:
            x0 = x0_hook(x0, t)
        if i + 1 == len(ts):
            return x0
        s = int(ts[i + 1])
        a_s = abar[s].to(x.dtype)
        h = (lam[s] - lam[t]).to(x.dtype)
        d = x0
        if prev_x0 is not None:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = ((1 - a_s) / (1 - a_t)).sqrt() * x - a_s.sqrt() * torch.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


def ddpm_sample(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor, scheduler: DDPMScheduler,
                clip: float | None = 1.0, generator: torch.Generator | None = None, progress: bool = False,
                x0_hook: Callable[[torch.Tensor, int], torch.Tensor] | None = None, t_max: int | None = None) -> torch.Tensor:
    """The full ancestral DDPM chain (T network evaluations, or t_max + 1 from ``x_T`` at timestep
    ``t_max``), x0 clipped to [-clip, clip] at each step, then passed through ``x0_hook(x0, t)``
    (data-consistency) before the posterior mean is formed."""
    abar = scheduler.alphas_cumprod.to(x_T.device)
    betas = scheduler.betas.to(x_T.device)
    alphas = scheduler.alphas.to(x_T.device)
    T = scheduler.num_train_timesteps
    x = x_T
    it = range(T - 1 if t_max is None else int(t_max), -1, -1)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"DDPM {T} steps", leave=False)
    for t in it:
        a_t = abar[t].to(x.dtype)
        out = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        x0, _ = to_x0_eps(out, x, a_t, scheduler.prediction_type)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if x0_hook is not None:
            x0 = x0_hook(x0, t)
        a_prev = abar[t - 1].to(x.dtype) if t > 0 else torch.ones((), dtype=x.dtype, device=x.device)
        # posterior q(x_{t-1} | x_t, x0) (Ho et al. eq. 7)
        c0 = a_prev.sqrt() * betas[t] / (1 - a_t)
        ct = alphas[t].sqrt() * (1 - a_prev) / (1 - a_t)
        mean = c0 * x0 + ct * x
        if t > 0:
            var = betas[t] * (1 - a_prev) / (1 - a_t)
            x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            x = mean
    return x


def frame_transform(x: torch.Tensor, frame: int, inverse: bool = False) -> torch.Tensor:
    """One of the 8 symmetries of the pixel grid (the dihedral group of the square) on the last two axes.

    ``frame`` in 0..7: bit 2 transposes (H, W) -> (W, H) (applied first), bit 0 flips the rows, bit 1
    the columns; frames 0-3 keep the shape (the flips), 0 is the identity. ``inverse=True`` undoes it,
    so ``frame_transform(frame_transform(x, k), k, inverse=True)`` is ``x``.
    """
    if not 0 <= int(frame) < 8:
        raise ValueError(f"frame must be in 0..7, got {frame}")
    k = int(frame)
    if not inverse:
        if k & 4:
            x = x.transpose(-1, -2)
        if k & 1:
            x = x.flip(-2)
        if k & 2:
            x = x.flip(-1)
        return x
    if k & 2:
        x = x.flip(-1)
    if k & 1:
        x = x.flip(-2)
    if k & 4:
        x = x.transpose(-1, -2)
    return x


def member_frames(n_samples: int, symmetry: str = "none") -> list[int]:
    """The frame (:func:`frame_transform`) of each ensemble member: member j gets frame j mod G, G the
    number of frames of ``symmetry`` ("none": 1, "flips": 4, "dihedral": 8)."""
    if symmetry not in SYMMETRIES:
        raise ValueError(f"symmetry must be one of {sorted(SYMMETRIES)}, got {symmetry!r}")
    return [j % SYMMETRIES[symmetry] for j in range(int(n_samples))]


def _pad_to(x: torch.Tensor, multiple: int):
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate"), (h, w)


class EnsembleDDPMInferer(Inferer):
    """Draw ``n_samples`` maps per input from the conditional DDPM, all in one batch.

    ``inferer(condition, network)`` with condition (B, C, H, W) returns network-space samples of
    shape (B, n_samples, 3, H, W); :func:`ensemble_statistics` turns them into physical mean and
    std maps. Any H, W: inputs are padded (replicate) to a multiple of 4 and cropped back.

    Args:
        scheduler: the training scheduler (its alphas_cumprod and prediction type are used).
        n_samples: ensemble size (the paper: 10).
        sampler: "dpm++2m" (few-step, default), "ddim" (few-step, first order) or "ddpm" (all T
            steps, the paper).
        steps: network evaluations per sample of the few-step samplers.
        eta: DDIM stochasticity (0 = deterministic ODE sampler).
        clip: clamp of x0 estimates (the data range of 2 tanh(x) - 1 is [-1, 1)).
        max_batch: largest number of samples per network call (memory); None: all at once.
        seed: seed of the initial noise (reproducible maps); None: global RNG.
        autocast_dtype: run the network under autocast: "auto", "bfloat16", a torch dtype or None
            (:func:`resolve_autocast_dtype`).
        residual: the network was trained on the residual maps - fit (``fit_residual``): the last 3
            condition channels (the classical fit, network space) are added to every sample, and the
            residual's x0 estimates are clipped to twice ``clip`` (the range of a difference of two
            maps in [-1, 1]); the sum is clipped to [-clip, clip].
        symmetry: "none" (default), "flips" or "dihedral": member j is drawn with the condition seen
            in frame j mod G of the pixel grid (:func:`frame_transform`: the identity, the flips and,
            for "dihedral", the transposes; G = 1, 4, 8) and its sample is mapped back to the input's
            frame. The physics is the same in every frame, but a trained network is not exactly
            equivariant: its orientation-dependent errors then vary between members, so the mean
            averages part of them out and the std includes them (a self-ensemble). Costs nothing
            extra: the same number of network evaluations. The initial noise is drawn in the input's
            frame, so "none" gives exactly the samples of earlier versions.
        data_consistency: a :class:`custom_components.methods.data_consistency.DataConsistency` (or None):
            at every step of the sampler, each member's x0 estimate (for a residual model: the fit plus
            the residual's estimate) is moved toward the measured images (the first ``n_images``
            condition channels) by its proximal step; needs the noise std ``sigma`` at call time
            (``inferer(cond, network, sigma=...)``, one value per input in the units of the scaled
            images). Without a finite positive sigma the step is skipped.
        map_prior: the network is a prior over maps alone (no condition channels: it was trained on
            maps, never on images; issue 21, design (a)). The inputs are then [images, start maps]
            (N + 3 channels): the images reach the samples only through ``data_consistency`` (the
            exact likelihood of *their* protocol), and the last 3 channels (network space: the
            classical fit) are where the sampler starts when ``start_timestep`` is set.
        dc_anneal: lambda >= 0: the data-consistency strength follows the noise level of each step,
            w_t = sqrt(w^2 + (lambda sigma_t / alpha_t)^2) with sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t)
            the noise-to-signal ratio of x_t and w the step's own ``strength`` (its value at t = 0): early
            steps, whose estimate is a guess, give way to the images; late ones keep the denoised estimate,
            which already carries the images through x_t (the rho_t of DiffPIR, Zhu et al. 2023). 0
            (default): w at every step.
        network_channels: None (default): the network sees every input channel as its condition. An
            integer k: only the last k (a protocol-free model, ``crlb_condition``: the inputs are
            [images, CRLB channels, fit] and the network sees [CRLB channels, fit], k = 6; the images
            reach the samples through ``data_consistency``). A map prior sees none (k = 0).
        start_timestep: None (default): every sample starts from pure noise at t = T-1. An integer
            t0 < T: it starts from the last 3 input channels noised to t0,
            x_t0 = sqrt(abar_t0) x_start + sqrt(1 - abar_t0) eps (SDEdit, Meng et al. 2022; with the
            classical fit as x_start, a few-step bridge from the fit), and the sampler's grid runs
            from t0 to 0.
    """

    def __init__(self, scheduler: DDPMScheduler, n_samples: int = 10, sampler: str = "dpm++2m", steps: int = 20,
                 eta: float = 0.0, clip: float | None = 1.0, max_batch: int | None = None, seed: int | None = 0,
                 autocast_dtype: torch.dtype | str | None = None, progress: bool = False, pad_multiple: int = 4,
                 residual: bool = False, symmetry: str = "none", data_consistency=None, map_prior: bool = False,
                 start_timestep: int | None = None, dc_anneal: float = 0.0, network_channels: int | None = None):
        super().__init__()
        if network_channels is not None and (int(network_channels) < 0 or (map_prior and int(network_channels) != 0)):
            raise ValueError(f"network_channels must be None or >= 0 (0 for a map prior), got {network_channels!r}")
        if not np.isfinite(dc_anneal) or dc_anneal < 0:
            raise ValueError(f"dc_anneal must be a number >= 0, got {dc_anneal!r}")
        if map_prior and residual:
            raise ValueError("a map prior has no fit in its condition, so it cannot be residual")
        if start_timestep is not None and not 0 <= int(start_timestep) < scheduler.num_train_timesteps:
            raise ValueError(f"start_timestep must be in 0..{scheduler.num_train_timesteps - 1} or None, got {start_timestep}")
        member_frames(1, symmetry)  # a bad value fails here
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}")
        self.scheduler = scheduler
        self.n_samples = int(n_samples)
        self.sampler = sampler
        self.steps = int(steps)
        self.eta = float(eta)
        self.clip = clip
        self.max_batch = max_batch
        self.seed = seed
        resolve_autocast_dtype(autocast_dtype)
        self.autocast_dtype = autocast_dtype
        self.progress = progress
        self.pad_multiple = pad_multiple
        self.residual = bool(residual)
        self.symmetry = symmetry
        self.data_consistency = data_consistency
        self.map_prior = bool(map_prior)
        self.start_timestep = None if start_timestep is None else int(start_timestep)
        self.dc_anneal = float(dc_anneal)
        self.network_channels = None if network_channels is None else int(network_channels)

    @property
    def network_evaluations(self) -> int:
        """Network evaluations per sample (each is one batched call)."""
        t0 = self.start_timestep
        if self.sampler == "ddpm":
            return self.scheduler.num_train_timesteps if t0 is None else t0 + 1
        if self.sampler == "ddim":
            return len(ddim_timesteps(self.scheduler.num_train_timesteps, self.steps, t0))
        return len(logsnr_timesteps(self.scheduler.alphas_cumprod, self.steps, t0))

    def _model_fn(self, network, cond):
        def fn(x, t):
            k = 0 if self.map_prior else self.network_channels
            inp = x if k == 0 else torch.cat([x, cond if k is None else cond[:, cond.shape[1] - k:]], dim=1)
            dtype = resolve_autocast_dtype(self.autocast_dtype, inp.device.type)
            if dtype is not None:
                with torch.autocast(device_type=inp.device.type, dtype=dtype):
                    return network(inp, timesteps=t).float()
            return network(inp, timesteps=t)
        return fn

    def _hook(self, cond: torch.Tensor, sigma: torch.Tensor | None):
        """The data-consistency step for members with condition ``cond`` (frame-transformed; the step is
        voxel-wise, so it commutes with the frames) and noise std ``sigma`` (one per member), or None."""
        dc = self.data_consistency
        if dc is None or sigma is None or getattr(dc, "strength", 1.0) == 0:
            return None
        if not bool(torch.isfinite(sigma).all()) or not bool((sigma > 0).all()):
            return None
        n_img = len(dc.tis)
        images = cond[:, :n_img]
        fit = cond[:, -3:] if self.residual else None
        clip = self.clip

        abar = self.scheduler.alphas_cumprod.to(torch.float64)

        def hook(x0, t):
            full = x0 if fit is None else x0 + fit
            if clip is not None:
                full = full.clamp(-clip, clip)
            w = None
            if self.dc_anneal > 0:
                nsr2 = float((1 - abar[int(t)]) / abar[int(t)])
                w = float(np.sqrt(dc.strength**2 + self.dc_anneal**2 * nsr2))
            full = dc(full, images, sigma, strength=w)
            if clip is not None:
                full = full.clamp(-clip, clip)
            return full if fit is None else full - fit
        return hook

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, sigma=None, **kwargs: Any) -> torch.Tensor:
        cond, (h, w) = _pad_to(inputs, self.pad_multiple)
        b = cond.shape[0]
        s = self.n_samples
        cond_rep = cond.repeat_interleave(s, dim=0)  # (B*S, C, H, W): member j of input i at i*S + j
        gen = torch.Generator(device=cond.device).manual_seed(int(self.seed)) if self.seed is not None else None
        shape = (b * s, 3) + tuple(cond.shape[-2:])
        x_T = torch.randn(shape, generator=gen, device=cond.device, dtype=cond.dtype)
        t0 = self.start_timestep
        if t0 is not None:  # SDEdit: the start maps (last 3 input channels) noised to t0
            a0 = self.scheduler.alphas_cumprod[t0].to(cond.dtype)
            x_T = a0.sqrt() * cond_rep[:, -3:] + (1 - a0).sqrt() * x_T
        out = torch.empty_like(x_T)
        frames = member_frames(s, self.symmetry)
        clip = None if self.clip is None else (2 * self.clip if self.residual else self.clip)
        sig_rep = None
        if sigma is not None:
            sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
            sig_rep = (sig.expand(b) if sig.numel() == 1 else sig).repeat_interleave(s)
        for frame in sorted(set(frames)):
            # every member of every input that is drawn in this frame, batched together
            idx = torch.tensor([i * s + j for i in range(b) for j in range(s) if frames[j] == frame], device=cond.device)
            cond_f = frame_transform(cond_rep[idx], frame)
            x_f = frame_transform(x_T[idx], frame)
            chunk = self.max_batch or len(idx)
            res = []
            for i in range(0, len(idx), chunk):
                fn = self._model_fn(network, cond_f[i:i + chunk])
                hook = self._hook(cond_f[i:i + chunk], None if sig_rep is None else sig_rep[idx[i:i + chunk].cpu()])
                if self.sampler == "ddpm":
                    x0 = ddpm_sample(fn, x_f[i:i + chunk], self.scheduler, clip=clip, generator=gen, progress=self.progress,
                                     x0_hook=hook, t_max=t0)
                elif self.sampler == "dpm++2m":
                    x0 = dpmpp2m_sample(fn, x_f[i:i + chunk], self.scheduler.alphas_cumprod, self.steps,
                                        self.scheduler.prediction_type, clip=clip, progress=self.progress, x0_hook=hook,
                                        t_max=t0)
                else:
                    x0 = ddim_sample(fn, x_f[i:i + chunk], self.scheduler.alphas_cumprod, self.steps,
                                     self.scheduler.prediction_type, eta=self.eta, clip=clip, generator=gen,
                                     progress=self.progress, x0_hook=hook, t_max=t0)
                res.append(x0)
            out[idx] = frame_transform(torch.cat(res), frame, inverse=True)
        if self.residual:
            out = out + cond_rep[:, -3:]
            if self.clip is not None:
                out = out.clamp(-self.clip, self.clip)
        return out[..., :h, :w].reshape(b, s, 3, h, w)


ROBUST_CLIP = 4.0  # members farther than this many robust stds from the ensemble's median are clamped


def _middle(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The median along ``dim`` (keepdim), the mean of the two middle values for an even count
    (``torch.median`` returns the lower one)."""
    xs = x.sort(dim=dim).values
    n = x.shape[dim]
    return 0.5 * (xs.narrow(dim, (n - 1) // 2, 1) + xs.narrow(dim, n // 2, 1))


def ensemble_statistics(samples: torch.Tensor, scale: torch.Tensor | float,
                        robust_clip: float | None = ROBUST_CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical mean and voxel-wise std (ddof 1) over samples (B, S, 3, H, W) in network space,
    with each member first clamped to within ``robust_clip`` robust stds of the ensemble's median.

    Every member is decoded to physical units (``decode_maps``: T1 in s, PD, B); per voxel and
    parameter, m is the members' median and s = 1.4826 x the median absolute deviation from m (the
    std for Gaussian members, but set by the bulk of the ensemble, not by one member); each member
    is clamped to [m - c s, m + c s] (c = ``robust_clip``), and the mean and the std (ddof 1) of
    the clamped members are returned, both in physical units.

    Why: decoding goes through atanh, which is steep at the top of the tanh range; a member at the
    sampler's clip (y = 1) decodes to T1 = 2 atanh(1 - 1e-6) s = 14.5 s, so one such member among
    10 in CSF (T1 about 4 s) moved the plain mean by about +1 s and the std by about +3 s. Clamped,
    it counts as m + c s: one member moves the mean by at most about (c s + its distance to the
    others) / S, whatever its value. Members inside the band are used unchanged, so where no member
    is an outlier the mean and std are exactly the plain ones. For members drawn from a symmetric
    distribution the mean is consistent for the centre, and for Gaussian members the std for sigma
    (a Gaussian clamped at 4 sigma keeps 0.9999 of its variance). With few members s is noisy and
    an ordinary member is sometimes clamped: Monte Carlo with Gaussian members, S = 10: 8 % of the
    ensembles have a member clamped and the std is on average 1 % below the plain one (S = 5: 5 %,
    S = 3: 13 %); the mean's own spread is unchanged (+0.2 %). c = 4 rather than 3 for that reason
    (3: 3 % at S = 10). With S <= 2 no member can be clamped. ``robust_clip=None``: the plain mean
    and std of the decoded members (what was returned before 2026-12-05).
    """
    from .scaling import decode_maps

    scale = torch.as_tensor(scale, dtype=samples.dtype, device=samples.device)
    if scale.ndim == 1:
        scale = scale[:, None]  # (B, 1): one scale per input, shared by its samples
    phys = decode_maps(samples, scale)
    if samples.shape[1] < 2:
        return phys.mean(dim=1), torch.zeros_like(phys[:, 0])
    if robust_clip is not None:
        if not robust_clip > 0:
            raise ValueError(f"robust_clip must be positive or None, got {robust_clip}")
        m = _middle(phys, 1)
        s = 1.4826 * _middle((phys - m).abs(), 1)
        phys = torch.minimum(torch.maximum(phys, m - robust_clip * s), m + robust_clip * s)
    return phys.mean(dim=1), phys.std(dim=1)



def resolve_autocast_dtype(value, device_type: str = "cpu") -> torch.dtype | None:
    """The autocast dtype for ``value``: None / "none" / "float32" -> None (full fp32); "auto" -> bf16
    where the device computes it natively (a CUDA GPU with bf16, or a CPU whose oneDNN has bf16
    kernels: AVX512-BF16 or AMX), else None; "bfloat16" / "float16" (or those torch dtypes) -> that
    dtype. "auto" matters on CPUs: without native bf16 (an AVX2-only AMD EPYC here) one training
    iteration of the compact U-Net under bf16 autocast took 98 s against 4 s in fp32."""
    if value is None or value is torch.float32 or (
            isinstance(value, str) and value.lower() in ("", "none", "null", "float32", "fp32")):
        return None
    if value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            native = False
        return torch.bfloat16 if native else None
    dtype = getattr(torch, str(value), None)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be auto, none, bfloat16 or float16, got {value!r}")
    return dtype


class ConditionalDiffusionInferer(DiffusionInferer):
    """MONAI's DiffusionInferer for training, with the condition concatenated on the channel axis
    and an optional autocast (``autocast_dtype``, see :func:`resolve_autocast_dtype`: bf16 trained about
    1.7x faster than fp32 on a CPU with native bf16, and 25x slower on one without)."""

    def __init__(self, scheduler, autocast_dtype: torch.dtype | str | None = None):
        super().__init__(scheduler)
        resolve_autocast_dtype(autocast_dtype)  # a bad value fails here, not at the first iteration
        self.autocast_dtype = autocast_dtype

    def __call__(self, inputs, diffusion_model, noise, timesteps, condition=None, mode="concat", seg=None):
        dtype = resolve_autocast_dtype(self.autocast_dtype, inputs.device.type)
        if dtype is None:
            return super().__call__(inputs, diffusion_model, noise, timesteps, condition=condition, mode=mode)
        with torch.autocast(device_type=inputs.device.type, dtype=dtype):
            out = super().__call__(inputs, diffusion_model, noise, timesteps, condition=condition, mode=mode)
        return out.float()


class ConditionalDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Training batches for the conditional DDPM: x0 = batch["label"] (maps in network space),
    condition = batch[condition_name] (images, optionally with fit maps), target by prediction type.
    With ``residual`` the diffused x0 is the label minus the classical fit (the last 3 condition
    channels, network space): the network learns the correction to the fit (``fit_residual``).

    (MONAI 1.6 has no conditional prepare-batch that passes mode="concat"; this adds it and the
    v/x0 targets.)
    """

    def __init__(self, num_train_timesteps: int, scheduler: DDPMScheduler, condition_name: str = "cond",
                 x0_name: str = "label", residual: bool = False):
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        self.scheduler = scheduler
        self.x0_name = x0_name
        self.residual = bool(residual)

    def get_target(self, images, noise, timesteps):
        abar = self.scheduler.alphas_cumprod.to(images.device)[timesteps].to(images.dtype).view(-1, 1, 1, 1)
        return target_for(images, noise, abar, self.scheduler.prediction_type)

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        x0 = batchdata[self.x0_name].to(device, non_blocking=non_blocking)
        cond = batchdata[self.condition_name].to(device, non_blocking=non_blocking)
        if self.residual:
            x0 = x0 - cond[:, -3:]
        noise = self.get_noise(x0)
        timesteps = self.get_timesteps(x0)
        target = self.get_target(x0, noise, timesteps)
        return x0, target, (), {"noise": noise, "timesteps": timesteps, "condition": cond, "mode": "concat"}


class DenoisingPrepareBatch(PrepareBatch):
    """Validation batches that score a diffusion network as a denoiser at fixed noise levels (the
    validation curve of a prior over maps, which has no condition to map from): every item's x0 =
    ``batch[x0_name]`` is noised to each of ``timesteps`` with noise from a generator seeded with
    ``seed`` at every call (the same noise at every validation), inputs = [x_t, condition] for all
    (timestep, item) pairs, targets = x0 repeated, and the timesteps go to the inferer
    (:class:`DenoisingInferer`). ``residual``: the network diffuses x0 minus the classical fit (the last 3
    condition channels); the targets stay the maps, and the inferer adds the fit back."""

    def __init__(self, scheduler: DDPMScheduler, timesteps=(50, 200, 500), seed: int = 0, condition_name: str = "cond",
                 x0_name: str = "label", residual: bool = False):
        self.residual = bool(residual)
        self.scheduler = scheduler
        self.timesteps = [int(t) for t in timesteps]
        self.seed = int(seed)
        self.condition_name = condition_name
        self.x0_name = x0_name

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        x0 = batchdata[self.x0_name].to(device, non_blocking=non_blocking)
        cond = batchdata[self.condition_name].to(device, non_blocking=non_blocking)
        gen = torch.Generator().manual_seed(self.seed)
        inputs, targets, ts = [], [], []
        d0 = x0 - cond[:, -3:] if self.residual else x0
        for t in self.timesteps:
            a = self.scheduler.alphas_cumprod[t].to(x0.dtype)
            noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
            inputs.append(torch.cat([a.sqrt() * d0 + (1 - a).sqrt() * noise, cond], dim=1))
            targets.append(x0)
            ts.append(torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device))
        return torch.cat(inputs), torch.cat(targets), (), {"timesteps": torch.cat(ts)}


class DenoisingInferer(Inferer):
    """The network's x0 estimate (clipped to [-clip, clip]) from inputs [x_t (3 channels), condition]
    at ``timesteps`` (:class:`DenoisingPrepareBatch`); ``residual``: plus the fit (the last 3 channels)."""

    def __init__(self, scheduler: DDPMScheduler, clip: float | None = 1.0, residual: bool = False):
        super().__init__()
        self.scheduler = scheduler
        self.clip = clip
        self.residual = bool(residual)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, timesteps=None, **kwargs: Any):
        out = network(inputs, timesteps=timesteps)
        abar = self.scheduler.alphas_cumprod.to(inputs.device)[timesteps].to(inputs.dtype).view(-1, 1, 1, 1)
        x0, _ = to_x0_eps(out, inputs[:, :3], abar, self.scheduler.prediction_type)
        if self.residual:  # the residual's estimate plus the fit (the last 3 input channels)
            x0 = x0 + inputs[:, -3:]
        return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)


class ConditionPrepareBatch(PrepareBatch):
    """Evaluation batches: inputs = the condition, targets = the maps (network space)."""

    def __init__(self, condition_name: str = "cond", label_name: str = "label"):
        self.condition_name = condition_name
        self.label_name = label_name

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        cond = batchdata[self.condition_name].to(device, non_blocking=non_blocking)
        label = batchdata[self.label_name].to(device, non_blocking=non_blocking)
        return cond, label, (), {}


__all__ = ["PREDICTION_TYPES", "SAMPLERS", "SYMMETRIES", "frame_transform", "member_frames", "ddpm_scheduler", "to_x0_eps", "target_for", "ddim_timesteps", "ddim_sample",
           "logsnr", "logsnr_timesteps", "dpmpp2m_sample",
           "ddpm_sample", "EnsembleDDPMInferer", "ensemble_statistics", "ROBUST_CLIP", "ConditionalDiffusionInferer",
           "ConditionalDiffusionPrepareBatch", "ConditionPrepareBatch", "DenoisingPrepareBatch", "DenoisingInferer"]
