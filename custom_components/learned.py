"""Mapping real series with a trained bundle (the Diffusor now; the ResNet and RIM plug in the same way).

``DiffusorMapper(bundle_dir)`` reads the bundle's ``configs/inference.json`` (network definition,
scheduler, ensemble inferer, protocol), loads ``models/model.pt`` with ``weights_only=True`` and
maps a series slice by slice: images / s (the robust signal scale), optionally with the classical
fit as extra condition, ``n_samples`` maps drawn in one batch, decoded to T1 (s), PD, B, and their
voxel-wise mean and standard deviation. ``qmri map --method diffusor`` and the bundle's
``inference.json`` ``run`` both call :func:`map_series_with_diffusor`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .io import InputError, IRSeries

REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


class DiffusorMapper:
    """A trained qMRI Diffusor ready to map series.

    Args:
        bundle_dir: the bundle folder (default: bundles/diffusor of this repository).
        weights: a weights file (default: ``<bundle>/models/model.pt``).
        overrides: config overrides (e.g. {"n_samples": 10, "sampler": "ddpm", "steps": 20}).
        device: "cpu", "cuda", ...
    """

    def __init__(self, bundle_dir: str | Path | None = None, weights: str | Path | None = None,
                 overrides: dict | None = None, device: str = "cpu"):
        from monai.bundle import ConfigParser

        self.bundle_dir = Path(bundle_dir) if bundle_dir is not None else REPO_BUNDLES / "diffusor"
        cfg = self.bundle_dir / "configs" / "inference.json"
        if not cfg.exists():
            raise InputError(f"{self.bundle_dir}: not a bundle (no configs/inference.json)")
        parser = ConfigParser()
        parser.read_config(str(cfg))
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = f"$torch.device('{device}')"
        for k, v in (overrides or {}).items():
            parser[k] = v
        self.parser = parser
        self.device = torch.device(device)
        path = Path(weights) if weights is not None else Path(parser.get_parsed_content("ckpt_path"))
        if not path.exists():
            raise InputError(f"{path}: no trained weights; train the bundle first (see its docs/README.md)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - anything unreadable is bad input here
            raise InputError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        # weights trained with the classical fit in the condition have 3 more input channels
        w_in = state.get("conv_in.conv.weight") if isinstance(state, dict) else None
        if w_in is not None and "fit_condition" not in (overrides or {}):
            n_img = int(parser.get_parsed_content("n_images"))
            parser["fit_condition"] = bool(w_in.shape[1] == 3 + n_img + 3)
        self.network = parser.get_parsed_content("network_def").to(self.device)
        try:
            self.network.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - anything unreadable is bad input here
            raise InputError(f"{path}: cannot load weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        self.network.eval()
        self.inferer = parser.get_parsed_content("inferer")
        self.fit_condition = bool(parser.get_parsed_content("fit_condition"))
        from .protocol import get_protocol

        self.protocol = get_protocol(parser.get_parsed_content("protocol"))
        from .transforms import SliceConditiond

        self._conditioner = SliceConditiond(self.fit_condition, self.protocol)  # the bundle's own preprocessing

    def check_protocol(self, series: IRSeries) -> None:
        """A learned model maps only the protocol it was trained for (re-train for another one)."""
        from .protocol import ProtocolError, check_same_inversion_times

        try:
            check_same_inversion_times(self.protocol, series.protocol)
        except ProtocolError as e:
            raise InputError(str(e)) from None

    @torch.no_grad()
    def map_slice(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) magnitude images -> mean (3, H, W) and std (3, H, W) of (T1 s, PD, B)."""
        from .inferers import ensemble_statistics
        from .scaling import signal_scale

        img = torch.as_tensor(np.asarray(images, dtype=np.float32))[None]  # one slice: (1, N, H, W)
        s = signal_scale(img)
        cond = self._conditioner({"image": img, "scale": s})["cond"][0]
        samples = self.inferer(cond[None].to(self.device), self.network)
        mean, std = ensemble_statistics(samples.float().cpu(), s)
        return mean[0].numpy(), std[0].numpy()


