"""Mapping real series with a trained bundle: the Diffusor, the ResNet or the RIM.

``BundleMapper(bundle_dir)`` reads the bundle's ``configs/inference.json`` (network definition,
scheduler and ensemble inferer for the Diffusor, protocol), loads ``models/model.pt`` with
``weights_only=True`` and maps a series slice by slice: images / s (the robust signal scale),
optionally with the classical fit as extra condition; the Diffusor draws ``n_samples`` maps in
one batch (-> mean and voxel-wise std), the ResNet regresses the maps, the RIM iterates with the
likelihood gradient of the series' own protocol. ``qmri map --method diffusor|resnet|rim`` calls
:func:`map_series_with_bundle`, which takes, unless ``weights`` are given, the most accurate
validated weights for the series' protocol (:func:`choose_weights`, by the weights' cards); the
bundles' ``inference.json`` share the transforms, and their results are finished and written by
the same code as ``qmri map``'s (:mod:`custom_components.mapping.runner`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..io import InputError, IRSeries, nonnegative_number

REPO_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


LEARNED_METHODS = ("diffusor", "resnet", "rim")


def decode_prediction(pred: torch.Tensor, scale: torch.Tensor, protocol,
                      labels_physical: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Network-space output -> (T1 s, PD, B) maps in the output convention (physical, TR-corrected
    PD and B of the full model; docs/physics.md): an ensemble (B, S, 3, H, W) (the Diffusor) gives
    its mean and voxel-wise std, a single estimate (B, 3, H, W) (ResNet, RIM) gives the maps and None.

    The networks were trained on the synthetic labels, which are apparent (PD, B) for a constant
    finite TR (:mod:`custom_components.data.synthesis`); ``protocol`` (the mapped series' own) turns
    each estimate, every ensemble member before the statistics, into the output convention with
    :func:`custom_components.data.synthesis.maps_from_labels` (the exact inverse). ``labels_physical``:
    the network's labels are already in the output convention (a prior over maps, ``map_prior``)."""
    from ..data.synthesis import labels_are_apparent, maps_from_labels
    from ..methods.inferers import ensemble_statistics
    from ..methods.scaling import decode_maps, encode_maps

    pred = pred.float().cpu()
    if pred.ndim == 5:
        if labels_are_apparent(protocol) and not labels_physical:  # members -> output convention, back in network space for the statistics
            s = torch.as_tensor(scale, dtype=pred.dtype)
            s = s[:, None] if s.ndim == 1 else s
            pred = encode_maps(maps_from_labels(decode_maps(pred, s), protocol, dim=-3), s)
        return ensemble_statistics(pred, scale)
    maps = decode_maps(pred, scale)
    return (maps if labels_physical else maps_from_labels(maps, protocol, dim=-3)), None


#: ``qmri map --variant``: which kind of Diffusor weights to choose among the shipped ones (None: the best).
VARIANTS = ("images", "fit", "prior", "crlb")
#: The order of preference among the weights that fit the input's protocol, best first: the residual
#: fit-conditioned model, then the fit-conditioned one, then images only (the paper's). The validation
#: of bundles/diffusor/docs/README.md: held-out synthetic brains T1 error 8.9 (fifth stage, residual)
#: / 13.7 (fit-conditioned, not residual) / 18.2 % (images only); twin 0.4-2 s mean error 0.7 / 3.0 / 7.7 %.
#: "crlb" (the fit + CRLB model, any protocol): the rule of scripts/prior_validation.py, written before its run,
#: made it the default on the validation half (docs/crlb_validation.md), and bundle 0.10.0 shipped it so; on
#: the six real NIST scans it then read 12.9 % off against the fit's 3.9 % (a determined 1 s sphere of the
#: Siemens scans +113 %), so 0.10.1 made it experimental again: only ``--variant crlb`` takes it.
PREFERENCE = ("fit_residual", "fit", "images", "crlb", "prior")
#: the kinds of weights that map any protocol (the images never enter the network)
PROTOCOL_FREE = ("prior", "crlb")
#: protocol-free kinds chosen only when asked for with --variant (experimental)
EXPERIMENTAL = ("prior", "crlb")


def weights_variant(card: dict | None) -> str:
    """The kind of weights a card describes: "fit_residual", "fit" (fit-conditioned), "images" or "prior"
    (a prior over maps for any protocol, ``map_prior``) or "crlb" (conditioned on the classical fit and
    its CRLB, any protocol, ``crlb_condition``)."""
    card = card or {}
    if card.get("map_prior") is True:
        return "prior"
    if card.get("crlb_condition") is True:
        return "crlb"
    if card.get("fit_residual") is True:
        return "fit_residual"
    return "fit" if card.get("fit_condition") is True else "images"


_VARIANT_WORDS = {"fit_residual": "images + fit, residual", "fit": "images + fit", "images": "images only",
                  "prior": "prior over maps + the exact likelihood, any protocol",
                  "crlb": "fit + CRLB, residual, any protocol"}


def _describe_protocol(p) -> str:
    tr = p.repetition_time_s
    if tr is not None:
        trs = sorted({round(float(t), 3) for t in np.atleast_1d(tr)})
        tr = f", TR {trs[0]} s" if len(trs) == 1 else f", TR {[round(float(t), 3) for t in np.atleast_1d(tr)]} s"
    return f"TIs {[round(float(t), 4) for t in p.inversion_times_s]} s{tr or ''}"


