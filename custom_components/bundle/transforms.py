"""MONAI dictionary transforms that the bundle configs chain together.

    {"index": i} --SyntheticItemd--> {"image" (N,H,W), "label" (3,H,W) T1 s/PD/B, "mask" (1,H,W), "snr"}
                 --ClassicalFitd--->  + "fit" (3,H,W): the classical fit of the images (optional condition)
                 --QMRIScaled------>  image / s, label and fit in tanh space, "scale" = s
                 --ConcatItemsd---->  "cond" = [image, fit] (or image alone)

The same ``ClassicalFitd`` + ``QMRIScaled`` run on real scans at inference, so the network sees
the same inputs in training and use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from monai.transforms import MapTransform, Transform

from ..physics.protocol import ProtocolError, check_same_timing, get_protocol


class SyntheticItemd(Transform):
    """Item ``d[index_key]`` of the on-the-fly synthetic dataset (deterministic for the config's seed)."""

    def __init__(self, config: Mapping, index_key: str = "index"):
        from ..data.synthesis import SynthesisConfig, SyntheticIRDataset

        cfg = dict(config)
        self.dataset = SyntheticIRDataset(SynthesisConfig(**cfg))
        self.index_key = index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        d.update(self.dataset[int(d[self.index_key])])
        return d


class ClassicalFitd(MapTransform):
    """Adds the classical magnitude least-squares fit of ``image`` (N, H, W) as ``out_key`` (3, H, W).

    T1 (s) is clipped to [0, ``t1_max_s``] and B to [0, 3]; voxels without signal (max over TIs
    below ``threshold`` x the robust maximum) get zeros, like the background of the labels.
    """

    def __init__(self, protocol="paper", image_key: str = "image", out_key: str = "fit", threshold: float = 0.03,
                 t1_max_s: float = 10.0):
        super().__init__([image_key])
        from ..methods.fitting import PRECISE_FIT, InversionRecoveryModel

        # the condition the shipped models were trained on (PRECISE_FIT: 96 grid values, float64, refinement run
        # to its end; the default fit's stopping point in a flat valley moves with the rounding of the input)
        self.model = InversionRecoveryModel(get_protocol(protocol), **PRECISE_FIT)
        self.image_key, self.out_key = image_key, out_key
        self.threshold, self.t1_max_s = threshold, t1_max_s

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        img = torch.as_tensor(d[self.image_key])
        y = img.detach().cpu().double().numpy()
        y = np.moveaxis(y, 0, -1)  # (H, W, N)
        vmax = y.max(-1)
        mask = vmax > self.threshold * max(np.quantile(vmax, 0.995), 1e-12)
        fit = self.model.fit(np.clip(y, 0, None), mask=mask)
        maps = np.stack([np.clip(fit.t1, 0, self.t1_max_s), np.clip(fit.pd, 0, None), np.clip(fit.b, 0, 3.0)])
        d[self.out_key] = torch.as_tensor(maps, dtype=img.dtype)
        return d


#: The scale of a protocol-free condition: the 90th percentile of the fit's PD over the voxels whose brightest image
#: is above ``SCALE_MIN_SNR`` x sigma (tissue, not background noise) and whose T1 is inside the fit's
#: range (not clipped at its top). Where a protocol does not determine PD (TIs far
#: shorter than T1, noise-only fits) single voxels take arbitrary PDs, which a 99.5th percentile would
#: pick up; the 90th percentile of all tissue stays within a factor of about 2 of the true PD's.
SCALE_PERCENTILE = 90.0
SCALE_MIN_SNR = 5.0


def fit_crlb_condition(images: torch.Tensor, protocol, sigma: float, fitter: "ClassicalFitd | None" = None) -> tuple:
    """The inputs of a protocol-free Diffusor (``crlb_condition`` weights, issue 21 design (b)) for one
    slice of images (N, H, W) of ``protocol`` with noise std ``sigma`` (the images' units).

    The classical fit (:class:`ClassicalFitd`, the full model of the protocol, physical PD and B) gives
    the scale s (:func:`custom_components.methods.scaling.map_scale`: the :data:`SCALE_PERCENTILE` th
    percentile of its PD over the tissue voxels; no protocol in it), its maps in network space, and the information channels
    (:func:`custom_components.methods.scaling.encode_crlb`: how well this protocol and noise level
    determine each voxel's T1, PD and B). Returns (s (1,), info (3, H, W), encoded fit (3, H, W), fit
    (3, H, W) physical). The network sees [info, encoded fit] only; the images reach the samples through
    the data-consistency step. The same function makes the training items and the inference inputs."""
    from ..methods.scaling import encode_crlb, encode_maps, map_scale

    images = torch.as_tensor(images)
    fitter = fitter if fitter is not None else ClassicalFitd(protocol)
    fit = fitter({"image": images})["fit"]
    info = encode_crlb(fit, get_protocol(protocol), float(sigma)).to(images.dtype)
    tissue = (images.amax(0) > SCALE_MIN_SNR * float(sigma)) & (fit[1] > 0) & (fit[0] < 0.99 * fitter.t1_max_s)
    s = map_scale(fit[1], tissue, percentile=SCALE_PERCENTILE).reshape(1)
    return s, info, encode_maps(fit, s[0]).to(images.dtype), fit


class FitCRLBConditiond(Transform):
    """Training items of a protocol-free Diffusor (``crlb_condition``, issue 21 design (b)): each item of
    a random acquisition (``SynthesisConfig(protocol="random")``: its protocol as JSON text under
    ``protocol_key``, its SNR = 1 / sigma under ``snr_key``) gets ``cond`` = [information channels, the
    classical fit in network space] (6, H, W) from :func:`fit_crlb_condition`, its label (the
    physical maps) encoded with the same protocol-free scale, and "scale". The images, the protocol and
    the noise description are dropped (they differ in size between items and would not collate)."""

    def __init__(self, label_key: str = "label", protocol_key: str = "protocol", snr_key: str = "snr"):
        self.label_key, self.protocol_key, self.snr_key = label_key, protocol_key, snr_key

    def __call__(self, data: Mapping) -> dict:
        from ..methods.scaling import encode_maps

        d = dict(data)
        protocol = get_protocol(d.pop(self.protocol_key))
        sigma = 1.0 / float(torch.as_tensor(d[self.snr_key]))
        img = torch.as_tensor(d.pop("image"))
        s, info, fit, _ = fit_crlb_condition(img, protocol, sigma)
        d[self.label_key] = encode_maps(torch.as_tensor(d[self.label_key]), s[0]).to(img.dtype)
        d["scale"] = s
        d["cond"] = torch.cat([info, fit], dim=0)
        d.pop("noise", None)
        return d


class PriorMapsd(Transform):
    """Training items of a prior over maps (``map_prior`` Diffusor weights, issue 21 design (a)): the
    label (3, H, W) = (T1 s, PD, B) in the physical convention (synthesised with a full-recovery
    protocol, so labels and physical maps coincide) is put in network space with the protocol-free
    :func:`custom_components.methods.scaling.map_scale` of its PD, and ``cond`` is empty (0, H, W): the
    network never sees images. The images of the synthetic item are dropped."""

    def __init__(self, label_key: str = "label"):
        self.label_key = label_key

    def __call__(self, data: Mapping) -> dict:
        from ..methods.scaling import encode_maps, map_scale

        d = dict(data)
        label = torch.as_tensor(d[self.label_key])
        s = map_scale(label[1])
        d[self.label_key] = encode_maps(label, s)
        d["scale"] = s
        d["cond"] = label.new_zeros((0,) + tuple(label.shape[-2:]))
        d.pop("image", None)
        return d


class EnsureFloatd(MapTransform):
    """Cast the given keys to float32 tensors (after numpy-based steps)."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for k in self.key_iterator(d):
            v = d[k]
            v = v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)  # MetaTensor -> Tensor
            d[k] = v.float()
        return d




class LoadIRSeriesd(MapTransform):
    """Read ``d[key]`` (a NIfTI / DICOM folder / BIDS IRT1 path) with :func:`custom_components.io.load_series`.

    Produces, for a series of Z slices: ``key`` (Z, N, X, Y) float32 magnitude images, ``scale`` (Z,)
    the robust signal scale per slice, ``mask`` (Z, X, Y) voxels with signal, ``affine`` (4, 4),
    ``source`` (str). With ``protocol`` given, the series' TIs must match it (a learned model maps
    only the protocol it was trained for).
    """

    def __init__(self, keys=("image",), protocol=None, tis=None):
        super().__init__(keys)
        self.protocol = get_protocol(protocol) if protocol is not None else None
        self.tis = tis

    def __call__(self, data: Mapping) -> dict:
        from ..methods.fitting import signal_mask
        from ..io import InputError, load_series
        from ..methods.scaling import signal_scale

        d = dict(data)
        for key in self.key_iterator(d):
            series = load_series(d[key], tis=self.tis)
            if self.protocol is not None:
                try:
                    check_same_timing(self.protocol, series.protocol, str(series.source))
                except ProtocolError as e:
                    raise InputError(str(e)) from None
            img = torch.as_tensor(np.ascontiguousarray(np.transpose(series.data, (2, 3, 0, 1))), dtype=torch.float32)
            d[key] = img
            d["scale"] = signal_scale(img)
            d["mask"] = torch.as_tensor(np.transpose(signal_mask(series.data), (2, 0, 1)))
            d["affine"] = torch.as_tensor(series.affine)
            d["source"] = str(series.source)
            d["protocol_json"] = json.dumps(series.protocol.to_dict())  # a string survives collation
            d["timing_sources_json"] = json.dumps(dict(series.protocol.timing_sources or {}))  # for the sidecars
            d["notes"] = "; ".join(series.notes)
        return d


class SliceConditiond(Transform):
    """``cond`` (Z, C, X, Y) = image / scale per slice [+ the classical fit in tanh space]."""

    def __init__(self, fit_condition: bool = False, protocol="paper", image_key: str = "image"):
        self.fit = ClassicalFitd(protocol) if fit_condition else None
        self.image_key = image_key

    def __call__(self, data: Mapping) -> dict:
        from ..methods.scaling import encode_maps

        d = dict(data)
        img, s = d[self.image_key], d["scale"]
        cond = img / s.view(-1, 1, 1, 1)
        if self.fit is not None:
            fits = torch.stack([self.fit({"image": img[z]})["fit"] for z in range(img.shape[0])])
            cond = torch.cat([cond, encode_maps(fits, s)], dim=1)
        d["cond"] = cond
        return d


__all__ = ["SyntheticItemd", "PriorMapsd", "ClassicalFitd", "EnsureFloatd", "LoadIRSeriesd", "SliceConditiond"]