def map_series_with_diffusor(series: IRSeries, mask: np.ndarray | None = None, bundle_dir=None, weights=None,
                             samples: int | None = None, steps: int | None = None, sampler: str | None = None,
                             device: str = "cpu", progress: bool = True, **_):
    """Map every slice of a series with the Diffusor; returns a :class:`custom_components.mapping.MappingResult`."""
    from .fitting import signal_mask
    from .mapping import MappingResult

    overrides = {k: v for k, v in (("n_samples", samples), ("steps", steps), ("sampler", sampler)) if v is not None}
    mapper = DiffusorMapper(bundle_dir, weights, overrides, device)
    mapper.check_protocol(series)
    data = series.data  # (X, Y, Z, N)
    if mask is None:
        mask = signal_mask(data)
    shape = data.shape[:3]
    out = {k: np.zeros(shape, dtype=np.float32) for k in ("T1", "PD", "B", "T1_std", "PD_std", "B_std")}
    zs = range(shape[2])
    if progress:
        from tqdm.auto import tqdm
        zs = tqdm(zs, desc="diffusor", unit="slice")
    for z in zs:
        mean, std = mapper.map_slice(np.moveaxis(data[:, :, z, :], -1, 0))
        for i, k in enumerate(("T1", "PD", "B")):
            out[k][:, :, z] = np.where(mask[:, :, z], mean[i], 0)
            out[k + "_std"][:, :, z] = np.where(mask[:, :, z], std[i], 0)
    inf = mapper.inferer
    info = {"bundle": str(mapper.bundle_dir), "n_samples": inf.n_samples, "sampler": inf.sampler,
            "network_evaluations_per_sample": inf.network_evaluations, "fit_condition": mapper.fit_condition,
            "seed": inf.seed}
    return MappingResult(maps=out, mask=np.asarray(mask, bool), info=info)




class VolumePrepareBatch:
    """Inference batches of one series (batch size 1): inputs = its slices' conditions (Z, C, H, W)."""

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        return batchdata["cond"][0].to(device, non_blocking=non_blocking), None, (), {}


class SaveMapsHandler:
    """Evaluator handler: ensemble samples of a series -> T1/PD/B mean and std maps, written with
    :func:`custom_components.io.save_maps` (the ``qmri map`` contract) into ``output_dir`` (a
    sub-folder per input when there are several)."""

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
        from .inferers import ensemble_statistics
        from .io import save_maps
        from .mapping import MappingResult, output_arrays, sidecars_for
        from .protocol import Protocol

        batch, samples = engine.state.batch, engine.state.output["pred"]
        mean, std = ensemble_statistics(samples.float().cpu(), batch["scale"][0].float().cpu())  # (Z, 3, H, W)
        mask = batch["mask"][0].cpu().numpy().astype(bool)  # (Z, H, W)
        maps = {}
        for i, k in enumerate(("T1", "PD", "B")):
            maps[k] = np.transpose(np.where(mask, mean[:, i].numpy(), 0), (1, 2, 0))
            maps[k + "_std"] = np.transpose(np.where(mask, std[:, i].numpy(), 0), (1, 2, 0))
        source = batch["source"][0]
        prot = Protocol.from_dict(json.loads(batch["protocol_json"][0]))
        series = IRSeries(data=np.zeros(mask.shape[1:] + mask.shape[:1] + (prot.n_images,)),
                          affine=batch["affine"][0].cpu().numpy(), protocol=prot, source=source,
                          notes=[batch["notes"][0]] if batch.get("notes") else [])
        inf = engine.inferer
        res = MappingResult(maps=maps, mask=np.transpose(mask, (1, 2, 0)),
                            info={"n_samples": inf.n_samples, "sampler": inf.sampler,
                                  "network_evaluations_per_sample": inf.network_evaluations, "seed": inf.seed})
        out = self.output_dir / Path(source).name.split(".")[0] if self.per_input_folder else self.output_dir
        save_maps(out, output_arrays(res), series.affine, sidecars_for(res, series, self.method), overwrite=self.overwrite)
        self.written.append(out)



__all__ = ["DiffusorMapper", "map_series_with_diffusor", "VolumePrepareBatch", "SaveMapsHandler"]
