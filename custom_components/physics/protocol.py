"""Acquisition protocol of an inversion-recovery (fast) spin-echo series.

All times are in seconds. A :class:`Protocol` holds what is fixed for a scan (the inversion times,
the repetition time(s), the echo train); the signal model, the synthesis and the fits take one.

Readers:
- :func:`paper_protocol` -- the qMRI Diffusor paper's IR-FSE protocol (3 T, 7 TIs, TR 10 s, ETL 64).
- :func:`nist_15t_protocol` -- the protocol of the real NIST phantom scans in shared/data (1.5 T, 6 TIs).
- :meth:`Protocol.from_dict` / :meth:`Protocol.from_json` -- a config (the keys of :meth:`to_dict`).
- :func:`from_bids_sidecars` -- BIDS sidecars (``InversionTime``, ``RepetitionTime``... in seconds).
- :func:`from_dicom_headers` -- pydicom datasets (``InversionTime`` etc. in ms in DICOM).

Every timing the signal model uses (TI, TR, echo spacing, echo train length: the readout lasts
ETL x echo spacing, the recovery ``TR - readout``) has a named source in
:attr:`Protocol.timing_sources` (a header field, an argument/CLI flag or a documented default), which
the output sidecars carry. A protocol whose echo train does not fit between TI and the next inversion
(``TI + readout > TR``, which includes any recovery time ``TR - readout <= 0``) is refused when it
is built: the model's ``(B - 1) exp(-Trec/T1)`` term would otherwise exceed PD, without bound.

Echo spacing from headers (see :func:`_from_header_values`): BIDS and DICOM give the *effective*
echo time of a fast spin echo (the echo at the centre of k-space), not the echo spacing. The effective
TE is echo k >= 1 of the train, so the echo spacing is at most TE (equal for centric ordering, k = 1).
Without an explicit spacing (argument, ``qmri map --echo_spacing``, or this package's own
``qMRIProtocol.echo_spacing_s`` sidecar key) the readers take spacing = TE: the longest readout
the header allows. dcm2niix's ``EffectiveEchoSpacing`` is *not* used: it is the EPI phase-encode
line spacing (for distortion correction), not the spacing of a spin-echo train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np


class ProtocolError(ValueError):
    """An inconsistent or incomplete protocol."""


#: The protocol fields the signal model's timing comes from (keys of ``Protocol.timing_sources``).
TIMING_FIELDS = ("inversion_times_s", "repetition_time_s", "echo_time_s", "echo_train_length", "echo_spacing_s")


@dataclass(frozen=True)
class Protocol:
    """An inversion-recovery protocol.

    Attributes:
        inversion_times_s: inversion times TI_n in s, strictly increasing, all > 0.
        repetition_time_s: TR in s: one value for all images, one per image (some scanners grow TR
            with TI), or ``None`` for full recovery between inversions (the paper's model,
            S = |PD (1 - B exp(-TI/T1))|).
        echo_time_s: effective echo time TE in s (the echo at the centre of k-space).
        echo_train_length: number of echoes per excitation (1 = conventional spin echo).
        echo_spacing_s: time between echoes of the train in s.
        field_strength_t: B0 in tesla (documentation and tissue-value choice only).
        ordering: phase-encode ordering of the echo train, "centric" or "linear".
        name: a short label written into sidecars.
        timing_sources: where each timing field came from (keys of :data:`TIMING_FIELDS`, values
            e.g. "sidecar EchoTime", "--echo_spacing", "default 1 (no EchoTrainLength)"); provenance
            only: not compared, not in :meth:`to_dict`. :attr:`timing_provenance` fills missing keys.
    """

    inversion_times_s: tuple[float, ...]
    repetition_time_s: float | tuple[float, ...] | None = None
    echo_time_s: float = 0.0
    echo_train_length: int = 1
    echo_spacing_s: float = 0.0
    field_strength_t: float = 3.0
    ordering: str = "centric"
    name: str = "custom"
    timing_sources: Mapping[str, str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        tis = tuple(float(t) for t in np.atleast_1d(np.asarray(self.inversion_times_s, dtype=float)))
        object.__setattr__(self, "inversion_times_s", tis)
        if len(tis) < 3:
            raise ProtocolError(f"need at least 3 inversion times to map T1, PD and B, got {len(tis)}")
        if not all(np.isfinite(tis)) or min(tis) <= 0:
            raise ProtocolError(f"inversion times must be finite and > 0 s, got {tis}")
        if any(b <= a for a, b in zip(tis, tis[1:])):
            raise ProtocolError(f"inversion times must be strictly increasing (no duplicates), got {tis}")
        if max(tis) > 20:
            raise ProtocolError(f"inversion times look like ms, not s (max {max(tis)}); give seconds")
        tr = self.repetition_time_s
        if tr is not None:
            arr = np.atleast_1d(np.asarray(tr, dtype=float))
            if arr.size == 1:
                tr = float(arr[0])
            elif arr.size == len(tis):
                tr = tuple(float(x) for x in arr)
            else:
                raise ProtocolError(f"repetition_time_s has {arr.size} values for {len(tis)} inversion times")
            if not np.all(np.isfinite(arr)) or np.any(arr <= np.asarray(tis)):
                raise ProtocolError(f"each TR must be finite and longer than its TI, got TR={arr.tolist()} TI={list(tis)}")
            object.__setattr__(self, "repetition_time_s", tr)
        if self.ordering not in ("centric", "linear"):
            raise ProtocolError(f"ordering must be 'centric' or 'linear', got {self.ordering!r}")
        etl = self.echo_train_length
        if (isinstance(etl, bool) or not isinstance(etl, (int, np.integer, float, np.floating)) or not np.isfinite(etl)
                or etl != int(etl) or int(etl) < 1):
            raise ProtocolError(f"echo_train_length must be a whole number >= 1, got {etl!r}")
        object.__setattr__(self, "echo_train_length", int(etl))
        for key in ("echo_time_s", "echo_spacing_s"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v) or v < 0:
                raise ProtocolError(f"{key} must be a finite number >= 0 s, got {v!r}")
            object.__setattr__(self, key, float(v))
        src = self.timing_sources
        if src is not None:
            if not isinstance(src, Mapping) or not all(k in TIMING_FIELDS and isinstance(v, str) for k, v in src.items()):
                raise ProtocolError(f"timing_sources must map {list(TIMING_FIELDS)} to text, got {src!r}")
            object.__setattr__(self, "timing_sources", dict(src))
        self._check_readout_fits()

    def _check_readout_fits(self) -> None:
        """Refuse an echo train that does not end before the next inversion (TI_n + readout > TR_n).

        Then also TR_n - readout (the model's recovery time) could be <= 0, and the model's
        (B - 1) exp(-Trec/T1) term would be larger than PD: a signal no magnetisation can give.
        """
        if self.repetition_time_s is None:
            return
        tr = np.broadcast_to(np.asarray(self.repetition_time_s, dtype=float), (self.n_images,))
        ro = self.readout_duration_s
        spare = tr - self.tis - ro
        if np.all(spare >= -1e-9):
            return
        n = int(np.argmin(spare))
        src = self.timing_provenance
        raise ProtocolError(
            f"impossible timing: the echo train ({self.echo_train_length} echoes x {self.echo_spacing_s * 1e3:g} ms "
            f"echo spacing = {ro:g} s readout) after TI {tr_fmt(self.tis[n])} s does not end before TR "
            f"{tr_fmt(tr[n])} s (recovery time TR - readout = {tr_fmt(tr[n] - ro)} s; echo spacing from "
            f"{src['echo_spacing_s']}, echo train length from {src['echo_train_length']}, TR from "
            f"{src['repetition_time_s']}); give the scanner's echo spacing (qmri map --echo_spacing SECONDS) "
            "or echo train length (--etl)")

    # ------------------------------------------------------------------ derived quantities
    @property
    def n_images(self) -> int:
        return len(self.inversion_times_s)

    @property
    def tis(self) -> np.ndarray:
        """Inversion times in s as a float64 array of shape (N,)."""
        return np.asarray(self.inversion_times_s, dtype=float)

    @property
    def readout_duration_s(self) -> float:
        """Duration of the echo train (ETL x echo spacing), during which Mz is not recovering freely."""
        return float(self.echo_train_length * self.echo_spacing_s)

    def recovery_times_s(self) -> np.ndarray | None:
        """Per-image effective recovery time TR_n - readout duration in s, or None (full recovery).

        With a readout that saturates Mz at TI and a free recovery until the next inversion, the
        steady-state signed signal is S_n = PD (1 - B exp(-TI_n/T1) + (B - 1) exp(-Trec_n/T1)) with
        Trec_n = TR_n - readout (see :mod:`custom_components.physics.signal_model`).
        """
        if self.repetition_time_s is None:
            return None
        tr = np.broadcast_to(np.asarray(self.repetition_time_s, dtype=float), (self.n_images,)).copy()
        return tr - self.readout_duration_s

    @property
    def timing_provenance(self) -> dict[str, str]:
        """The source of every timing field (:data:`TIMING_FIELDS`), plus the derived readout and
        recovery: what the output sidecars write as ``qMRITimingSources``. A field without a
        recorded source was set by the protocol definition itself (a preset, a config or code)."""
        given = dict(self.timing_sources or {})
        out = {k: given.get(k, f"protocol {self.name!r}") for k in TIMING_FIELDS}
        out["readout_duration_s"] = (f"echo_train_length x echo_spacing_s = {self.echo_train_length} x "
                                     f"{self.echo_spacing_s:g} s = {self.readout_duration_s:g} s")
        out["recovery_times_s"] = ("none: full recovery (no TR)" if self.repetition_time_s is None
                                   else "repetition_time_s - readout_duration_s")
        return out

    @property
    def has_constant_tr(self) -> bool:
        rec = self.recovery_times_s()
        return rec is None or bool(np.allclose(rec, rec[0]))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """The protocol's values (no provenance: :attr:`timing_sources` is not included)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "timing_sources"}
        d["inversion_times_s"] = list(self.inversion_times_s)
        if isinstance(self.repetition_time_s, tuple):
            d["repetition_time_s"] = list(self.repetition_time_s)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ProtocolError(f"unknown protocol keys {sorted(unknown)}; known: {sorted(known)}")
        if "inversion_times_s" not in d:
            raise ProtocolError("protocol needs 'inversion_times_s'")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "Protocol":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def with_(self, **changes) -> "Protocol":
        """A copy with ``changes``; ``timing_sources`` (a dict) is merged into the current sources, and
        a changed timing field without a new source loses its old one."""
        d = self.to_dict()
        sources = {k: v for k, v in (self.timing_sources or {}).items() if k not in changes}
        sources.update(changes.pop("timing_sources", None) or {})
        d.update(changes)
        d["timing_sources"] = sources or None
        return Protocol.from_dict(d)


def check_same_inversion_times(expected: Protocol, given: Protocol, where: str = "the input") -> None:
    """Raise ProtocolError unless ``given`` has the inversion times a learned model was trained for
    (2 % / 1 ms tolerance): such a model maps only its training protocol."""
    if expected.n_images != given.n_images or not np.allclose(expected.tis, given.tis, rtol=0.02, atol=1e-3):
        raise ProtocolError(f"the model was trained for TIs {[round(t, 4) for t in expected.inversion_times_s]} s, "
                            f"{where} has {[round(t, 4) for t in given.inversion_times_s]} s; train a model for this "
                            "protocol (training with --protocol and --n_images: README.md, 'MONAI bundles')")


def check_same_timing(expected: Protocol, given: Protocol, where: str = "the input") -> None:
    """Raise ProtocolError unless ``given`` has the inversion times (see
    :func:`check_same_inversion_times`) and the repetition times (2 % tolerance, per image) a learned
    model was trained for. The TR sets how far tissue recovers between inversions, which a network
    cannot see in the images: at TI 0.8 s, T1 = 1 s gives 0.47 PD with TR 1 s and 0.19 PD with the
    Siemens NIST scans' TR of 2.46 s (``nist15`` against ``nist15_variable_tr``).
    A protocol without a known TR on either side is checked on its TIs only."""
    check_same_inversion_times(expected, given, where)
    if expected.repetition_time_s is None or given.repetition_time_s is None:
        return
    e = np.broadcast_to(np.asarray(expected.repetition_time_s, float), (expected.n_images,))
    g = np.broadcast_to(np.asarray(given.repetition_time_s, float), (given.n_images,))
    if not np.allclose(e, g, rtol=0.02, atol=1e-3):
        def fmt(tr):
            tr = [round(float(t), 3) for t in tr]
            return f"{tr[0]}" if len(set(tr)) == 1 else str(tr)
        raise ProtocolError(f"the model was trained for TR {fmt(e)} s, {where} has TR {fmt(g)} s; train a model "
                            "for this protocol (training with --protocol and --n_images: README.md, 'MONAI bundles')")


def paper_protocol() -> Protocol:
    """The qMRI Diffusor paper's IR-FSE protocol (GE 3 T): 7 TIs 0.05-2.5 s, TR 10 s, TE 7.14 ms, ETL 64."""
    return Protocol(
        inversion_times_s=(0.05, 0.10, 0.25, 0.50, 0.85, 1.50, 2.50),
        repetition_time_s=10.0,
        echo_time_s=7.14e-3,
        echo_train_length=64,
        echo_spacing_s=7.14e-3,
        field_strength_t=3.0,
        ordering="centric",
        name="paper_irfse_3t",
    )


def nist_15t_protocol(variable_tr: bool = False) -> Protocol:
    """The real NIST phantom scans of shared/data (1.5 T IR spin echo, TI 50-800 ms, TE 10-12 ms).

    ``variable_tr=False``: TR 1 s for every image (GE, Philips); ``True``: the Siemens sites' TR that
    grows with TI (1.0, 1.0, 1.0, 1.26, 1.86, 2.46 s).
    """
    tr = (1.0, 1.0, 1.0, 1.26, 1.86, 2.46) if variable_tr else 1.0
    return Protocol(
        inversion_times_s=(0.05, 0.10, 0.20, 0.40, 0.60, 0.80),
        repetition_time_s=tr,
        echo_time_s=0.010,
        echo_train_length=1,
        echo_spacing_s=0.010,
        field_strength_t=1.5,
        ordering="linear",
        name="nist_ir_se_1p5t" + ("_variable_tr" if variable_tr else ""),
    )


def invivo_9ti_protocol() -> Protocol:
    """An in-vivo IR spin-echo protocol of issue 21's list: 9 TIs of 0.35-1.7 s, TR 2.55 s. The issue gives
    the range and the count only: the TIs here are evenly spaced, with a single-echo readout (ETL 1, TE
    10 ms, 3 T); a protocol for testing that a model maps what it was not trained for, not a scanner's."""
    return Protocol(
        inversion_times_s=tuple(float(t) for t in np.round(np.linspace(0.35, 1.7, 9), 6)),
        repetition_time_s=2.55,
        echo_time_s=0.010,
        echo_train_length=1,
        echo_spacing_s=0.010,
        field_strength_t=3.0,
        ordering="linear",
        name="invivo_ir_se_9ti",
    )


#: The acquisitions a protocol-free model is trained on (issue 21 item 1): 3-12 TIs anywhere in 0.02-5 s,
#: TR 1-15 s (one for all images, or growing with TI as on some scanners) or full recovery, ETL 1-64.
RANDOM_PROTOCOL_RANGES = {"n_tis": (3, 12), "ti_s": (0.02, 5.0), "tr_s": (1.0, 15.0), "etl": (1, 64),
                          "echo_spacing_s": (0.005, 0.012), "p_full_recovery": 0.2, "p_variable_tr": 0.2,
                          "p_single_echo": 0.4}


def random_protocol(rng: np.random.Generator, ranges: Mapping | None = None) -> Protocol:
    """An inversion-recovery protocol drawn from ``ranges`` (default :data:`RANDOM_PROTOCOL_RANGES`).

    The number of TIs is uniform; half the time the TIs are drawn log-uniformly and independently
    (irregular sets), else log-spaced between two log-uniform ends (designed sets). The readout is a
    single echo with probability ``p_single_echo``, else an echo train of log-uniform length and
    uniform echo spacing (centric: TE = the spacing). Full recovery (no TR) with probability
    ``p_full_recovery``; else TR is log-uniform in the range but at least the last TI + readout +
    50 ms, and with probability ``p_variable_tr`` it grows with TI (TR_n = TI_n + a fixed delay, the
    Siemens variable-TR scheme of the NIST scans). Deterministic for ``rng``'s state."""
    r = dict(RANDOM_PROTOCOL_RANGES, **(ranges or {}))
    lo, hi = (float(x) for x in r["ti_s"])
    n = int(rng.integers(int(r["n_tis"][0]), int(r["n_tis"][1]) + 1))
    for _ in range(100):
        if rng.random() < 0.5:
            tis = np.sort(np.exp(rng.uniform(np.log(lo), np.log(hi), n)))
        else:
            a, b = np.sort(np.exp(rng.uniform(np.log(lo), np.log(hi), 2)))
            tis = np.geomspace(a, b, n)
        tis = np.round(tis, 4)
        if np.all(np.diff(tis) >= 0.002) and tis[0] >= lo:
            break
    else:  # pragma: no cover - 100 failed draws of n <= 12 values in 0.02-5 s do not happen
        tis = np.round(np.geomspace(lo, hi, n), 4)
    if rng.random() < float(r["p_single_echo"]):
        etl, es = 1, float(rng.uniform(*r["echo_spacing_s"]))
    else:
        etl = int(round(np.exp(rng.uniform(np.log(2), np.log(int(r["etl"][1]))))))
        es = float(rng.uniform(*r["echo_spacing_s"]))
    readout = etl * es
    tr = None
    if rng.random() >= float(r["p_full_recovery"]):
        tr_lo = max(float(r["tr_s"][0]), float(tis[-1]) + readout + 0.05)
        tr_hi = max(float(r["tr_s"][1]), tr_lo)
        if rng.random() < float(r["p_variable_tr"]):
            delay = float(np.exp(rng.uniform(np.log(max(readout + 0.05, 0.3)), np.log(3.0))))
            tr = tuple(float(x) for x in np.round(np.maximum(tis + delay, float(r["tr_s"][0])), 4))
        else:
            tr = float(np.round(np.exp(rng.uniform(np.log(tr_lo), np.log(tr_hi))), 4))
    return Protocol(inversion_times_s=tuple(float(t) for t in tis), repetition_time_s=tr, echo_time_s=es,
                    echo_train_length=etl, echo_spacing_s=es, field_strength_t=float(rng.choice([1.5, 3.0])),
                    ordering="centric" if etl > 1 else "linear", name="random")


PRESETS = {"paper": paper_protocol, "nist15": nist_15t_protocol,
           "nist15_variable_tr": lambda: nist_15t_protocol(variable_tr=True), "invivo9": invivo_9ti_protocol}


def get_protocol(spec: "str | Path | dict | Protocol | None") -> Protocol:
    """A protocol from a preset name ("paper", "nist15"), a JSON file, a dict, its JSON text
    (``json.dumps(protocol.to_dict())``, the form that survives data-loader collation) or a Protocol."""
    if spec is None:
        return paper_protocol()
    if isinstance(spec, Protocol):
        return spec
    if isinstance(spec, dict):
        return Protocol.from_dict(spec)
    s = str(spec)
    if s.lstrip().startswith("{"):
        return Protocol.from_dict(json.loads(s))
    if s in PRESETS:
        return PRESETS[s]()
    p = Path(s)
    if p.suffix == ".json" and p.exists():
        return Protocol.from_json(p)
    raise ProtocolError(f"unknown protocol {s!r}: give one of {sorted(PRESETS)} or a JSON file")


def _common(values: Sequence[float | None], what: str) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    if not np.allclose(vals, vals[0], rtol=1e-3):
        raise ProtocolError(f"{what} differs between images: {vals}")
    return float(vals[0])


def tr_fmt(x: float) -> str:
    """A time in s for messages: 4 significant digits."""
    return f"{float(x):.4g}"


def _from_header_values(tis, trs, tes, etls, b0s, name: str, fields_: Mapping[str, str], *,
                        echo_spacing_s: float | None = None, echo_train_length: int | None = None,
                        sources: Mapping[str, str] | None = None, ordering: str | None = None) -> Protocol:
    """A protocol from per-image header values (times in s; None where a header lacks a value).

    ``fields_`` names the header fields the values came from (keys ``TI``, ``TR``, ``TE``, ``ETL``),
    ``sources`` overrides those names for values a caller put in (e.g. ``--tis``). The echo train:

    - echo train length: ``echo_train_length`` (``--etl``), else the header's, else 1 (documented
      default: one echo per excitation);
    - echo spacing: ``echo_spacing_s`` (``--echo_spacing`` or ``qMRIProtocol.echo_spacing_s``), else
      the header's echo time, which is the echo spacing for one echo per excitation and its upper
      bound for an echo train (the effective TE is echo k >= 1: k = 1 for centric ordering), else 0 s
      for one echo per excitation; an echo train without either is refused (its length is unknown).
    """
    src = {"inversion_times_s": fields_["TI"]}
    src.update(sources or {})
    tr = None
    if all(t is not None for t in trs):
        tr = tuple(float(t) for t in trs)
        if np.allclose(tr, tr[0]):
            tr = tr[0]
        src.setdefault("repetition_time_s", fields_["TR"])
    else:
        src["repetition_time_s"] = (f"none: no {fields_['TR']} for every image, full recovery between "
                                    "inversions assumed")
    te = _common(tes, "EchoTime")
    src.setdefault("echo_time_s", fields_["TE"] if te is not None else f"default 0 s (no {fields_['TE']})")
    etl_header = _common(etls, "EchoTrainLength")
    if echo_train_length is not None:
        etl = echo_train_length
        src.setdefault("echo_train_length", "echo_train_length argument (qmri map --etl)")
        if etl_header is not None and etl_header != float(etl):
            src["echo_train_length"] += f", replacing {fields_['ETL']} {etl_header:g}"
    elif etl_header is not None:
        etl = etl_header
        src.setdefault("echo_train_length", fields_["ETL"])
    else:
        etl = 1
        src.setdefault("echo_train_length", f"default 1 (no {fields_['ETL']}: one echo per excitation assumed)")
    try:
        ok = not isinstance(etl, bool) and np.isfinite(float(etl)) and float(etl) == int(float(etl)) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ProtocolError(f"echo train length must be a whole number >= 1, got {etl!r} ({src['echo_train_length']})")
    etl = int(float(etl))
    if echo_spacing_s is not None:
        try:
            esp = float(echo_spacing_s)
        except (TypeError, ValueError):
            esp = float("nan")
        if isinstance(echo_spacing_s, bool) or not np.isfinite(esp) or esp <= 0:
            raise ProtocolError(f"echo spacing must be a finite number > 0 s, got {echo_spacing_s!r}")
        src.setdefault("echo_spacing_s", "echo_spacing argument (qmri map --echo_spacing)")
    elif te is not None:
        esp = te
        src["echo_spacing_s"] = (f"{fields_['TE']} (one echo per excitation)" if etl == 1 else
                                 f"{fields_['TE']} (the effective TE taken as the first echo, centric "
                                 "ordering: the largest echo spacing it allows)")
    elif etl == 1:
        esp = 0.0
        src["echo_spacing_s"] = f"default 0 s (no {fields_['TE']}: the readout taken as instantaneous)"
    else:
        raise ProtocolError(f"an echo train of {etl} echoes ({src['echo_train_length']}) but no {fields_['TE']} "
                            "nor echo spacing: the readout's duration is unknown; give the echo spacing "
                            "(qmri map --echo_spacing SECONDS)")
    b0 = _common(b0s, "MagneticFieldStrength")
    extra = {} if ordering is None else {"ordering": ordering}
    return Protocol(inversion_times_s=tuple(tis), repetition_time_s=tr, echo_time_s=te or 0.0,
                    echo_train_length=etl, echo_spacing_s=esp, field_strength_t=b0 or 3.0, name=name,
                    timing_sources=src, **extra)


def from_inversion_times(tis_s: Iterable[float], tr_s=None, **kw) -> Protocol:
    """A protocol from inversion times in s (and optionally TR in s), other fields defaulted."""
    return Protocol(inversion_times_s=tuple(float(t) for t in tis_s), repetition_time_s=tr_s, **kw)


def from_bids_sidecars(sidecars: Sequence[dict], *, echo_spacing_s: float | None = None,
                       echo_train_length: int | None = None, sources: Mapping[str, str] | None = None) -> Protocol:
    """A protocol from one BIDS sidecar per image (times in s), in the order of the images.

    A single sidecar whose ``InversionTime`` is a list describes a 4D file. The images must already
    be sorted by TI (the readers in :mod:`custom_components.io` sort them). ``echo_spacing_s`` and
    ``echo_train_length`` (``qmri map --echo_spacing/--etl``) replace what the sidecars say; the
    package's own sidecar key ``qMRIProtocol`` (written by :func:`custom_components.io.protocol_sidecar`)
    gives the echo spacing, ordering and name BIDS has no key for. ``sources`` names values a caller
    put into the sidecars (e.g. ``{"inversion_times_s": "--tis"}``). How the echo spacing is chosen:
    :func:`_from_header_values`.
    """
    if len(sidecars) == 1 and isinstance(sidecars[0].get("InversionTime"), (list, tuple)):
        sc = sidecars[0]
        tis = [float(t) for t in sc["InversionTime"]]
        tr = sc.get("RepetitionTime")
        sidecars = [dict(sc, InversionTime=t, RepetitionTime=(tr[i] if isinstance(tr, (list, tuple)) else tr))
                    for i, t in enumerate(tis)]
    tis = []
    for i, sc in enumerate(sidecars):
        if "InversionTime" not in sc or sc["InversionTime"] is None:
            raise ProtocolError(f"sidecar {i} has no InversionTime")
        tis.append(float(sc["InversionTime"]))
    trs = [sc.get("RepetitionTimeExcitation", sc.get("RepetitionTime")) for sc in sidecars]
    tr_key = "RepetitionTimeExcitation" if any("RepetitionTimeExcitation" in sc for sc in sidecars) else "RepetitionTime"
    q = sidecars[0].get("qMRIProtocol") if sidecars and isinstance(sidecars[0], Mapping) else None
    q = q if isinstance(q, Mapping) else {}
    src = dict(sources or {})
    if echo_spacing_s is None and q.get("echo_spacing_s") is not None:
        echo_spacing_s = q["echo_spacing_s"]
        if isinstance(echo_spacing_s, bool) or not isinstance(echo_spacing_s, (int, float)):
            raise ProtocolError(f"qMRIProtocol.echo_spacing_s must be a number (s), got {echo_spacing_s!r}")
        src.setdefault("echo_spacing_s", "sidecar qMRIProtocol.echo_spacing_s")
    p = _from_header_values(tis, trs, [sc.get("EchoTime") for sc in sidecars],
                            [sc.get("EchoTrainLength") for sc in sidecars],
                            [sc.get("MagneticFieldStrength") for sc in sidecars], "bids",
                            {"TI": "sidecar InversionTime", "TR": f"sidecar {tr_key}", "TE": "sidecar EchoTime",
                             "ETL": "sidecar EchoTrainLength"},
                            echo_spacing_s=echo_spacing_s, echo_train_length=echo_train_length, sources=src,
                            ordering=q.get("ordering"))
    if q.get("name") is not None:
        p = p.with_(name=q["name"])
    return p


def from_dicom_headers(datasets: Sequence, *, echo_spacing_s: float | None = None,
                       echo_train_length: int | None = None,
                       header_fields: Mapping[str, str] | None = None) -> Protocol:
    """A protocol from pydicom datasets sorted by TI (DICOM gives times in ms; converted to s).

    The echo train length is the standard EchoTrainLength (0018,0091); the standard MR image header
    has no echo spacing of a spin-echo train, and vendors' private fields are not read: the echo
    spacing is ``echo_spacing_s`` (``qmri map --echo_spacing``) or else EchoTime (0018,0081), its upper
    bound (see :func:`_from_header_values`). Each TR (0018,0080) goes with its image's TI: a TR that
    changes with TI gives one TR per image. ``header_fields`` renames where the values came from in
    :attr:`Protocol.timing_sources` (keys ``TI``, ``TR``, ``TE``, ``ETL``): the DICOM reader gives the
    frames of an Enhanced MR file as classic datasets whose values come from functional groups."""
    def ms(ds, kw):
        v = ds.get(kw)
        return None if v in (None, "") else float(v) / 1000.0

    tis = []
    for i, ds in enumerate(datasets):
        ti = ms(ds, "InversionTime")
        if ti is None:
            raise ProtocolError(f"DICOM image {i} has no InversionTime (0018,0082)")
        tis.append(ti)
    return _from_header_values(tis, [ms(ds, "RepetitionTime") for ds in datasets],
                               [ms(ds, "EchoTime") for ds in datasets], [ds.get("EchoTrainLength") for ds in datasets],
                               [ds.get("MagneticFieldStrength") for ds in datasets], "dicom",
                               {"TI": "DICOM InversionTime (0018,0082)", "TR": "DICOM RepetitionTime (0018,0080)",
                                "TE": "DICOM EchoTime (0018,0081)", "ETL": "DICOM EchoTrainLength (0018,0091)",
                                **(header_fields or {})},
                               echo_spacing_s=echo_spacing_s, echo_train_length=echo_train_length)


__all__ = ["Protocol", "ProtocolError", "TIMING_FIELDS", "check_same_inversion_times", "check_same_timing", "paper_protocol", "nist_15t_protocol", "get_protocol",
           "from_inversion_times", "from_bids_sidecars", "from_dicom_headers", "PRESETS", "invivo_9ti_protocol"]
