"""One face for every mapping method: ``map_series(series, method=...)`` -> maps + provenance.

Methods register a function ``(series, mask, **options) -> MappingResult`` in :data:`METHODS`.
The classical fit is here; the learned methods (diffusor, resnet, rim) plug in through the bundles
(:mod:`custom_components.mapping.learned`). The output contract (file names, units, sidecars) is
:mod:`custom_components.mapping.results`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..methods.fitting import PRECISE_FIT, InversionRecoveryModel, IRFit, estimate_noise_sigma, signal_mask
from ..io import InputError, IRSeries
from .results import FLAG_ALPHA, MappingResult

def _classical(series: IRSeries, mask: np.ndarray | None, noise: str = "rician", sigma: float | None = None,
               n_coils: int = 1, progress: bool = True, device: str = "cpu", precise: bool = False, **_) -> MappingResult:
    """The plain fit (:class:`InversionRecoveryModel`) of every masked voxel of the series (a slice or a whole
    volume), on ``device`` (cpu, cuda, cuda:N); ``precise``: with :data:`PRECISE_FIT` (the TV fit's start)."""
    data = series.data
    info: dict = {"noise": noise, "n_coils": int(n_coils)}
    if noise in ("rician", "ncchi") and sigma is None:
        try:
            sigma = estimate_noise_sigma(data, n_coils=n_coils if noise == "ncchi" else 1)
            info["sigma_source"] = "estimated from signal-free background"
        except ValueError:
            noise = "gaussian"
            info["noise"] = "gaussian"
            info["note"] = "no signal-free background to estimate the noise level: least-squares fit (pass --sigma for ML)"
    elif sigma is not None:
        info["sigma_source"] = "given"
    if sigma is not None:
        info["sigma"] = float(sigma)
    if mask is None:
        coils = int(n_coils) if noise == "ncchi" else 1
        mask = signal_mask(data, sigma=sigma if sigma else None, n_coils=coils)
        info["mask"] = ("automatic: max over TIs above 5 sigma" + (f" above the noise floor of {coils} coils" if coils > 1 else "")
                        if sigma else "automatic: max over TIs above 5 % of the robust maximum")
    model = InversionRecoveryModel(series.protocol, device=device, **(PRECISE_FIT if precise else {}))
    fit = model.fit(data, mask=mask, noise=noise, sigma=sigma, n_coils=n_coils, progress=progress)
    return MappingResult(maps={"T1": fit.t1, "PD": fit.pd, "B": fit.b, "residual": fit.residual}, mask=mask,
                         info={**info, **fit.info})


def _mle(series, mask, **kw):
    kw.setdefault("noise", "rician")
    return _classical(series, mask, **kw)


def _ls(series, mask, **kw):
    kw["noise"] = "gaussian"
    return _classical(series, mask, **kw)


def _tv(series: IRSeries, mask: np.ndarray | None, noise: str = "rician", sigma: float | None = None,
        n_coils: int = 1, progress: bool = True, tv_weight: float | None = None, device: str = "cpu", **_) -> MappingResult:
    """The TV-regularised ML fit (:mod:`custom_components.methods.regularised`), started from the plain fit."""
    from ..methods.regularised import DEFAULT_TV_WEIGHT, TVRegularisedModel

    w = DEFAULT_TV_WEIGHT if tv_weight is None else float(tv_weight)
    if not np.isfinite(w) or w < 0:
        raise InputError(f"--tv_weight must be a number >= 0, got {tv_weight!r}")
    # the start the TV weight was chosen with (docs/physics.md, scripts/tv_validation.py): a reproducible float64 fit
    plain = _classical(series, mask, noise=noise, sigma=sigma, n_coils=n_coils, progress=progress, device=device,
                       precise=True)
    fit_noise = plain.info["noise"]  # gaussian where no background gave sigma
    init = IRFit(t1=plain.maps["T1"], pd=plain.maps["PD"], b=plain.maps["B"], residual=plain.maps["residual"],
                 mask=plain.mask, protocol=series.protocol, info=dict(plain.info))
    fit = TVRegularisedModel(series.protocol, tv_weight=w).fit(series.data, mask=plain.mask, noise=fit_noise,
                                                                sigma=plain.info.get("sigma"), init=init,
                                                                progress=progress, n_coils=n_coils)
    info = {**{k: v for k, v in plain.info.items() if k not in ("method",)}, **fit.info,
            "init": f"plain {plain.info.get('method')} fit"}
    return MappingResult(maps={"T1": fit.t1, "PD": fit.pd, "B": fit.b, "residual": fit.residual}, mask=plain.mask,
                         info=info)


def _learned(method: str):
    def run(series, mask, **kw):
        from .learned import map_series_with_bundle

        if method != "diffusor":  # the diffusor's data-consistency step uses the noise model; the others do not
            for k in ("noise", "n_coils"):
                kw.pop(k, None)
        return map_series_with_bundle(series, mask, method=method, **kw)

    return run


METHODS: dict[str, Callable[..., MappingResult]] = {"mle": _mle, "ls": _ls, "tv": _tv, "diffusor": _learned("diffusor"),
                                                   "resnet": _learned("resnet"), "rim": _learned("rim")}
def map_series(series: IRSeries, method: str = "mle", mask: np.ndarray | None = None, flag_alpha: float = FLAG_ALPHA,
               **options) -> MappingResult:
    """Map T1, PD and B of an IR series with a registered method.

    Every result also gets the physics-consistency maps of :func:`add_consistency_maps`: a
    "residual" map (RMS of data - |model| over the TIs) where the method returns none, and, where
    the noise level is known, the "flag" map (1 where the maps do not explain the images at
    false-alarm rate ``flag_alpha``).
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    if mask is not None:
        mask = np.asarray(mask) > 0
        if mask.shape != series.data.shape[:-1]:
            raise InputError(f"mask shape {mask.shape} does not match the image shape {series.data.shape[:-1]}")
        if not mask.any():
            raise InputError("the mask selects no voxel")
    res = METHODS[method](series, mask, **options)
    res.info.setdefault("method", method)
    return add_consistency_maps(res, series, sigma=options.get("sigma"), alpha=flag_alpha)


#: voxels per block of the consistency maps (a few (block, N) float64 temporaries: tens of MB)
CONSISTENCY_CHUNK_VOXELS = 1 << 18


def add_consistency_maps(result: MappingResult, series: IRSeries, sigma: float | None = None,
                         alpha: float = FLAG_ALPHA) -> MappingResult:
    """Add the physics-consistency maps (no ground truth needed) to ``result`` in place and return it.

    The maps are re-synthesised with the full model of the series' protocol (finite TR included):
    every method's maps are in that model's convention, TR-corrected PD and B (the classical fit
    estimates them directly; the learned methods' apparent estimates are converted in
    :func:`custom_components.mapping.learned.decode_prediction`), so one model serves every method.

    - "residual" (data units): RMS over the inversion times of data - |S(maps)|
      (:func:`custom_components.mapping.consistency.residual_rms`), only where the method did not return
      one (the classical fit returns its own, which is kept); 0 outside the mask.
    - "flag" (float32 0/1): :func:`custom_components.mapping.consistency.residual_flag` at false-alarm rate
      ``alpha``, 0 outside the mask; with ``result.info["flag_alpha"]`` and the fraction of flagged
      mask voxels ``result.info["flagged_fraction"]``. Needs the noise std per channel: the
      method's ``result.info["sigma"]``, else ``sigma``, else estimated from the series' signal-free
      background; without one (or for root-sum-of-squares data of several coils, whose expected
      magnitude is not the Rician mean) no flag is added and ``result.info["flag_note"]`` says why.
    """
    from .consistency import residual_flag, residual_rms

    mask = np.asarray(result.mask, dtype=bool)
    data = series.data[mask]  # (M, N)
    t1, pd, b = (np.asarray(result.maps[k], dtype=np.float64)[mask] for k in ("T1", "PD", "B"))

    def full(values: np.ndarray) -> np.ndarray:
        out = np.zeros(mask.shape, dtype=np.float32)
        out[mask] = values
        return out

    def chunked(fn, *args, **kw) -> np.ndarray:
        """fn over blocks of voxels: bounded temporaries for whole volumes."""
        step = CONSISTENCY_CHUNK_VOXELS
        parts = [fn(data[s:s + step], t1[s:s + step], pd[s:s + step], b[s:s + step], series.protocol, *args, **kw)
                 for s in range(0, len(data), step)]
        return np.concatenate(parts) if parts else np.zeros(0)

    if "residual" not in result.maps:
        result.maps["residual"] = full(chunked(residual_rms))
    n_coils = int(result.info.get("n_coils", 1) or 1)
    if result.info.get("noise") == "ncchi" and n_coils > 1:
        result.info["flag_note"] = (f"no consistency flag: root-sum-of-squares data of {n_coils} coils "
                                    "(the flag's expected magnitude is the Rician mean of one coil)")
        return result
    sig = result.info.get("sigma")
    if sig is None:
        sig = sigma
    if sig is None:
        try:
            sig = estimate_noise_sigma(series.data)
        except ValueError:
            result.info["flag_note"] = "no consistency flag: noise level unknown (no signal-free background; pass sigma)"
            return result
    if not (np.isfinite(sig) and sig > 0):
        result.info["flag_note"] = f"no consistency flag: noise level {sig!r} is not positive"
        return result
    flag = chunked(residual_flag, float(sig), alpha=alpha).astype(bool)
    result.maps["flag"] = full(flag.astype(np.float32))
    result.info["flag_alpha"] = float(alpha)
    result.info["flag_sigma"] = float(sig)
    result.info["flagged_fraction"] = float(flag.mean()) if flag.size else 0.0
    return result


__all__ = ["METHODS", "map_series", "add_consistency_maps"]
