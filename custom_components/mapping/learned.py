"""Mapping real series with a trained bundle: the Diffusor, the ResNet or the RIM.

``BundleMapper(bundle_dir)`` reads the bundle's ``configs/inference.json`` (network definition,
scheduler and ensemble inferer for the Diffusor, protocol), loads ``models/model.pt`` with
``weights_only=True`` and maps a series slice by slice: images / s (the robust signal scale),
optionally with the classical fit as extra condition; the Diffusor draws ``n_samples`` maps in
one batch (-> mean and voxel-wise std), the ResNet regresses the maps, the RIM iterates with the
likelihood gradient of the series' own protocol. ``qmri map --method diffusor|resnet|rim`` calls
:func:`map_series_with_bundle`; the bundles' ``inference.json`` share the transforms and
:class:`SaveMapsHandler`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..io import InputError, IRSeries

REPO_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


LEARNED_METHODS = ("diffusor", "resnet", "rim")


def decode_prediction(pred: torch.Tensor, scale: torch.Tensor, protocol) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Network-space output -> (T1 s, PD, B) maps in the output convention (physical, TR-corrected
    PD and B of the full model; docs/physics.md): an ensemble (B, S, 3, H, W) (the Diffusor) gives
    its mean and voxel-wise std, a single estimate (B, 3, H, W) (ResNet, RIM) gives the maps and None.

    The networks were trained on the synthetic labels, which are apparent (PD, B) for a constant
    finite TR (:mod:`custom_components.data.synthesis`); ``protocol`` (the mapped series' own) turns
    each estimate, every ensemble member before the statistics, into the output convention with
    :func:`custom_components.data.synthesis.maps_from_labels` (the exact inverse)."""
    from ..data.synthesis import labels_are_apparent, maps_from_labels
    from ..methods.inferers import ensemble_statistics
    from ..methods.scaling import decode_maps, encode_maps

    pred = pred.float().cpu()
    if pred.ndim == 5:
        if labels_are_apparent(protocol):  # members -> output convention, back in network space for the statistics
            s = torch.as_tensor(scale, dtype=pred.dtype)
            s = s[:, None] if s.ndim == 1 else s
            pred = encode_maps(maps_from_labels(decode_maps(pred, s), protocol, dim=-3), s)
        return ensemble_statistics(pred, scale)
    return maps_from_labels(decode_maps(pred, scale), protocol, dim=-3), None