def shipped_weights(bundle_dir: str | Path, method: str) -> list[tuple[Path, dict | None]]:
    """The weights files of a bundle's models/ folder (checkpoints left out) with their cards (None
    where a file has none), sorted by name. A card that is not a valid card is refused (InputError)."""
    from ..bundle.training import read_weights_card

    out = []
    for path in sorted((Path(bundle_dir) / "models").glob("*.pt")):
        if path.name.startswith("checkpoint"):
            continue
        try:
            card = read_weights_card(path)
        except ValueError as e:
            raise InputError(str(e)) from None
        if card is not None and card.get("method", method) != method:
            continue
        out.append((path, card))
    return out


def choose_weights(bundle_dir: str | Path, method: str, protocol, variant: str | None = None,
                   protocol_free: bool = True) -> tuple[Path, str]:
    """The weights ``qmri map`` uses when none are given: among the bundle's shipped weights
    (:func:`shipped_weights`), those whose card's protocol has the input's timing
    (:func:`custom_components.physics.protocol.check_same_timing`; the RIM maps any protocol), the
    first in :data:`PREFERENCE` (ties: by file name). ``variant`` ("images" or "fit", the Diffusor
    only) keeps only weights of that kind; ``protocol_free=False`` leaves out the weights that map any
    protocol (what the bundle's ``inference.json`` takes: its transforms give the network images).
    Returns the path and a sentence saying why it was chosen;
    raises InputError (one line naming what the bundle has) when none fits.

    Weights without a card are taken to be for the protocol of the bundle's ``configs/inference.json``
    (images only)."""
    from ..physics.protocol import ProtocolError, check_same_timing, get_protocol

    if variant is not None and method != "diffusor":
        raise InputError(f"--variant applies to the diffusor only, not to {method}")
    if variant is not None and variant not in VARIANTS:
        raise InputError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    bundle_dir = Path(bundle_dir)
    cfg = bundle_dir / "configs" / "inference.json"
    if not cfg.exists():
        raise InputError(f"{bundle_dir}: not a bundle (no configs/inference.json)")
    protocol = get_protocol(protocol)
    try:
        config = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg}: unreadable ({e})") from None
    bundle_method = config.get("method", "diffusor")
    if bundle_method != method:
        raise InputError(f"{bundle_dir} is a {bundle_method} bundle, not a {method} one")
    default_protocol = config.get("protocol", "paper")
    fits, seen = [], []
    for path, card in shipped_weights(bundle_dir, method):
        try:
            trained = get_protocol((card or {}).get("protocol", default_protocol))
        except (ProtocolError, ValueError, TypeError) as e:
            raise InputError(f"{path}: its card's protocol is not a protocol ({str(e).splitlines()[0]})") from None
        kind = weights_variant(card)
        seen.append(f"{path.name} (" + (_VARIANT_WORDS[kind] if kind in PROTOCOL_FREE else trained.name + (
            f", {_VARIANT_WORDS[kind]}" if method == "diffusor" else "")) + ")")
        if variant is not None and kind != variant and not (variant == "fit" and kind == "fit_residual"):
            continue
        if kind in EXPERIMENTAL and variant != kind:
            continue  # experimental: less accurate than the classical fit (docs/prior_validation.md, docs/RESULTS.md)
        if kind in PROTOCOL_FREE and not protocol_free:
            continue
        if method != "rim" and kind not in PROTOCOL_FREE:
            try:
                check_same_timing(trained, protocol)
            except ProtocolError:
                continue
        fits.append((PREFERENCE.index(kind), path.name, path, kind))
    if not fits:
        which = f"{method} ({_VARIANT_WORDS[variant]})" if variant else method
        raise InputError(f"no {which} weights in {bundle_dir / 'models'} fit this input's protocol "
                         f"({_describe_protocol(protocol)}); the bundle has: {', '.join(seen) or 'none'}; "
                         "train a model for this protocol (README.md, 'MONAI bundles') or pass --weights"
                         + ("" if variant in PROTOCOL_FREE or not any("any protocol" in x for x in seen) else
                            ", or --variant " + " or ".join(k for k in EXPERIMENTAL if any(_VARIANT_WORDS[k] in x for x in seen))
                            + " (experimental: any protocol, less accurate than the classical fit on the real scans or the "
                            "validation half)"))
    _, _, path, kind = min(fits)
    why = (f"{'--variant ' + variant + ': ' if variant else ''}the most accurate validated {method} weights for the "
           f"input's protocol among {len(seen)} shipped" + (f" ({_VARIANT_WORDS[kind]})" if method == "diffusor" else ""))
    return path, why


def refuse_map_prior(map_prior: bool, weights) -> None:
    """The bundle's ``inference.json`` maps with protocol-specific weights only: its transforms give a
    network images (and the fit) as the condition, which a prior over maps does not take. Such weights
    (experimental), and protocol-free ones conditioned on the fit and its CRLB, map through
    ``qmri map --method diffusor --variant prior|crlb`` (or ``--weights``)."""
    if map_prior:
        raise InputError(f"{weights}: protocol-free weights (a map prior, or a fit + CRLB condition) are mapped with "
                         "`qmri map --method diffusor --variant prior|crlb` (or --weights), not with the bundle's inference.json")


