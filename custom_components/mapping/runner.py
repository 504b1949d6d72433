"""One runner for ``qmri map`` and the bundles' ``configs/inference.json``: what happens to a method's
maps between the network and the files.

:func:`finish_result` adds the physics-consistency maps (Residualmap, and ResidualFlag where the noise
level is known: :func:`custom_components.mapping.mapper.add_consistency_maps`) and the method's name;
:func:`write_result` writes the output contract (:mod:`custom_components.mapping.results`) with
:func:`custom_components.io.save_maps`. ``qmri map`` calls both after
:func:`custom_components.mapping.mapper.map_series`; the bundles' inference workflow calls both from
:class:`SaveMapsHandler`, with the maps decoded by the same
:func:`custom_components.mapping.learned.decode_prediction` and the run described by the same
:func:`custom_components.mapping.learned.run_info` and
:func:`custom_components.mapping.learned.weights_record`. So both write the same files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..io import IRSeries, save_maps
from .learned import calibrate_std, decode_prediction, noise_level, run_info, weights_record, with_posterior_std
from .mapper import add_consistency_maps
from .results import FLAG_ALPHA, MappingResult, output_arrays, sidecars_for


def finish_result(result: MappingResult, series: IRSeries, method: str, sigma: float | None = None,
                  flag_alpha: float = FLAG_ALPHA) -> MappingResult:
    """The method's name and the consistency maps, in place (see :func:`add_consistency_maps`)."""
    result.info.setdefault("method", method)
    return add_consistency_maps(result, series, sigma=sigma, alpha=flag_alpha)


def write_result(out: str | Path, result: MappingResult, series: IRSeries, method: str, overwrite: bool = False,
                 protect=()) -> dict[str, Path]:
    """Write the maps of ``result`` with their sidecars into ``out`` (all or nothing: :func:`save_maps`)."""
    return save_maps(out, output_arrays(result), series.affine, sidecars_for(result, series, method),
                     overwrite=overwrite, protect=protect or (), spatial_codes=series.spatial_codes)


class SaveMapsHandler:
    """Evaluator handler of the bundles' ``inference.json``: the network output of a series -> the same
    MappingResult and files as ``qmri map`` (T1/PD/B maps, the Diffusor's ``_std`` maps, Residualmap,
    ResidualFlag; sidecars naming the weights), written into ``output_dir`` (a sub-folder per input
    when there are several).

    Args:
        output_dir, overwrite, per_input_folder: where to write.
        method: "diffusor", "resnet" or "rim".
        weights: the weights file the evaluator loaded (the config's ``ckpt_path``), for the sidecars.
        sigma: the RIM's noise std and the Diffusor's for its data-consistency (None: from the
            background, as ``qmri map``).
    """

    def __init__(self, output_dir: str, method: str = "diffusor", overwrite: bool = False,
                 per_input_folder: bool = False, weights: str | None = None, sigma: float | None = None):
        self.output_dir = Path(output_dir)
        self.method = method
        self.overwrite = overwrite
        self.per_input_folder = per_input_folder
        self.weights = weights
        self.sigma = sigma
        self.written: list[Path] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        from ..physics.protocol import get_protocol

        batch = engine.state.batch
        prot = get_protocol(batch["protocol_json"][0])
        mean, std = decode_prediction(engine.state.output["pred"], batch["scale"][0].float().cpu(),
                                      prot)  # (Z, 3, H, W), output convention
        mask = batch["mask"][0].cpu().numpy().astype(bool)  # (Z, H, W)
        dc = getattr(engine.inferer, "data_consistency", None) if self.method == "diffusor" else None
        if std is not None and dc is not None:  # as qmri map: the step's posterior std added to the ensemble's
            sig = batch["sigma"][0].double() * batch["scale"][0].double().cpu() if "sigma" in batch else None
            std = with_posterior_std(mean, std, batch["image"][0].cpu(), sig, prot, dc)
        maps = {}
        for i, k in enumerate(("T1", "PD", "B")):
            maps[k] = np.transpose(np.where(mask, mean[:, i].numpy(), 0), (1, 2, 0)).astype(np.float32)
            if std is not None:
                maps[k + "_std"] = np.transpose(np.where(mask, std[:, i].numpy(), 0), (1, 2, 0)).astype(np.float32)
        source = batch["source"][0]
        if "timing_sources_json" in batch:  # where each timing came from (provenance only, not in protocol_json)
            prot = dataclasses.replace(prot, timing_sources=json.loads(batch["timing_sources_json"][0]))
        images = batch["image"][0].cpu().numpy()  # (Z, N, X, Y), as read
        series = IRSeries(data=np.transpose(images, (2, 3, 0, 1)).astype(np.float64),
                          affine=batch["affine"][0].cpu().numpy(), protocol=prot, source=source,
                          notes=[n for n in str(batch.get("notes", [""])[0]).split("; ") if n])
        fit_condition = int(batch["cond"][0].shape[1]) > prot.n_images  # the classical fit is in the condition
        info = run_info(self.method, engine.network, engine.inferer, fit_condition)
        sigma = None
        if self.method in ("rim", "diffusor"):
            dc = getattr(engine.inferer, "data_consistency", None)
            sigma, noise_info = noise_level(self.method, series.data, self.sigma,
                                            dc.noise if dc is not None else "rician", dc.n_coils if dc is not None else 1)
            info.update(noise_info)
            if dc is not None and sigma is None:
                info["data_consistency"] = {"strength": 0.0, "note": "skipped: no noise level (no signal-free background; pass --sigma)"}
            if self.method == "diffusor":
                sigma = self.sigma  # as qmri map: the Diffusor's flag map uses a given sigma only
        if self.weights is not None:
            info["weights"] = weights_record(self.weights, "the bundle config's ckpt_path")
        if self.method == "diffusor" and self.weights is not None:
            calibrate_std(maps, self.weights, info)
        res = finish_result(MappingResult(maps=maps, mask=np.transpose(mask, (1, 2, 0)), info=info), series,
                            self.method, sigma=sigma)
        out = self.output_dir / Path(source).name.split(".")[0] if self.per_input_folder else self.output_dir
        write_result(out, res, series, self.method, overwrite=self.overwrite)
        self.written.append(out)


__all__ = ["finish_result", "write_result", "SaveMapsHandler"]