def background_sigma(data: np.ndarray) -> float | None:
    """The noise std of magnitude data (..., N) from its signal-free background
    (:func:`custom_components.methods.fitting.estimate_noise_sigma`), or None where there is no background."""
    from ..methods.fitting import estimate_noise_sigma

    try:
        return estimate_noise_sigma(data)
    except ValueError:
        return None


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
        from ..bundle.training import parse_device

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
        self.fit_condition = self.fit_residual = False
        if self.method == "diffusor":
            # weights trained with the classical fit in the condition have 3 more input channels
            w_in = state.get("conv_in.conv.weight") if isinstance(state, dict) else None
            if w_in is not None and "fit_condition" not in (overrides or {}) and not (card and "fit_condition" in card):
                n_img = int(parser.get_parsed_content("n_images"))
                parser["fit_condition"] = bool(w_in.shape[1] == 3 + n_img + 3)
            self.fit_condition = bool(parser.get_parsed_content("fit_condition"))
            self.fit_residual = bool(parser.get_parsed_content("fit_residual")) if "fit_residual" in parser else False
        self.network = parser.get_parsed_content("network_def").to(self.device)
        try:
            self.network.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - anything unreadable is bad input here
            raise InputError(f"{path}: cannot load weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        self.network.eval()
        self.inferer = parser.get_parsed_content("inferer") if self.method == "diffusor" else None
        from ..physics.protocol import get_protocol

        self.protocol = get_protocol(parser.get_parsed_content("protocol"))
        from ..bundle.transforms import SliceConditiond

        self._conditioner = SliceConditiond(self.fit_condition, self.protocol)  # the bundle's own preprocessing

    def check_protocol(self, series: IRSeries) -> None:
        """A learned model maps only the protocol it was trained for (re-train for another one).

        The RIM is physics-driven: it maps any protocol, with the series' own inversion times."""
        from ..physics.protocol import ProtocolError, check_same_timing

        if self.method == "rim":
            self.network.protocol = series.protocol  # physics-driven: the series' own inversion times
            return
        try:
            check_same_timing(self.protocol, series.protocol)
        except ProtocolError as e:
            raise InputError(str(e)) from None

    @torch.no_grad()
    def map_slice(self, images: np.ndarray, sigma: float | None = None, protocol=None) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, H, W) magnitude images -> (T1 s, PD, B) maps (3, H, W) and, for the Diffusor, their
        ensemble std (3, H, W) (None for the deterministic methods). ``sigma``: the noise std of
        the images (RIM's Rician likelihood; None: unknown). ``protocol``: the series' protocol, whose
        TR defines the output convention (:func:`decode_prediction`; None: the bundle's)."""
        from ..methods.scaling import signal_scale

        img = torch.as_tensor(np.asarray(images, dtype=np.float32))[None]  # one slice: (1, N, H, W)
        s = signal_scale(img)
        cond = self._conditioner({"image": img, "scale": s})["cond"][0][None].to(self.device)
        if self.method == "diffusor":
            pred = self.inferer(cond, self.network)
        elif self.method == "rim":
            sig = torch.tensor([float("nan") if sigma is None else float(sigma)]) / s
            pred = self.network(cond, sigma=sig.to(self.device))
        else:
            pred = self.network(cond)
        if protocol is None:
            protocol = self.network.protocol if self.method == "rim" else self.protocol
        mean, std = decode_prediction(pred, s, protocol)
        return mean[0].numpy(), (None if std is None else std[0].numpy())

    def info(self) -> dict:
        if self.method == "diffusor":
            inf = self.inferer
            return {"n_samples": inf.n_samples, "sampler": inf.sampler,
                    "network_evaluations_per_sample": inf.network_evaluations, "fit_condition": self.fit_condition,
                    "fit_residual": self.fit_residual,
                    "seed": inf.seed, "symmetry": inf.symmetry}
        if self.method == "rim":
            return {"n_steps": self.network.n_steps, "likelihood": self.network.noise}
        return {}


DiffusorMapper = BundleMapper  # the name used before the baselines existed


def map_series_with_bundle(series: IRSeries, mask: np.ndarray | None = None, method: str = "diffusor", bundle_dir=None,
                           weights=None, samples: int | None = None, steps: int | None = None,
                           sampler: str | None = None, device: str = "cpu", progress: bool = True, sigma=None,
                           seed: int | None = None, symmetry: str | None = None, **_):
    """Map every slice of a series with a trained bundle; returns a :class:`custom_components.mapping.MappingResult`.

    ``seed``: the Diffusor's seed of the ensemble's initial noise (None: the bundle's, 0, so
    repeated runs give the same maps). ``symmetry``: the frames of the pixel grid the Diffusor's
    members are drawn in ("none", "flips" or "dihedral"; None: the bundle's, "dihedral"; see
    :class:`custom_components.methods.inferers.EnsembleDDPMInferer`).

    For the RIM the noise level is ``sigma`` if given, else estimated from the series' background
    (if there is none: unknown, and the RIM uses the Gaussian likelihood)."""
    from ..methods.fitting import signal_mask
    from .results import MappingResult

    overrides = {k: v for k, v in (("n_samples", samples), ("steps", steps), ("sampler", sampler), ("seed", seed),
                                   ("symmetry", symmetry)) if v is not None}
    if method != "diffusor" and overrides:
        raise InputError(f"--samples/--steps/--sampler/--seed/--symmetry apply to the diffusor only, not to {method}")
    from ..methods.inferers import SAMPLERS, SYMMETRIES

    for flag, value, choices in (("sampler", sampler, SAMPLERS), ("symmetry", symmetry, SYMMETRIES)):
        if value is not None and value not in choices:
            raise InputError(f"--{flag} must be one of {', '.join(choices)}, got {value!r}")
    if samples is not None and int(samples) < 1:
        raise InputError(f"--samples must be at least 1, got {samples}")
    mapper = BundleMapper(bundle_dir, weights, overrides, device, method=method)
    if mapper.inferer is not None and not progress:
        mapper.inferer.progress = False  # --quiet: no sampler progress bars either (the config asks for them)
    mapper.check_protocol(series)
    data = series.data  # (X, Y, Z, N)
    info = {"bundle": str(mapper.bundle_dir), **mapper.info()}
    if method == "rim" and sigma is None:
        sigma = background_sigma(data)
        info["sigma_source"] = ("estimated from signal-free background" if sigma is not None
                                else "unknown (no background): Gaussian likelihood")
    if sigma is not None and method == "rim":
        info["sigma"] = float(sigma)
    if mask is None:
        mask = signal_mask(data)
    shape = data.shape[:3]
    keys = ("T1", "PD", "B") + (("T1_std", "PD_std", "B_std") if method == "diffusor" else ())
    out = {k: np.zeros(shape, dtype=np.float32) for k in keys}
    zs = range(shape[2])
    if progress:
        from tqdm.auto import tqdm
        zs = tqdm(zs, desc=method, unit="slice")
    for z in zs:
        mean, std = mapper.map_slice(np.moveaxis(data[:, :, z, :], -1, 0), sigma, series.protocol)
        for i, k in enumerate(("T1", "PD", "B")):
            out[k][:, :, z] = np.where(mask[:, :, z], mean[i], 0)
            if std is not None:
                out[k + "_std"][:, :, z] = np.where(mask[:, :, z], std[i], 0)
    return MappingResult(maps=out, mask=np.asarray(mask, bool), info=info)


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


class SaveMapsHandler:
    """Evaluator handler: the network output of a series -> T1/PD/B maps written with
    :func:`custom_components.io.save_maps` (the ``qmri map`` contract) into ``output_dir`` (a
    sub-folder per input when there are several). An ensemble (Z, S, 3, H, W) (the Diffusor) gives
    the mean and ``_std`` maps; a single estimate (Z, 3, H, W) (ResNet, RIM) gives the maps alone."""

    def __init__(self, output_dir: str, method: str = "diffusor", overwrite: bool = False, per_input_folder: bool = False):
        self.output_dir = Path(output_dir)
        self.method = method
        self.overwrite = overwrite
        self.per_input_folder = per_input_folder
        self.written: list[Path] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        from ..io import save_maps
        from .results import MappingResult, output_arrays, sidecars_for
        from ..physics.protocol import get_protocol

        batch = engine.state.batch
        mean, std = decode_prediction(engine.state.output["pred"], batch["scale"][0].float().cpu(),
                                      get_protocol(batch["protocol_json"][0]))  # (Z, 3, H, W), output convention
        mask = batch["mask"][0].cpu().numpy().astype(bool)  # (Z, H, W)
        maps = {}
        for i, k in enumerate(("T1", "PD", "B")):
            maps[k] = np.transpose(np.where(mask, mean[:, i].numpy(), 0), (1, 2, 0))
            if std is not None:
                maps[k + "_std"] = np.transpose(np.where(mask, std[:, i].numpy(), 0), (1, 2, 0))
        source = batch["source"][0]
        prot = get_protocol(batch["protocol_json"][0])
        series = IRSeries(data=np.zeros(mask.shape[1:] + mask.shape[:1] + (prot.n_images,)),
                          affine=batch["affine"][0].cpu().numpy(), protocol=prot, source=source,
                          notes=[n for n in str(batch.get("notes", [""])[0]).split("; ") if n])
        inf = engine.inferer
        info = {k: getattr(inf, a) for k, a in (("n_samples", "n_samples"), ("sampler", "sampler"),
                                                ("network_evaluations_per_sample", "network_evaluations"),
                                                ("seed", "seed"), ("symmetry", "symmetry")) if hasattr(inf, a)}
        res = MappingResult(maps=maps, mask=np.transpose(mask, (1, 2, 0)), info=info)
        out = self.output_dir / Path(source).name.split(".")[0] if self.per_input_folder else self.output_dir
        save_maps(out, output_arrays(res), series.affine, sidecars_for(res, series, self.method), overwrite=self.overwrite)
        self.written.append(out)


__all__ = ["BundleMapper", "decode_prediction", "background_sigma", "DiffusorMapper", "LEARNED_METHODS", "map_series_with_bundle", "map_series_with_diffusor", "VolumePrepareBatch", "SliceBatchInferer", "NoiseSigmad",
           "SaveMapsHandler"]
