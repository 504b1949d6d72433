"""The IR series every reader returns (:class:`IRSeries`), the input error, and the checks every reader ends with."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..physics.protocol import Protocol




class InputError(ValueError):
    """A problem with the user's input (files, folders, arguments); the message is a single line."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


def nonnegative_number(value, flag: str) -> float:
    """``value`` as a float if it is a finite number >= 0 (not a bool), else an :class:`InputError` naming
    ``flag`` (e.g. "--dc")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(f"{flag} must be a number >= 0, got {value!r}")
    return float(value)


#: The kinds of device ``--device`` accepts (the fit: cpu and cuda only).
DEVICE_KINDS = ("cpu", "mps", "cuda")


def parse_device(device, kinds: tuple[str, ...] = DEVICE_KINDS):
    """``--device`` as a :class:`torch.device`: only the plain forms of ``kinds`` ("cpu", "mps", "cuda" and
    "cuda:N"; or a torch.device); anything else is refused with :class:`InputError`. The value is never
    pasted into a config expression."""
    import torch

    if isinstance(device, torch.device):
        return device
    form = "|".join(k + "(:[0-9]{1,3})?" if k == "cuda" else k for k in kinds)
    if not isinstance(device, str) or not re.fullmatch(form, device):
        names = [k for k in kinds if k != "cuda"] + (["cuda or cuda:N"] if "cuda" in kinds else [])
        raise InputError(f"--device must be {', '.join(names)}, got {str(device)[:60]!r}")
    return torch.device(device)



@dataclass
class IRSeries:
    """An inversion-recovery series ready for fitting.

    Attributes:
        data: magnitude images, float64, shape (X, Y, Z, N); the last axis is the inversion, in the
            order of ``protocol.inversion_times_s`` (increasing TI). Rescaled to the scanner's
            floating-point values (arbitrary units).
        affine: 4x4 voxel-to-world matrix, NIfTI convention (RAS+, mm).
        protocol: the acquisition (inversion times and TR in s).
        source: the path the series was read from.
        notes: what the reader did that a user should know (e.g. "signed real data: magnitude taken").
        files: every file that was read (pass them as ``protect`` to :func:`save_maps`).
        spatial_codes: the NIfTI (sform_code, qform_code) the affine came with, which the maps keep (1 =
            scanner, 2 = aligned, 3 = Talairach, 4 = MNI, 5 = template; DICOM: scanner).
    """

    data: np.ndarray
    affine: np.ndarray
    protocol: Protocol
    source: str
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    spatial_codes: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=np.float64)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.data.ndim != 4 or self.data.shape[-1] != self.protocol.n_images:
            raise InputError(f"{self.source}: series data must be (X, Y, Z, {self.protocol.n_images}), "
                             f"got shape {self.data.shape}")
        if self.affine.shape != (4, 4):
            raise InputError(f"{self.source}: affine must be 4x4, got shape {self.affine.shape}")

    @property
    def tis_s(self) -> np.ndarray:
        """Inversion times in s, shape (N,), increasing."""
        return self.protocol.tis

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) of the image grid."""
        x, y, z = (int(s) for s in self.data.shape[:3])
        return x, y, z

    @property
    def voxel_size_mm(self) -> np.ndarray:
        """Voxel edge lengths in mm, shape (3,), from the affine."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))



def _finish(data: np.ndarray, affine: np.ndarray, protocol: Protocol, source: str, notes: list[str],
            files: list[str], negatives: str, spatial_codes: tuple[int, int] = (1, 1)) -> IRSeries:
    """Value checks common to all readers, then the IRSeries.

    negatives: "error" (magnitude data must not be negative), "magnitude" (signed data: take |x| and
    note it), "magnitude_quiet" (take |x|, the reader already noted why).
    """
    tis = protocol.tis
    if data.shape[-1] != len(tis):
        raise InputError(f"{source}: {data.shape[-1]} images for {len(tis)} inversion times")
    if min(data.shape) == 0:
        raise InputError(f"{source}: empty image (shape {data.shape})")
    finite = np.isfinite(data)
    if not finite.all():
        bad = [f"{t:g}" for t, ok in zip(tis, finite.reshape(-1, len(tis)).all(axis=0)) if not ok]
        raise InputError(f"{source}: {int((~finite).sum())} NaN/Inf value(s) in the image(s) at TI = "
                         f"{', '.join(bad)} s")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{source}: the affine is not a valid voxel-to-world matrix")
    if data.min() < 0:
        if negatives == "error":
            raise InputError(f"{source}: {int((data < 0).sum())} negative value(s) (min {data.min():g}) in "
                             "magnitude images; if they are signed real images pass signed=True or mark "
                             "the sidecar \"ImageType\" as real (\"R\")")
        if negatives == "magnitude":
            notes.append(f"signed real data (values {data.min():g} to {data.max():g}): magnitude taken")
        data = np.abs(data)
    for n, t in enumerate(tis):
        img = data[..., n]
        lo, hi = float(img.min()), float(img.max())
        if lo == hi:
            what = "all zero" if hi == 0 else f"constant ({hi:g})"
            raise InputError(f"{source}: the image at TI = {t:g} s is {what}")
    return IRSeries(data=data, affine=affine, protocol=protocol, source=source, notes=notes, files=files,
                    spatial_codes=spatial_codes)
