"""``qmri``: the command line, a thin layer over the package (python-fire).

    qmri map INPUT --out DIR [--method mle|ls|diffusor|resnet|rim] [--mask M] [--tis 0.05,0.1,...] [--tr 10]
    qmri bids BIDS_DIR OUTPUT_DIR participant|group [--participant_label 01 02] [--method mle] [--n_jobs N]
    qmri phantom --out DIR [--protocol paper] [--snr 50] [--noise rician] [--echo_train] [--gibbs 1]
    qmri synthesize --out DIR [--n 16] [--protocol paper] [--wide_t1] [--seed 0]
    qmri report T1MAP [--plate T1] [--field 3] [--version 2] [--out table.md]
    qmri crlb [--protocol paper] [--t1 0.2,0.5,1,2] [--snr 20,50,100]
    qmri compare [--out docs]
    qmri robustness [--out docs] [--split test|validation] [--plates 6] [--brains 3] [--methods mle,tv,...]
    qmri release BUNDLE --version X.Y.Z --note TEXT;  qmri pack BUNDLE [--out dist];  qmri unpack ZIP [--bundle_dir D]

Every command prints one line ``qmri: error: ...`` and exits with status 2 on bad input, leaving
no partial output. Bad input is what the project itself names so: :class:`custom_components.io.InputError`
(bad files, flags and output folders; the io layer turns the OSErrors of the user's own paths into
it, and :class:`custom_components.bundle.packaging.BundleError` is one) and
:class:`custom_components.physics.protocol.ProtocolError`. Any other exception is a bug (or a broken
installation) and ends with its traceback and exit status 1, never dressed up as bad input.
``--debug`` (anywhere on the line) or ``QMRI_DEBUG=1`` shows the traceback of bad input too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np


def _floats(x, what: str) -> list[float] | None:
    if x is None:
        return None
    if isinstance(x, (int, float)):
        return [float(x)]
    if isinstance(x, str):
        parts = [p for p in x.replace(",", " ").split() if p]
    else:
        parts = list(x)
    try:
        return [float(p) for p in parts]
    except (TypeError, ValueError):
        from .io import InputError

        raise InputError(f"{what} must be numbers, got {x!r}") from None


def _one(x, what: str) -> float | None:
    v = _floats(x, what)
    if v is not None and len(v) != 1:
        from .io import InputError

        raise InputError(f"{what} needs one number, got {x!r}")
    return None if v is None else v[0]


def _pair(x, what: str, cast=float):
    v = _floats(x, what)
    if v is None:
        return None
    if len(v) == 1:
        v = v * 2
    if len(v) != 2:
        from .io import InputError

        raise InputError(f"{what} needs one or two values, got {x!r}")
    return tuple(cast(t) for t in v)


@contextlib.contextmanager
def _user_value(what: str):
    """Around a call that only reads or checks values the user gave (a protocol file, a choice of
    noise model or plate, a synthesis setting): its ValueError/TypeError/OSError is bad input, named
    after ``what``. Never around the computations themselves: their errors are bugs."""
    from .io import InputError
    from .physics.protocol import ProtocolError

    try:
        yield
    except (InputError, ProtocolError):
        raise
    except (ValueError, TypeError, OSError) as e:
        raise InputError(f"{what}: {' '.join(str(e).split()) or type(e).__name__}") from e


def _int_flag(value, flag: str, minimum: int | None = None) -> int:
    """An integer command-line value (fire gives ints, or strings for odd input), checked."""
    from .io import InputError

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{flag} must be an integer, got {value!r}")
    try:
        v = int(value)
    except ValueError:
        raise InputError(f"{flag} must be an integer, got {value!r}") from None
    if minimum is not None and v < minimum:
        raise InputError(f"{flag} must be at least {minimum}, got {v}")
    return v


_LEARNED = ("diffusor", "resnet", "rim")


def _check_map_flags(method, noise, n_coils, sigma, samples, steps, sampler, symmetry, seed, device):
    """The flags of ``qmri map``, checked before anything is read: returns samples, steps and seed as
    integers (or None)."""
    import math

    from .io import InputError

    if noise not in ("rician", "ncchi", "gaussian"):
        raise InputError(f"--noise must be rician, ncchi or gaussian, got {noise!r}")
    _int_flag(n_coils, "--n_coils", 1)
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise InputError(f"--sigma must be a positive number, got {sigma!r}")
    given = [f for f, v in (("--samples", samples), ("--steps", steps), ("--sampler", sampler),
                            ("--symmetry", symmetry), ("--seed", seed)) if v is not None]
    if given and method != "diffusor":
        raise InputError(f"{'/'.join(given)} apply to the diffusor only, not to {method}")
    samples = None if samples is None else _int_flag(samples, "--samples", 1)
    steps = None if steps is None else _int_flag(steps, "--steps", 1)
    seed = None if seed is None else _int_flag(seed, "--seed", 0)
    from .io.series import parse_device

    if method in _LEARNED:
        parse_device(device)
    elif parse_device(device, kinds=("cpu", "cuda")).type == "cuda":  # the fit runs in torch: cpu or cuda
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available to this torch ({torch.__version__})")
    return samples, steps, seed


class QMRI:
    """qMRI Diffusor: T1, PD and inversion-efficiency maps from inversion-recovery images."""

    def map(self, input: str, out: str, method: str = "mle", mask: str | None = None, tis=None, tr=None,
            echo_spacing=None, etl=None,
            noise: str = "rician", n_coils: int = 1, sigma: float | None = None, overwrite: bool = False,
            samples: int | None = None, steps: int | None = None, sampler: str | None = None,
            symmetry: str | None = None, seed: int | None = None, device: str = "cpu", bundle: str | None = None, weights: str | None = None,
            variant: str | None = None, quiet: bool = False, bids: bool = False, subject: str | None = None, session: str | None = None,
            tv_weight: float | None = None, dc: float | None = None, dc_crlb: float | None = None,
            start_timestep: int | None = None, dc_anneal: float | None = None):
        """Map T1 (s), PD and inversion efficiency B from an IR series; write NIfTI maps with JSON sidecars.

        Args:
            input: a 4D NIfTI (last axis = inversion) with a BIDS sidecar or --tis, a folder of DICOM
                files of one IR series, or a BIDS IRT1 file collection.
            out: output folder: T1map.nii.gz (s), PDmap.nii.gz, InvEffmap.nii.gz (2 = ideal inversion),
                Residualmap.nii.gz (RMS of data - |model| over the TIs) and, where the noise level is known
                or can be estimated from the background, ResidualFlag.nii.gz (1 where the maps do not explain
                the images: chi-square test at false-alarm rate 0.001), each with a JSON sidecar, in the
                input's space.
            method: mle (classical maximum likelihood, default), ls (least squares), tv (maximum
                likelihood with a total-variation prior, started from mle; --tv_weight), diffusor (the
                trained DDPM bundle: also writes T1map_std/PDmap_std/InvEffmap_std, its uncertainty),
                resnet (direct regression) or rim (recurrent inference machine; any protocol).
            mask: optional NIfTI mask (non-zero = map); default: voxels with signal above the noise.
            tis: inversion times in s (comma separated) for a NIfTI without sidecar.
            tr: repetition time(s) in s (one, or one per image) for a NIfTI without sidecar.
            echo_spacing: echo spacing of the echo train in s. Headers give the effective echo time of a
                fast spin echo, not the spacing; without this flag the echo time is taken as the spacing
                (its upper bound), and a train that then does not fit in TR is refused.
            etl: echo train length (echoes per excitation); replaces the header's EchoTrainLength.
            noise: rician (one coil) or ncchi (root-sum-of-squares of --n_coils coils) for mle.
            n_coils: coils of the RSS combination (noise ncchi).
            sigma: noise std per channel (mle, tv, rim, the diffusor's data-consistency); default: estimated
                from the background.
            overwrite: allow writing into an existing non-empty output folder.
            samples: diffusor ensemble size (default 10, the paper).
            steps: diffusor network evaluations per sample with the few-step sampler.
            sampler: diffusor sampler: dpm++2m (default), ddim, or ddpm (all 1000 steps, the paper).
            symmetry: diffusor: the orientations of the image grid the ensemble members are drawn in:
                dihedral (default: the 8 flips and transposes, member j in orientation j mod 8, each
                sample turned back), flips (4), or none (every member as the input is oriented).
            seed: diffusor: seed of the ensemble's initial noise (default: the bundle's, 0, so that
                repeated runs give the same maps; another seed draws another ensemble).
            device: cpu, cuda or cuda:N (or mps): where the fit (mle, ls, tv) and the learned methods run.
            bundle: bundle folder of the learned method (default bundles/<method>).
            weights: weights file; default: the most accurate validated weights of the bundle for the
                input's protocol, chosen by their cards (diffusor: fit-conditioned residual, then
                fit-conditioned, then images only; e.g. models/model_fitcond.pt for the paper protocol,
                model_fitcond_nist15.pt for nist15); no fitting weights: a one-line error naming the shipped
                ones and the experimental --variant prior or crlb. Every
                sidecar names the weights (file, sha256, card).
            variant: diffusor: "images" for the paper's images-only model (models/model.pt for the
                paper protocol, model_nist15.pt for nist15), "fit" for fit-conditioned weights only,
                "prior" for the prior over maps (models/model_prior.pt: any protocol, the images enter
                through the data-consistency step only; experimental, never chosen unasked), "crlb" for
                the model conditioned on the classical fit and its Cramér-Rao bound (models/model_crlb.pt:
                any protocol; needs a noise level, from the background or --sigma); default: the
                best validated weights for the input's protocol.
            bids: write OUT as a BIDS derivatives dataset (dataset_description.json, sub-<label>/anat/
                sub-<label>_desc-<method>_T1map.nii.gz and friends with sidecars); the subject (and session)
                label comes from the input's BIDS name or --subject/--session.
            subject, session: BIDS labels for --bids (letters and digits).
            tv_weight: --method tv (the fit with a total-variation prior on each slice): the prior's
                strength, >= 0, in log-likelihood units per jump of one Cramér-Rao bound (default 0.5;
                0: the plain ML fit; docs/physics.md).
            dc: diffusor: strength of the data-consistency step at every sampler step (the relative
                width of the prior around the network's estimate; 0: off; default: the bundle's,
                bundles/diffusor/docs/README.md "Data-consistency"). The step moves each estimate toward
                the images through the signal model and the --noise/--n_coils noise model, with --sigma or
                the background's noise level (no background and no --sigma: skipped, as the sidecar says).
            dc_crlb: diffusor: the data-consistency step's CRLB bound k (0: none; default: the bundle's):
                where the images determine T1 (relative CRLB r <= 10 %), the prior around the network's
                estimate is at least k r wide, so the network's error reaches the map with a weight of at
                most 1 / (1 + k^2).
            start_timestep: diffusor with prior weights (``--variant prior``, any protocol): the sampler
                starts from the classical fit noised to this DDPM timestep (0-999), or from pure noise
                (-1); default: the bundle's ``prior_start_timestep``.
            dc_anneal: diffusor: lambda >= 0 of the data-consistency strength's schedule over the sampler's
                steps, w_t = sqrt(w^2 + lambda^2 (1 - abar_t) / abar_t) (0: --dc at every step; default: the
                bundle's, ``prior_dc_anneal`` for prior weights, else 0).
        """
        from .io import load_nifti_map, load_series
        from .mapping import map_series, output_arrays, sidecars_for

        samples, steps, seed = _check_map_flags(method, noise, n_coils, sigma, samples, steps, sampler, symmetry,
                                                seed, device)
        from .io import InputError, nonnegative_number

        for flag, value, owner in (("tv_weight", tv_weight, "tv"), ("dc", dc, "diffusor"), ("dc_crlb", dc_crlb, "diffusor"),
                                   ("start_timestep", start_timestep, "diffusor"), ("dc_anneal", dc_anneal, "diffusor")):
            if value is None:
                continue
            if method != owner:
                raise InputError(f"--{flag} applies to --method {owner} only, not to {method}")
            if flag != "start_timestep":
                nonnegative_number(value, f"--{flag}")

        series = load_series(input, tis=_floats(tis, "--tis"), tr=(None if tr is None else (lambda v: v[0] if len(v) == 1 else v)(_floats(tr, "--tr"))),
                             echo_spacing=_one(echo_spacing, "--echo_spacing"), etl=_one(etl, "--etl"))
        if bids:  # labels first: a missing one fails before any mapping
            from . import __version__
            from .io import InputError, bids_entities, check_bids_target, save_bids_derivatives

            ent = bids_entities(series.files or [input])
            sub = subject if subject is not None else ent.get("sub")
            if sub is None:
                raise InputError("--bids needs --subject: the input's name has no sub-<label>")
            ses = session if session is not None else (ent.get("ses") if subject is None else None)
            check_bids_target(out, None if sub is None else str(sub), None if ses is None else str(ses), method)
        m = None
        if mask is not None:
            m, _ = load_nifti_map(mask)
            if m.ndim == 2 and len(series.spatial_shape) == 3 and series.spatial_shape[2] == 1:
                m = m[:, :, None]
        res = map_series(series, method=method, mask=m, noise=noise, n_coils=int(n_coils), sigma=sigma, progress=not quiet,
                         samples=samples, steps=steps, seed=seed, sampler=sampler, symmetry=symmetry, device=device,
                         bundle_dir=bundle, weights=weights, variant=variant,
                         **({} if tv_weight is None else {"tv_weight": float(tv_weight)}),
                         **({} if dc is None else {"dc": float(dc)}),
                         **({} if dc_crlb is None else {"dc_crlb": float(dc_crlb)}),
                         **({} if start_timestep is None else {"start_timestep": start_timestep}),
                         **({} if dc_anneal is None else {"dc_anneal": float(dc_anneal)}))
        if bids:
            written = save_bids_derivatives(out, output_arrays(res), series.affine, sidecars_for(res, series, method),
                                            subject=str(sub), session=None if ses is None else str(ses), method=method,
                                            version=__version__, sources=series.files or [input],
                                            overwrite=overwrite, protect=series.files,
                                            spatial_codes=series.spatial_codes)
        else:
            from .mapping.runner import write_result  # the bundles' inference.json writes with it too

            written = write_result(out, res, series, method, overwrite=overwrite, protect=series.files)
        if not quiet:
            t1 = res.maps["T1"][res.mask]
            print(f"mapped {int(res.mask.sum())} voxels with {method}: median T1 {np.median(t1) * 1000:.0f} ms -> {out}")
        return None if quiet else sorted(str(p) for p in written.values())

    def bids(self, bids_dir: str, output_dir: str, analysis_level: str, participant_label=None, method: str = "mle",
             noise: str = "rician", n_coils: int = 1, sigma: float | None = None, device: str = "cpu", n_jobs: int = 1):
        """BIDS App: qmri bids BIDS_DIR OUTPUT_DIR participant|group [--participant_label 01 02 ...] [--n_jobs N].

        participant: map every BIDS IRT1 collection (sub-*/[ses-*/]anat/*_inv-<n>_IRT1.nii[.gz] + sidecars)
        of the chosen participants into the BIDS derivatives dataset OUTPUT_DIR, as `qmri map --bids`
        does; one line per collection: mapped, skipped (its output is complete) or failed. Each output
        ends with a completion record (*_desc-<method>_qmriRun.json) written last: a run that was
        stopped is resumed by running the same command again.
        group: one table OUTPUT_DIR/group_desc-<method>_T1.tsv (+ .json) of the complete outputs: median
        T1 (ms) over the mapped voxels and in three T1 classes of the map (short, mid, long: a k-means
        on log T1, in a brain WM, GM, CSF), with the run's method, version, TIs, date and source.

        Args:
            bids_dir: the BIDS dataset (with dataset_description.json).
            output_dir: the derivatives dataset (e.g. BIDS_DIR/derivatives/qmri).
            analysis_level: participant or group.
            participant_label: labels (with or without sub-), space or comma separated; default: all.
            method, noise, n_coils, sigma, device: as for `qmri map`.
            n_jobs: participants mapped at the same time, in separate processes (participant level).
        """
        from .mapping.bids_app import participant_labels, run_group_level, run_participant_level
        from .io import InputError

        if analysis_level not in ("participant", "group"):
            raise InputError(f"analysis_level must be participant or group, got {analysis_level!r}")
        _check_map_flags(method, noise, n_coils, sigma, None, None, None, None, None, device)
        labels = participant_labels(participant_label)
        n_jobs = _int_flag(n_jobs, "--n_jobs", 1)
        if analysis_level == "group":
            run_group_level(str(bids_dir), str(output_dir), labels, method=method)
        else:
            run_participant_level(str(bids_dir), str(output_dir), labels, method=method, n_jobs=n_jobs,
                                  options={"noise": noise, "n_coils": int(n_coils), "sigma": sigma, "device": device})

    def phantom(self, out: str, protocol: str = "paper", snr: float | None = 50.0, noise: str = "rician",
                n_coils: int = 1, echo_train: bool = True, gibbs: int = 1, matrix: int = 240, fov_mm: float = 250.0,
                plate: str = "T1", version: int | None = None, rotation_deg: float = 0.0, b: float | None = None,
                seed: int = 0, overwrite: bool = False):
        """Write the digital twin of the NIST/ISMRM phantom as a scanner would: a 4D NIfTI + sidecar.

        Files in OUT: series.nii.gz (+ .json, BIDS keys, InversionTime in s), spheres.nii.gz (0..14),
        and the true maps truth_T1map/PDmap/InvEffmap.nii.gz (the parameters the IR model identifies).

        Args:
            protocol: "paper", "nist15", "nist15_variable_tr" or a protocol JSON file.
            snr: PD of water / noise sigma; "none" for noiseless images.
            noise: rician, ncchi (with --n_coils), gaussian or none.
            echo_train: echo-train T2 blurring (where the protocol's echo train length > 1).
            gibbs: simulate on a grid this many times finer and truncate k-space (1 = off).
            b: constant inversion efficiency; default a smooth field in 1.8-2.0.
        """
        from .io import InputError, save_maps, save_series
        from .physics.protocol import get_protocol
        from .data.synthesis import Effects, nist_twin

        out_dir = Path(out)
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise InputError(f"{out_dir} exists and is not empty; pass --overwrite")
        from .data.phantoms import reference_values

        with _user_value("--protocol"):
            prot = get_protocol(protocol)
        if isinstance(snr, str) and snr.lower() == "none":
            snr = None
        with _user_value("--noise/--n_coils/--gibbs"):
            eff = Effects(noise=noise, n_coils=int(n_coils), echo_train=bool(echo_train), gibbs_factor=int(gibbs))
        with _user_value("--plate/--version"):
            reference_values(plate, prot.field_strength_t, version)
        tw = nist_twin(prot, snr=snr, effects=eff, seed=int(seed), matrix=(int(matrix), int(matrix)), fov_mm=float(fov_mm),
                       plate=plate, version=version, rotation_deg=float(rotation_deg), b=b)
        px = float(fov_mm) / int(matrix)
        affine = np.diag([px, px, 1.0, 1.0])
        ref = tw["reference"]
        extra = {"DigitalTwin": {"Phantom": "NIST/ISMRM system phantom", "Plate": plate, "SNR": tw["snr"],
                                 "Noise": noise, "NCoils": int(n_coils), "EchoTrainBlurring": bool(echo_train),
                                 "GibbsFactor": int(gibbs), "Seed": int(seed), "RotationDeg": float(rotation_deg),
                                 "ReferenceT1_s": [float(x) for x in ref["T1_s"]],
                                 "ReferenceT2_s": [float(x) for x in ref["T2_s"]]}}
        truth = {"truth_T1map": tw["truth"][0][:, :, None], "truth_PDmap": tw["truth"][1][:, :, None],  # output convention
                 "truth_InvEffmap": tw["truth"][2][:, :, None], "spheres": tw["spheres"][:, :, None].astype(np.float32)}
        units = {"truth_T1map": "s", "truth_PDmap": "a.u. (water = 1)", "truth_InvEffmap": "1", "spheres": "label 0..14"}
        save_maps(out_dir, truth, affine, {k: {"Units": u, **extra} for k, u in units.items()}, overwrite=overwrite)
        save_series(out_dir / "series.nii.gz", tw["image"].transpose(1, 2, 0)[:, :, None, :], affine, prot, extra)
        print(f"wrote the NIST twin ({prot.name}, SNR {snr}) -> {out_dir}")

    def synthesize(self, out: str, n: int = 16, protocol: str = "paper", matrix: int = 240, wide_t1: bool = False,
                   snr=(20, 100), noise: str = "rician", n_coils: int = 1, echo_train: bool = True, gibbs: int = 1,
                   seed: int = 0, overwrite: bool = False):
        """Write N synthetic training pairs (brain slices of the embedded anatomy) as NIfTI + a MONAI datalist.

        Items are those of the on-the-fly dataset with the same settings (deterministic for --seed):
        item-XXXXX_IRT1.nii.gz (images, + sidecar), item-XXXXX_label.nii.gz (T1 s, PD, B), _mask, dataset.json.
        """
        from .data.synthesis import Effects, SynthesisConfig, write_dataset

        n = _int_flag(n, "--n", 1)
        with _user_value("--snr/--noise/--n_coils/--gibbs"):
            eff = Effects(snr_range=_pair(snr, "--snr"), noise=noise, n_coils=int(n_coils), echo_train=bool(echo_train),
                          gibbs_factor=int(gibbs))
        with _user_value("--protocol/--matrix/--seed"):
            cfg = SynthesisConfig(protocol=protocol, n_slices=max(1, (n + 3) // 4), realisations=4,
                                  matrix=(int(matrix), int(matrix)), wide_t1=bool(wide_t1), effects=eff, seed=int(seed))
        write_dataset(out, cfg, n_items=n, overwrite=overwrite)
        print(f"wrote {n} synthetic items -> {out}")

    def report(self, t1map: str, plate: str = "T1", field: float = 3.0, version: int | None = None,
               out: str | None = None, title: str | None = None):
        """Tabulate a T1 map of the NIST phantom sphere by sphere against the reference values.

        The 14 spheres are located from the map itself (no per-scan coordinates). T1MAP is a NIfTI
        T1 map in s (e.g. OUT/T1map.nii.gz of `qmri map`), one slice through the sphere plate.
        """
        from .reporting.evaluation import format_table_markdown, locate_spheres, sphere_table
        from .io import InputError, load_nifti_map
        from .data.phantoms import reference_values

        t1, affine = load_nifti_map(t1map)
        t1 = np.squeeze(t1)
        if t1.ndim != 2:
            raise InputError(f"{t1map}: a single-slice T1 map is needed, got shape {t1.shape}")
        spacing = np.sqrt((np.asarray(affine)[:3, :2] ** 2).sum(axis=0))
        with _user_value("--plate/--field/--version"):
            ref = reference_values(plate, float(field), version)
        layout = locate_spheres(t1, spacing, plate=plate, t1_map=t1, reference_t1_s=ref["T1_s"])
        rows = sphere_table(t1, layout, ref["T1_s"])
        text = format_table_markdown(rows, title or f"{Path(t1map).name}: NIST {plate} plate, {field} T reference")
        if out:
            from .io import _write_files_atomically  # noqa: PLC2701 - shared atomic writer
            _write_files_atomically([(Path(out), lambda t: t.write_text(text + "\n"))], str(out))
        print(text)

    def compare(self, out: str = "docs", brain_slices: int = 4, low_snr: float = 20.0, samples: int = 10, steps: int = 10,
                ddpm_crop: int = 40, data: str | None = None, speed: bool = True, threads: int = 2,
                only: str | None = None):
        """Map the same data with every method (classical fit, ResNet, RIM, both Diffusors; shipped weights)
        and regenerate OUT/RESULTS.md and OUT/figures/ (phantom twin, brains, uncertainty, real scans, speed).

        Args:
            out: folder of RESULTS.md and figures/ (default docs).
            brain_slices: held-out synthetic brain slices to score.
            low_snr: the second, lower SNR of the phantom twin.
            samples, steps: the Diffusor's ensemble size and DPM-Solver++ steps.
            ddpm_crop: side (pixels) of the crop the full 1000-step DDPM maps for the uncertainty check.
            data: folder of the real NIST scans (default ../shared/data/nist_phantom_ir).
            speed: also measure seconds per slice and peak memory in fresh processes.
            threads: torch threads.
            only: "real_scans": regenerate only section 1 (the real scans) of the existing OUT/RESULTS.md,
                e.g. after training a model for the scans' protocol; the rest is kept as it is.
        """
        import torch

        from .reporting.comparison import run_comparison, update_real_scan_section

        from .io import InputError

        for name, v in (("--brain_slices", brain_slices), ("--samples", samples), ("--steps", steps), ("--ddpm_crop", ddpm_crop)):
            _int_flag(v, name, 1)
        low_snr = _floats(low_snr, "--low_snr")
        if low_snr is None or len(low_snr) != 1 or not low_snr[0] > 0:
            raise InputError(f"--low_snr must be one positive number, got {low_snr}")
        low_snr = low_snr[0]
        if only is not None and only != "real_scans":
            raise InputError(f"--only takes real_scans, got {only!r}")
        torch.set_num_threads(int(threads))
        if only == "real_scans":
            print(f"-> {update_real_scan_section(out, data_dir=data, steps=int(steps), samples=int(samples))}")
            return
        path = run_comparison(out, brain_slices=int(brain_slices), low_snr=float(low_snr), steps=int(steps),
                              samples=int(samples), ddpm_crop=int(ddpm_crop), data_dir=data, speed=bool(speed))
        print(f"-> {path}")

    def robustness(self, out: str = "docs", split: str = "test", plates: int = 6, brains: int = 3, methods=None,
                   protocols="paper,nist15", calibration: float | None = None, threads: int = 2):
        """Map one half of the robustness suite (issue 20) with every method and write OUT/ROBUSTNESS.md
        (test half) or OUT/ROBUSTNESS_validation.md, a JSON of every number beside it and OUT/figures/.

        Args:
            out: folder of the report (default docs).
            split: test (default; only ever reported) or validation (may be looked at while developing).
            plates, brains: drawn plate and brain scenes, each rendered in every protocol.
            methods: comma-separated subset of mle, tv, diffusor, diffusor_fit, diffusor_nodc, diffusor_images, diffusor_prior, diffusor_crlb,
                resnet, rim (default: all).
            protocols: comma-separated protocols every scene is rendered in (default paper,nist15).
            calibration: factor c applied to the Diffusor's std for the coverage (fitted on the validation
                half: its report prints it); default none (c = 1).
            threads: torch threads.
        """
        import math

        import torch

        from .io import InputError
        from .physics.protocol import get_protocol
        from .reporting.robustness import method_specs, run_robustness

        if split not in ("test", "validation"):
            raise InputError(f"--split must be test or validation, got {split!r}")
        plates, brains = _int_flag(plates, "--plates", 0), _int_flag(brains, "--brains", 0)
        if plates + brains == 0:
            raise InputError("--plates and --brains are both 0: no scene to map")

        def names(x, flag):
            v = [p.strip() for p in (x.split(",") if isinstance(x, str) else list(x))] if x is not None else None
            if v is not None and (not v or not all(isinstance(p, str) and p for p in v)):
                raise InputError(f"{flag} must be comma-separated names, got {x!r}")
            return v

        methods, protocols = names(methods, "--methods"), names(protocols, "--protocols")
        method_specs(methods)
        for p in protocols:
            with _user_value("--protocols"):
                get_protocol(p)
        if calibration is not None and (isinstance(calibration, bool) or not isinstance(calibration, (int, float))
                                        or not math.isfinite(calibration) or calibration <= 0):
            raise InputError(f"--calibration must be a positive number, got {calibration!r}")
        torch.set_num_threads(_int_flag(threads, "--threads", 1))
        cmd = "qmri robustness " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["robustness"] else None
        path = run_robustness(out, split=split, n_plates=plates, n_brains=brains, methods=methods,
                              protocols=tuple(protocols), calibration=None if calibration is None else float(calibration),
                              command=cmd)
        print(f"-> {path}")

    def release(self, bundle: str, version: str, note: str, versions: bool = True):
        """Record a new version of a bundle after its configs or weights changed: bump metadata.json's
        version (must go up), put NOTE first in its changelog, record the content hash and (with
        --versions, the default) the installed monai/torch/numpy versions."""
        from .bundle.packaging import installed_versions, release

        meta = release(bundle, str(version), note, installed_versions() if versions else None)
        print(f"{bundle}: version {meta['version']}")

    def pack(self, bundle: str, out: str = "dist", name: str | None = None, overwrite: bool = False):
        """Pack a bundle into OUT/<name>.zip for sharing (configs, models, docs, LICENSE) after checking its
        metadata and that its version matches its content. Then, anywhere, offline:
        python -m monai.bundle download --name <name> --url file:///abs/path/<name>.zip --bundle_dir DIR"""
        from .bundle.packaging import pack_bundle

        print(f"-> {pack_bundle(bundle, out, name=name, overwrite=bool(overwrite))}")

    def unpack(self, zip: str, bundle_dir: str = "bundles", overwrite: bool = False):
        """Unpack a shared bundle zip into BUNDLE_DIR/<name>, all or nothing, refusing any entry that could
        land outside it (absolute paths, '..', links)."""
        from .bundle.packaging import unpack_bundle

        print(f"-> {unpack_bundle(zip, bundle_dir, overwrite=bool(overwrite))}")

    def crlb(self, protocol: str = "paper", t1="0.2,0.5,1,2,4", snr="20,50,100", b: float = 2.0):
        """Cramér-Rao bound of T1 (ms and %) for a protocol (PD 1, Gaussian noise, T1/PD/B free)."""
        from .physics.protocol import get_protocol
        from .physics.signal_model import crlb_t1_table

        with _user_value("--protocol"):
            p = get_protocol(protocol)
        t1s, snrs = _floats(t1, "--t1"), _floats(snr, "--snr")
        tab = crlb_t1_table(t1s, snrs, p, b=b)
        lines = [f"T1 CRLB, protocol {p.name}, B = {b}", "| T1 (ms) | " + " | ".join(f"SNR {s:g}" for s in snrs) + " |",
                 "|---|" + "---|" * len(snrs)]
        for t, row in zip(t1s, tab):
            lines.append(f"| {t * 1000:.0f} | " + " | ".join(f"{v * 1000:.1f} ({100 * v / t:.1f}%)" for v in row) + " |")
        print("\n".join(lines))


#: Flags whose values are labels, never numbers: fire would read ``--subject 0x1F`` as 31 and ``1e3`` as 1000.0.
_STRING_FLAGS = ("--subject", "--session", "--participant_label")
#: Flags that take several values, as BIDS Apps do (``--participant_label 01 02``): the words up to the
#: next flag are passed to fire as one string.
_LIST_FLAGS = ("--participant_label",)


def _quote_labels(argv: list[str]) -> list[str]:
    """Pass the values of :data:`_STRING_FLAGS` to fire as Python string literals, so they stay verbatim;
    the several values of a flag in :data:`_LIST_FLAGS` as one string, separated by spaces."""
    out, quote_next, i = [], False, 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if quote_next:
            out.append(repr(a))
            quote_next = False
            continue
        flag, eq, val = a.partition("=")
        if flag in _LIST_FLAGS and not eq:
            words = []
            while i < len(argv) and not argv[i].startswith("-"):
                words.append(argv[i])
                i += 1
            out += [a, repr(" ".join(words))] if words else [a]
            continue
        if flag in _STRING_FLAGS:
            if eq:
                out.append(f"{flag}={val!r}")
            else:
                out.append(a)
                quote_next = True
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    import fire

    from .io import InputError
    from .physics.protocol import ProtocolError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("QMRI_DEBUG", "").strip() not in ("", "0")
    argv = _quote_labels([a for a in argv if a != "--debug"])
    try:
        fire.Fire(QMRI(), command=argv, name="qmri")
    except (InputError, ProtocolError) as e:  # the user's errors only (BundleError is an InputError); the rest is a bug
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"qmri: error: {msg}", file=sys.stderr)
        return 2
    except fire.core.FireExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