def sha256_of(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_record(path: str | Path, choice: str | None = None) -> dict:
    """What every output sidecar says about the weights that made the maps: file name, path, sha256,
    the card's contents (None where there is none) and why they were used."""
    from ..bundle.training import read_weights_card

    path = Path(path)
    try:
        card = read_weights_card(path)
    except ValueError as e:
        raise InputError(str(e)) from None
    return {"File": path.name, "Path": str(path.resolve()), "SHA256": sha256_of(path), "Card": card,
            "Choice": choice or "given (--weights or the config's ckpt_path)"}


def run_info(method: str, network, inferer=None, fit_condition: bool = False) -> dict:
    """The settings of a learned method's run, the same in ``qmri map`` and the bundle's
    ``inference.json``: the Diffusor's ensemble (size, sampler, network evaluations, seed,
    self-ensemble frames, condition variant), the RIM's steps and likelihood."""
    if method == "diffusor":
        inf = inferer
        dc = getattr(inf, "data_consistency", None)
        return {"n_samples": inf.n_samples, "sampler": inf.sampler,
                "network_evaluations_per_sample": inf.network_evaluations, "fit_condition": bool(fit_condition),
                "fit_residual": bool(getattr(inf, "residual", False)), "map_prior": bool(getattr(inf, "map_prior", False)),
                "crlb_condition": getattr(inf, "network_channels", None) is not None and not getattr(inf, "map_prior", False),
                "start_timestep": getattr(inf, "start_timestep", None), "dc_anneal": getattr(inf, "dc_anneal", 0.0),
                "seed": inf.seed, "symmetry": inf.symmetry,
                "data_consistency": dc.describe() if dc is not None else {"strength": 0.0}}
    if method == "rim":
        return {"n_steps": network.n_steps, "likelihood": network.noise}
    return {}


def with_posterior_std(mean: torch.Tensor, std: torch.Tensor, images: torch.Tensor, sigma, protocol, dc) -> torch.Tensor:
    """The Diffusor's std with the data-consistency step's posterior std added in quadrature, per slice:
    ``mean``/``std`` (Z, 3, H, W) in the output convention, ``images`` (Z, N, H, W) as measured, ``sigma``
    their noise std (a number or one per slice; None/NaN: ``std`` unchanged). The members of an
    ensemble that are all pulled toward the same images agree more than the images determine the maps;
    :meth:`custom_components.methods.data_consistency.DataConsistency.posterior_std` is that part
    (computed in the label convention at the mean, PD and B converted to the output convention by the
    ratio of their values: first order)."""
    from ..data.synthesis import labels_from_maps

    out = std.clone()
    sig = torch.as_tensor(np.nan if sigma is None else sigma, dtype=torch.float64).reshape(-1).expand(mean.shape[0])
    for z in range(mean.shape[0]):
        sz = float(sig[z])
        if not (np.isfinite(sz) and sz > 0):
            continue
        m = mean[z].double()
        # the step's own label convention: apparent where its model is (dc.apparent), else the output one
        lab = labels_from_maps(m[0], m[1], m[2], protocol) if dc.apparent else m
        post = dc.posterior_std(lab, torch.as_tensor(images[z]).double(), sz)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = torch.where(lab.abs() > 0, m / lab, torch.ones_like(m))
        post = post * torch.nan_to_num(ratio.abs(), nan=1.0, posinf=1.0)
        out[z] = torch.sqrt(std[z].double() ** 2 + post**2).to(std.dtype)
    return out


def data_consistency(protocol, strength: float, noise: str = "rician", n_coils: int = 1, crlb_factor: float = 0.0):
    """The Diffusor inferer's data-consistency step for the bundle configs (``inference.json``'s
    ``dc_strength`` and ``dc_crlb_factor``): a :class:`custom_components.methods.data_consistency.DataConsistency`
    for the protocol (a preset name, a dict or a Protocol), None for strength 0."""
    from ..methods.data_consistency import DataConsistency
    from ..physics.protocol import get_protocol

    return (DataConsistency(get_protocol(protocol), float(strength), noise, int(n_coils), crlb_factor=float(crlb_factor))
            if strength else None)


def background_sigma(data: np.ndarray) -> float | None:
    """The noise std of magnitude data (..., N) from its signal-free background
    (:func:`custom_components.methods.fitting.estimate_noise_sigma`), or None where there is no background."""
    from ..methods.fitting import estimate_noise_sigma

    try:
        return estimate_noise_sigma(data)
    except ValueError:
        return None


def noise_level(method: str, data: np.ndarray, sigma: float | None = None, noise: str = "rician",
                n_coils: int = 1) -> tuple[float | None, dict]:
    """The noise std a learned method uses (the RIM's likelihood, the Diffusor's data-consistency):
    ``sigma`` if given, else from the background of ``data`` (X, Y, Z, N) for the noise model
    (root-sum-of-squares of ``n_coils`` for "ncchi"), None where there is no background; and what the
    sidecars say about it. The same for ``qmri map`` and the bundles' inference.json."""
    if method == "diffusor" and noise == "ncchi" and sigma is None:
        from ..methods.fitting import estimate_noise_sigma

        try:
            sigma = estimate_noise_sigma(data, n_coils=int(n_coils))
            return sigma, {"sigma_source": "estimated from signal-free background", "sigma": float(sigma)}
        except ValueError:
            return None, {"sigma_source": "unknown (no background)"}
    sigma, info = rim_noise_info(data, sigma)
    if method == "diffusor" and sigma is None:
        info["sigma_source"] = "unknown (no background)"
    return sigma, info


STD_CALIBRATION_FILE = "std_calibration.json"
#: the settings a std calibration entry was fitted with, and must match (:func:`std_calibration`)
CALIBRATION_SETTINGS = ("dc_strength", "dc_crlb_factor", "n_samples", "network_evaluations_per_sample", "sampler",
                         "symmetry", "start_timestep", "dc_anneal")
#: what a setting was before it could be chosen (entries and runs that do not name it)
CALIBRATION_DEFAULTS = {"dc_crlb_factor": 0.0, "start_timestep": None, "dc_anneal": 0.0}


def std_calibration(weights_path, info: dict) -> tuple[float, dict]:
    """The factor the Diffusor's ensemble std is multiplied by, and what the sidecars say about it.

    ``<weights folder>/std_calibration.json`` (written by ``scripts/dc_validation.py`` from the
    validation half of the robustness suite; data: numbers and names, checked here) holds, per weights
    file, the factor c that makes the 1-std coverage of the T1 error 68 % on the validation brains, and
    the settings it was fitted with (data-consistency strength, ensemble size, network evaluations,
    sampler, symmetry). c applies only to a run with those very settings (``info`` = :func:`run_info`);
    otherwise the std is left as the ensemble gives it (factor 1) and the record says why."""
    path = Path(weights_path).parent / STD_CALIBRATION_FILE
    name = Path(weights_path).name
    if not path.exists():
        return 1.0, {"factor": 1.0, "note": "uncalibrated: no std_calibration.json beside the weights"}
    try:
        table = json.loads(path.read_text())
        entry = table["weights"].get(name) if isinstance(table, dict) and isinstance(table.get("weights"), dict) else None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable std calibration ({type(e).__name__})") from None
    if entry is None:
        return 1.0, {"factor": 1.0, "note": f"uncalibrated: {name} is not in {path.name}"}
    factor = entry.get("factor") if isinstance(entry, dict) else None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not np.isfinite(factor) or not 0 < factor < 100:
        raise InputError(f"{path}: the factor of {name} must be a positive number, got {factor!r}")
    dc = info.get("data_consistency") or {}
    run = {"dc_strength": dc.get("strength", 0.0), "dc_crlb_factor": dc.get("crlb_factor", 0.0),
           **{k: info.get(k, CALIBRATION_DEFAULTS.get(k)) for k in CALIBRATION_SETTINGS[2:]}}
    entry = {**CALIBRATION_DEFAULTS, **entry}  # older entries: no CRLB bound, start from noise, constant strength
    differ = [k for k in CALIBRATION_SETTINGS if entry.get(k) != run[k]]
    if differ:
        return 1.0, {"factor": 1.0, "note": "uncalibrated: fitted with other settings (" + ", ".join(
            f"{k} {entry.get(k)!r} there, {run[k]!r} here" for k in differ) + ")"}
    return float(factor), {"factor": float(factor), "fitted_on": str(entry.get("fitted_on", "")), "file": path.name}


def calibrate_std(maps: dict, weights_path, info: dict) -> None:
    """Multiply the ``*_std`` maps by :func:`std_calibration`'s factor, in place, and record it in ``info``."""
    factor, record = std_calibration(weights_path, info)
    for k in [k for k in maps if k.endswith("_std")]:
        maps[k] = (maps[k] * factor).astype(np.float32)
    info["std_calibration"] = record


def rim_noise_info(data: np.ndarray, sigma: float | None = None) -> tuple[float | None, dict]:
    """The RIM's noise std: ``sigma`` if given, else from the background of ``data`` (X, Y, Z, N)
    (None where there is none: the Gaussian likelihood), and what the sidecars say about it."""
    info = {}
    if sigma is None:
        sigma = background_sigma(data)
        info["sigma_source"] = ("estimated from signal-free background" if sigma is not None
                                else "unknown (no background): Gaussian likelihood")
    if sigma is not None:
        info["sigma"] = float(sigma)
    return sigma, info


class BundleMapper:
    """A trained bundle (diffusor, resnet or rim) ready to map series.

    Args:
        bundle_dir: the bundle folder (default: bundles/<method> of this repository).
        weights: a weights file (default: the config's ``ckpt_path``, ``<bundle>/models/model.pt``).
        overrides: config overrides (e.g. {"n_samples": 10, "sampler": "ddpm", "steps": 20}).
        device: "cpu", "cuda", ...
        method: which kind of bundle (default: read from the config's ``method``, else "diffusor").
    """

    def __init__(self, bundle_dir: str | Path | None = None, weights: str | Path | None = None,
                 overrides: dict | None = None, device: str = "cpu", method: str | None = None):
        from monai.bundle import ConfigParser

        self.bundle_dir = Path(bundle_dir) if bundle_dir is not None else REPO_BUNDLES / (method or "diffusor")
        cfg = self.bundle_dir / "configs" / "inference.json"
        if not cfg.exists():
            raise InputError(f"{self.bundle_dir}: not a bundle (no configs/inference.json)")
        parser = ConfigParser()
        parser.read_config(str(cfg))
        parser["bundle_root"] = str(self.bundle_dir)
        from ..io.series import parse_device

        parser["device"] = parse_device(device)  # a torch.device object, never text in a "$" expression
        for k, v in (overrides or {}).items():
            parser[k] = v
        self.parser = parser
        bundle_method = parser.get("method", "diffusor")
        if method is not None and method != bundle_method:
            raise InputError(f"{self.bundle_dir} is a {bundle_method} bundle, not a {method} one")
        self.method = bundle_method
        if self.method not in LEARNED_METHODS:
            raise InputError(f"{self.bundle_dir}: unknown learned method {self.method!r}")
        self.device = torch.device(device)
        path = Path(weights) if weights is not None else Path(parser.get_parsed_content("ckpt_path"))
        if not path.exists():
            raise InputError(f"{path}: no trained weights; train the bundle first (see its docs/README.md)")
        from ..bundle.training import read_weights, read_weights_card

        state = read_weights(path)

        parser["ckpt_path"] = str(path)  # config expressions that read the weights' card see these weights
        try:
            card = read_weights_card(path)
        except ValueError as e:
            raise InputError(str(e)) from None
        if card is not None:  # what the weights were trained with (written by training): protocol, variant, ...
            if card.get("method", self.method) != self.method:
                raise InputError(f"{path} holds {card['method']} weights (per {path.with_suffix('.json').name}), not {self.method} ones")
            for k, v in card.items():  # checked against the card schema: plain data, no "$"/"@"/"%" strings
                if k != "method" and k not in (overrides or {}) and k in parser:
                    parser[k] = json.dumps(v) if k == "protocol" else v
        self.fit_condition = self.fit_residual = self.map_prior = self.crlb_condition = False
        if self.method == "diffusor":
            # weights trained with the classical fit in the condition have 3 more input channels
            w_in = state.get("conv_in.conv.weight") if isinstance(state, dict) else None
            if w_in is not None and "fit_condition" not in (overrides or {}) and not (card and "fit_condition" in card):
                n_img = int(parser.get_parsed_content("n_images"))
                parser["fit_condition"] = bool(w_in.shape[1] == 3 + n_img + 3)
            self.fit_condition = bool(parser.get_parsed_content("fit_condition"))
            self.fit_residual = bool(parser.get_parsed_content("fit_residual")) if "fit_residual" in parser else False
            self.map_prior = bool(parser.get_parsed_content("map_prior")) if "map_prior" in parser else False
            self.crlb_condition = bool(parser.get_parsed_content("crlb_condition")) if "crlb_condition" in parser else False
        self.network = parser.get_parsed_content("network_def").to(self.device)
        try:
            self.network.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - anything unreadable is bad input here
            raise InputError(f"{path}: cannot load weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        self.network.eval()
        self.weights_path = path
        self.inferer = parser.get_parsed_content("inferer") if self.method == "diffusor" else None
        from ..physics.protocol import get_protocol

        self.protocol = get_protocol(parser.get_parsed_content("protocol"))
        from ..bundle.transforms import SliceConditiond

        self._conditioner = SliceConditiond(self.fit_condition, self.protocol)  # the bundle's own preprocessing
        self._fitters = {}  # a protocol-free model's classical fit (its condition, start and scale), per protocol

    def set_data_consistency(self, strength: float | None = None, noise: str = "rician", n_coils: int = 1,
                             protocol=None, crlb_factor: float | None = None) -> None:
        """The Diffusor's data-consistency step (:mod:`custom_components.methods.data_consistency`) for
        the following :meth:`map_slice` calls: ``strength`` the relative prior width (0: off; None: the
        bundle config's ``dc_strength``, else the package default), ``noise``/``n_coils`` the noise
        model, ``protocol`` the series' (None: the bundle's), ``crlb_factor`` the CRLB bound (None: the
        bundle config's ``dc_crlb_factor``, else the package default)."""
        from ..methods.data_consistency import DEFAULT_CRLB_FACTOR, DEFAULT_STRENGTH, NOISE_MODELS, DataConsistency

        if self.method != "diffusor":
            raise InputError(f"data-consistency applies to the diffusor only, not to {self.method}")
        values = []
        for flag, key, value, default in (("--dc", "dc_strength", strength, DEFAULT_STRENGTH),
                                          ("--dc_crlb", "dc_crlb_factor", crlb_factor, DEFAULT_CRLB_FACTOR)):
            if value is None:  # the bundle config's, else the package default
                value = self.parser.get_parsed_content(key) if key in self.parser else default
            values.append(nonnegative_number(value, flag))
        strength, crlb_factor = values
        if noise not in NOISE_MODELS:
            raise InputError(f"--noise must be one of {', '.join(NOISE_MODELS)}, got {noise!r}")
        self.inferer.data_consistency = (DataConsistency(protocol or self.protocol, strength, noise, int(n_coils),
                                                         crlb_factor=crlb_factor,
                                                         labels_apparent=False if self.protocol_free else None)
                                         if strength > 0 else None)

    def check_protocol(self, series: IRSeries) -> None:
        """A learned model maps only the protocol it was trained for (re-train for another one).

        The RIM is physics-driven: it maps any protocol, with the series' own inversion times; so does a
        prior over maps (``map_prior``), through the data-consistency step's likelihood."""
        from ..physics.protocol import ProtocolError, check_same_timing

        if self.method == "rim":
            self.network.protocol = series.protocol  # physics-driven: the series' own inversion times
            return
        if self.protocol_free:
            self.protocol = series.protocol
            return
        try:
            check_same_timing(self.protocol, series.protocol)
        except ProtocolError as e:
            raise InputError(str(e)) from None

    @torch.no_grad()
    def map_slice(self, images: np.ndarray, sigma: float | None = None, protocol=None) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, H, W) magnitude images -> (T1 s, PD, B) maps (3, H, W) and, for the Diffusor, their
        ensemble std (3, H, W) (None for the deterministic methods). ``sigma``: the noise std of
        the images (the RIM's Rician likelihood and the Diffusor's data-consistency step, which is
        skipped without it; None: unknown). ``protocol``: the series' protocol, whose
        TR defines the output convention (:func:`decode_prediction`; None: the bundle's)."""
        from ..methods.scaling import signal_scale

        img = torch.as_tensor(np.asarray(images, dtype=np.float32))[None]  # one slice: (1, N, H, W)
        if protocol is None:
            protocol = self.network.protocol if self.method == "rim" else self.protocol
        if self.map_prior:
            s, cond = self.prior_condition(img[0], protocol)
            cond = cond[None].to(self.device)
        elif self.crlb_condition:
            s, cond = self.crlb_inputs(img[0], protocol, sigma)
            cond = cond[None].to(self.device)
        else:
            s = signal_scale(img)
            cond = self._conditioner({"image": img, "scale": s})["cond"][0][None].to(self.device)
        if self.method == "diffusor":
            dc = self.inferer.data_consistency
            if dc is not None and dc.protocol is not protocol and protocol is not None:
                self.set_data_consistency(dc.strength, dc.noise, dc.n_coils, protocol, dc.crlb_factor)
            dc_on = dc is not None and sigma is not None and np.isfinite(sigma) and sigma > 0
            # sigma / scale as the bundle config computes it (NoiseSigmad: float32), so both give the same maps
            pred = self.inferer(cond, self.network, sigma=(torch.full((1,), float(sigma)) / s.float()) if dc_on else None)
        elif self.method == "rim":
            sig = torch.tensor([float("nan") if sigma is None else float(sigma)]) / s
            pred = self.network(cond, sigma=sig.to(self.device))
        else:
            pred = self.network(cond)
        mean, std = decode_prediction(pred, s, protocol, labels_physical=self.protocol_free)
        if std is not None and self.method == "diffusor" and self.inferer.data_consistency is not None:
            std = with_posterior_std(mean, std, img, sigma, protocol, self.inferer.data_consistency)
        return mean[0].numpy(), (None if std is None else std[0].numpy())

    @property
    def batches_slices(self) -> bool:
        """Whether :meth:`map_slices` runs the network on several slices at once (ResNet, RIM)."""
        return not (self.method == "diffusor" or self.map_prior or self.crlb_condition)

    @torch.no_grad()
    def map_slices(self, images: np.ndarray, sigma: float | None = None, protocol=None) -> tuple[np.ndarray, np.ndarray | None]:
        """(Z, N, H, W) -> maps (Z, 3, H, W) and, for the Diffusor, their std (Z, 3, H, W): :meth:`map_slice`
        for a stack of slices. The deterministic networks (ResNet, RIM) take the stack as one batch (each
        slice with its own signal scale, as alone); the Diffusor, whose batch is its ensemble, and the
        protocol-free models go slice by slice."""
        from ..methods.scaling import signal_scale

        if not self.batches_slices:
            res = [self.map_slice(im, sigma, protocol) for im in images]
            return np.stack([r[0] for r in res]), (None if res[0][1] is None else np.stack([r[1] for r in res]))
        img = torch.as_tensor(np.asarray(images, dtype=np.float32))  # (Z, N, H, W)
        if protocol is None:
            protocol = self.network.protocol if self.method == "rim" else self.protocol
        s = signal_scale(img)  # (Z,)
        cond = torch.cat([self._conditioner({"image": img[z:z + 1], "scale": s[z:z + 1]})["cond"][0][None]
                          for z in range(len(img))]).to(self.device)
        if self.method == "rim":
            sig = torch.full((len(img),), float("nan") if sigma is None else float(sigma)) / s
            pred = self.network(cond, sigma=sig.to(self.device))
        else:
            pred = self.network(cond)
        mean, _ = decode_prediction(pred, s, protocol, labels_physical=self.protocol_free)
        return mean.numpy(), None

    def prior_condition(self, images: torch.Tensor, protocol) -> tuple[torch.Tensor, torch.Tensor]:
        """A map prior's inputs for one slice (N, H, W): the scale (1,) (:func:`custom_components.methods.scaling.map_scale`
        of the classical fit's PD over the voxels with signal) and [images / scale, the fit in network
        space] (N + 3, H, W): the images for the data-consistency step, the fit where the sampler starts
        (``start_timestep``). The fit is :class:`custom_components.bundle.transforms.ClassicalFitd`'s for
        the series' protocol, in the physical convention of the prior's labels."""
        from ..methods.scaling import encode_maps, map_scale

        fit = self._fitter(protocol)({"image": images})["fit"]
        s = map_scale(fit[1], fit[1] > 0).reshape(1)
        return s, torch.cat([images / s, encode_maps(fit, s[0])], dim=0)

    def crlb_inputs(self, images: torch.Tensor, protocol, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """A protocol-free model's inputs for one slice (N, H, W) of ``protocol`` with noise std ``sigma``
        (:func:`custom_components.bundle.transforms.fit_crlb_condition`, the function that made its
        training items): the scale (1,) and [images / scale, CRLB channels, the fit in network space]
        (N + 6, H, W). The network sees the last 6; the images reach the samples through the
        data-consistency step. Without a noise level there is no CRLB: refused (:func:`map_series_with_bundle`
        estimates one from the fit's residuals where the series has no background)."""
        from ..bundle.transforms import fit_crlb_condition

        if sigma is None or not np.isfinite(sigma) or sigma <= 0:
            raise InputError("a protocol-free Diffusor (--variant crlb) needs the images' noise level for its CRLB "
                             "condition, and this series has no signal-free background to estimate it from: give --sigma")
        s, info, fit, _ = fit_crlb_condition(images, protocol, float(sigma), self._fitter(protocol))
        return s, torch.cat([images / s, info, fit], dim=0)

    def _fitter(self, protocol):
        """The :class:`custom_components.bundle.transforms.ClassicalFitd` of ``protocol``, built once and kept
        for the last protocol seen (the slices of a series share one)."""
        from ..bundle.transforms import ClassicalFitd

        key = json.dumps(protocol.to_dict(), sort_keys=True)
        if key not in self._fitters:
            self._fitters = {key: ClassicalFitd(protocol)}
        return self._fitters[key]

    @property
    def protocol_free(self) -> bool:
        """The network never sees images, so it maps any protocol (a map prior, or a fit + CRLB condition)."""
        return self.map_prior or self.crlb_condition

    def info(self) -> dict:
        return run_info(self.method, self.network, self.inferer, self.fit_condition)


DiffusorMapper = BundleMapper  # the name used before the baselines existed


def map_series_with_bundle(series: IRSeries, mask: np.ndarray | None = None, method: str = "diffusor", bundle_dir=None,
                           weights=None, samples: int | None = None, steps: int | None = None,
                           sampler: str | None = None, device: str = "cpu", progress: bool = True, sigma=None,
                           seed: int | None = None, symmetry: str | None = None, variant: str | None = None,
                           dc: float | None = None, dc_crlb: float | None = None, noise: str = "rician",
                           n_coils: int = 1, start_timestep: int | None = None, dc_anneal: float | None = None, **_):
    """Map every slice of a series with a trained bundle; returns a :class:`custom_components.mapping.MappingResult`.

    ``seed``: the Diffusor's seed of the ensemble's initial noise (None: the bundle's, 0, so
    repeated runs give the same maps). ``symmetry``: the frames of the pixel grid the Diffusor's
    members are drawn in ("none", "flips" or "dihedral"; None: the bundle's, "dihedral"; see
    :class:`custom_components.methods.inferers.EnsembleDDPMInferer`).

    ``weights``: a weights file; None: :func:`choose_weights` picks the most accurate validated
    weights of the bundle for the series' protocol (``variant`` "images" or "fit" restricts the
    Diffusor's choice to that kind). Every result's ``info["weights"]`` is :func:`weights_record`
    (file name, sha256, card), which every output sidecar carries.

    For the RIM and the Diffusor's data-consistency the noise level is ``sigma`` if given, else
    estimated from the series' background (if there is none: unknown; the RIM then uses the Gaussian
    likelihood and the Diffusor runs without data-consistency, which its sidecar says).
    ``dc``: the Diffusor's data-consistency strength (:mod:`custom_components.methods.data_consistency`;
    0: off; None: the bundle's default), ``dc_crlb`` its CRLB bound (None: the bundle's default), with the
    noise model ``noise``/``n_coils`` (as for the fit). ``start_timestep``: a map prior's start from the
    classical fit noised to that DDPM timestep (-1: from pure noise; None: the bundle's
    ``prior_start_timestep``); weights other than a map prior always start from pure noise. ``dc_anneal``: the
    data-consistency strength's schedule over the sampler's steps (0: constant; None: the bundle's,
    ``prior_dc_anneal`` for a map prior; :class:`custom_components.methods.inferers.EnsembleDDPMInferer`)."""
    from ..methods.fitting import signal_mask
    from .results import MappingResult

    overrides = {k: v for k, v in (("n_samples", samples), ("steps", steps), ("sampler", sampler), ("seed", seed),
                                   ("symmetry", symmetry)) if v is not None}
    if start_timestep is not None:
        if isinstance(start_timestep, bool) or not isinstance(start_timestep, (int, np.integer)) \
                or not -1 <= int(start_timestep) < 1000:
            raise InputError(f"--start_timestep must be an integer in -1..999 (-1: pure noise), got {start_timestep!r}")
        overrides["prior_start_timestep"] = None if int(start_timestep) < 0 else int(start_timestep)
    if dc_anneal is not None:
        overrides["dc_anneal"] = nonnegative_number(dc_anneal, "--dc_anneal")
    if method != "diffusor" and (overrides or dc is not None or dc_crlb is not None):
        raise InputError(f"--samples/--steps/--sampler/--seed/--symmetry/--start_timestep/--dc_anneal/--dc/--dc_crlb apply to the "
                         f"diffusor only, not to {method}")
    from ..methods.inferers import SAMPLERS, SYMMETRIES

    for flag, value, choices in (("sampler", sampler, SAMPLERS), ("symmetry", symmetry, SYMMETRIES)):
        if value is not None and value not in choices:
            raise InputError(f"--{flag} must be one of {', '.join(choices)}, got {value!r}")
    if samples is not None and int(samples) < 1:
        raise InputError(f"--samples must be at least 1, got {samples}")
    choice = None
    if weights is None:
        weights, choice = choose_weights(bundle_dir if bundle_dir is not None else REPO_BUNDLES / method, method,
                                         series.protocol, variant)
    elif variant is not None:
        raise InputError("--variant chooses among the bundle's shipped weights; it cannot go with --weights")
    mapper = BundleMapper(bundle_dir, weights, overrides, device, method=method)
    if mapper.inferer is not None and not progress:
        mapper.inferer.progress = False  # --quiet: no sampler progress bars either (the config asks for them)
    mapper.check_protocol(series)
    data = series.data  # (X, Y, Z, N)
    info = {"bundle": str(mapper.bundle_dir), **mapper.info(), "weights": weights_record(mapper.weights_path, choice)}
    if method in ("rim", "diffusor"):
        sigma, noise_info = noise_level(method, data, sigma, noise, int(n_coils))
        info.update(noise_info)
    if method == "diffusor" and mapper.crlb_condition and sigma is None:
        # the CRLB condition needs a noise level: without a background, from the fit's residuals
        from ..methods.fitting import residual_noise_sigma

        try:
            sigma = residual_noise_sigma(data, series.protocol)
        except ValueError as e:
            raise InputError(f"the fit + CRLB Diffusor needs the images' noise level and this series has no "
                             f"signal-free background: {e}") from None
        info.update({"sigma_source": "estimated from the classical fit's residuals (no signal-free background)",
                     "sigma": float(sigma)})
    if method == "diffusor":
        mapper.set_data_consistency(dc, noise, int(n_coils), series.protocol, dc_crlb)
        info.update(mapper.info())
        if mapper.inferer.data_consistency is not None and sigma is None:
            info["data_consistency"] = {"strength": 0.0, "note": "skipped: no noise level (no signal-free background; pass --sigma)"}
    if mask is None:
        mask = signal_mask(data)
    shape = data.shape[:3]
    keys = ("T1", "PD", "B") + (("T1_std", "PD_std", "B_std") if method == "diffusor" else ())
    out = {k: np.zeros(shape, dtype=np.float32) for k in keys}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=shape[2], desc=method, unit="slice")
    batch = SLICE_BATCH if mapper.batches_slices else 1  # the Diffusor: a slice at a time, the bar moving with it
    for z0 in range(0, shape[2], batch):  # a volume in batches of slices: bounded memory
        zs = slice(z0, min(z0 + batch, shape[2]))
        means, stds = mapper.map_slices(np.moveaxis(data[:, :, zs, :], (2, 3), (0, 1)), sigma, series.protocol)
        for j, z in enumerate(range(zs.start, zs.stop)):
            for i, k in enumerate(("T1", "PD", "B")):
                out[k][:, :, z] = np.where(mask[:, :, z], means[j, i], 0)
                if stds is not None:
                    out[k + "_std"][:, :, z] = np.where(mask[:, :, z], stds[j, i], 0)
        if bar is not None:
            bar.update(zs.stop - zs.start)
    if bar is not None:
        bar.close()
    if method == "diffusor":
        calibrate_std(out, mapper.weights_path, info)
    return MappingResult(maps=out, mask=np.asarray(mask, bool), info=info)


#: slices per batch of the deterministic networks (ResNet, RIM) when a volume is mapped
SLICE_BATCH = 8


def map_series_with_diffusor(series: IRSeries, mask: np.ndarray | None = None, **kw):
    return map_series_with_bundle(series, mask, method="diffusor", **kw)


class VolumePrepareBatch:
    """Inference batches of one series (batch size 1): inputs = its slices' conditions (Z, C, H, W);
    ``kwargs_keys`` maps network keyword arguments to batch keys (the RIM's ``sigma`` (Z,) and
    ``protocol`` (the series' protocol as JSON))."""

    def __init__(self, kwargs_keys: dict | None = None):
        self.kwargs_keys = dict(kwargs_keys or {})

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        kw = {name: (v if isinstance(v, str) else torch.as_tensor(v).to(device))
              for name, v in ((n, batchdata[key][0]) for n, key in self.kwargs_keys.items())}
        return batchdata["cond"][0].to(device, non_blocking=non_blocking), None, (), kw


class SliceBatchInferer:
    """Runs a network over the slices of a volume (Z, C, H, W) in chunks of ``max_batch`` slices;
    tensor keyword arguments with one value per slice (e.g. ``sigma``) are chunked alongside."""

    def __init__(self, max_batch: int = 8):
        self.max_batch = int(max_batch)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        outs = []
        n = inputs.shape[0]
        for i in range(0, n, self.max_batch):
            kw = {k: (v[i:i + self.max_batch] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v)
                  for k, v in kwargs.items()}
            outs.append(network(inputs[i:i + self.max_batch], *args, **kw))
        return torch.cat(outs)


class NoiseSigmad:
    """Adds ``sigma`` (Z,): the series' noise std from its background
    (:func:`custom_components.methods.fitting.estimate_noise_sigma`) divided by each slice's signal scale;
    NaN where there is no background (the RIM then uses the Gaussian likelihood)."""

    def __init__(self, raw_key: str = "image", sigma: float | None = None):
        self.raw_key = raw_key
        self.sigma = sigma

    def __call__(self, data):
        d = dict(data)
        img = d[self.raw_key]  # (Z, N, X, Y), not yet divided by the scale
        sigma = self.sigma if self.sigma is not None else background_sigma(np.moveaxis(img.numpy(), 1, -1))
        d["sigma"] = torch.full((img.shape[0],), float("nan") if sigma is None else float(sigma)) / d["scale"].float()
        return d


__all__ = ["refuse_map_prior", "BundleMapper", "decode_prediction", "background_sigma", "DiffusorMapper", "LEARNED_METHODS", "map_series_with_bundle", "map_series_with_diffusor", "VolumePrepareBatch", "SliceBatchInferer", "NoiseSigmad",
           "VARIANTS", "PREFERENCE", "weights_variant", "shipped_weights", "choose_weights", "sha256_of", "weights_record",
           "run_info", "rim_noise_info", "data_consistency", "noise_level", "std_calibration", "calibrate_std", "with_posterior_std"]
