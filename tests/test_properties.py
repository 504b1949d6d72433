"""Property-based tests (hypothesis) over the whole valid domain: the signal model, the fit, the tanh
scaling, and a fuzz test of the NIfTI/sidecar reader (anything it is given: a series or one InputError)."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from custom_components.methods.fitting import fit_ir
from custom_components.io import InputError, load_series
from custom_components.physics.protocol import Protocol, ProtocolError
from custom_components.methods.scaling import decode_maps, encode_maps
from custom_components.physics.signal_model import jacobian, signal, signed_signal

T1 = st.floats(1e-3, 20.0)  # s
PD = st.floats(0.0, 1e5)
B = st.floats(0.0, 2.5)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def timings(draw):
    """Protocol arguments over the whole range, echo trains of 1-64 echoes (spacing up to 30 ms) and TRs
    from just above the last TI: many trains do not fit between TI and the next inversion."""
    n = draw(st.integers(3, 10))
    tis = sorted(draw(st.lists(st.floats(1e-3, 5.0), min_size=n, max_size=n, unique=True)))
    assume(min(np.diff(tis)) > 1e-4)
    etl = draw(st.integers(1, 64))
    esp = draw(st.floats(0.0, 0.03))
    rep = draw(st.one_of(st.none(), st.floats(max(tis) + 1e-3, max(tis) + 3.0), st.floats(max(tis) + 1e-3, 20.0)))
    if rep is not None and draw(st.booleans()):  # one TR per image, growing with TI (some scanners)
        rep = tuple(float(t + rep - max(tis)) for t in tis)
    return dict(inversion_times_s=tuple(tis), repetition_time_s=rep, echo_train_length=etl, echo_spacing_s=esp)


@st.composite
def protocols(draw, tr=True):
    """Valid protocols (echo train of 1-64 echoes that ends before the next inversion)."""
    kw = draw(timings())
    if not tr:
        kw["repetition_time_s"] = None
    elif kw["repetition_time_s"] is not None:
        tis = np.asarray(kw["inversion_times_s"])
        ro = kw["echo_train_length"] * kw["echo_spacing_s"]
        tr_n = np.broadcast_to(np.asarray(kw["repetition_time_s"], float), tis.shape)
        assume(np.all(tr_n - tis - ro >= 1e-3))
    return Protocol(**kw)


@FAST
@given(t1=T1, pd=PD, b=B, kw=timings())
def test_signal_never_exceeds_the_relaxed_magnetisation_and_impossible_timing_is_refused(t1, pd, b, kw):
    """|Mz| after any history of inversions (efficiency B >= 0), saturating readouts and free
    relaxation: with a = e^(-TI/T1), c = e^(-Trec/T1) and Trec = TR - readout >= TI (the train ends
    before the next inversion), 0 <= c <= a <= 1 and s/PD = 1 - B a + (B - 1) c is linear in (a, c)
    over that triangle, so it lies between its corner values 1, 1 - B and 0:
    |s| <= PD max(1, |1 - B|) (= PD for B in [0, 2]). A protocol whose echo train does not fit is
    refused, with one line, exactly when TI + readout > TR for some image."""
    tis = np.asarray(kw["inversion_times_s"])
    readout = kw["echo_train_length"] * kw["echo_spacing_s"]
    fits = kw["repetition_time_s"] is None or bool(np.all(
        np.broadcast_to(np.asarray(kw["repetition_time_s"], float), tis.shape) - tis - readout >= -1e-9))
    try:
        protocol = Protocol(**kw)
    except ProtocolError as e:
        assert not fits and "impossible timing" in str(e) and "\n" not in str(e)
        return
    assert fits
    rec = protocol.recovery_times_s()
    assert rec is None or (rec > 0).all()
    s = signal(torch.tensor([t1, pd, b], dtype=torch.float64), protocol)
    assert torch.isfinite(s).all() and (s >= 0).all()
    assert (s <= pd * max(1.0, abs(1.0 - b)) * (1 + 1e-12) + 1e-9).all(), (s, pd, b)


@FAST
@given(t1=st.floats(1e-3, 0.3), pd=PD, b=B)
def test_signal_limits_full_recovery(t1, pd, b):
    """TI -> 0: |PD (1 - B)|; TI >> T1: PD; the null of the signed signal at TI = T1 ln B."""
    def s(tis):
        return signed_signal(torch.tensor([t1, pd, b], dtype=torch.float64),
                             Protocol(inversion_times_s=tuple(tis), repetition_time_s=None))
    early = s([1e-9 * t1, 2e-9 * t1, 3e-9 * t1])[0]
    assert float(early) == pytest.approx(pd * (1 - b), rel=1e-6, abs=1e-6 * pd + 1e-12)
    late = s([40 * t1, 50 * t1, 60 * t1])[-1]
    assert float(late) == pytest.approx(pd, rel=1e-9, abs=1e-12)
    if b > 1.0 + 1e-3 and pd > 0:
        null = t1 * math.log(b)
        v = s([null, null * 1.5 + 1e-9, null * 2 + 2e-9])[0]
        assert abs(float(v)) <= 1e-9 * pd + 1e-12


@FAST
@given(t1=st.floats(0.01, 10.0), pd=st.floats(0.1, 1e4), b=st.floats(0.5, 2.5), protocol=protocols())
def test_jacobian_matches_finite_differences(t1, pd, b, protocol):
    p = torch.tensor([t1, pd, b], dtype=torch.float64)
    s = signed_signal(p, protocol)
    assume(float(s.abs().min()) > 1e-6 * pd)  # away from the kink of |s|
    jac = jacobian(p, protocol)  # (N, 3): d|s_n| / d(T1, PD, B)
    for k, h in enumerate((1e-6 * t1, 1e-6 * pd, 1e-6)):
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = h
        fd = (signal(p + e, protocol) - signal(p - e, protocol)) / (2 * h)
        torch.testing.assert_close(jac[:, k], fd, rtol=1e-4, atol=1e-6 * max(pd, 1.0) / max(t1, 1e-3))


@settings(max_examples=25, deadline=None)
@given(t1=st.floats(0.05, 4.0), pd=st.floats(1.0, 1e4), b=st.floats(1.6, 2.0),
       protocol=st.sampled_from(["paper", "nist15"]))
def test_fit_of_noise_free_data_recovers_the_parameters(t1, pd, b, protocol):
    """Inside the protocol's T1 range, the classical fit of exact data returns the truth."""
    from custom_components.physics.protocol import get_protocol

    p = get_protocol(protocol)
    assume(t1 < 2.5 * max(p.tis))
    y = signal(torch.tensor([t1, pd, b], dtype=torch.float64), p).numpy()[None, :]
    f = fit_ir(y, p)
    assert np.isfinite([f.t1[0], f.pd[0], f.b[0]]).all()
    assert f.t1[0] == pytest.approx(t1, rel=2e-3)
    assert f.pd[0] == pytest.approx(pd, rel=2e-3)
    assert f.b[0] == pytest.approx(b, rel=2e-3)


@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.floats(0.0, 1e6, allow_subnormal=False), min_size=7 * 4, max_size=7 * 4))
def test_fit_never_returns_nan_for_any_finite_data(data):
    from custom_components.physics.protocol import paper_protocol

    y = np.asarray(data, dtype=float).reshape(4, 7)
    f = fit_ir(y, paper_protocol())
    for m in (f.t1, f.pd, f.b, f.residual):
        assert np.isfinite(m).all()
    assert (f.t1 > 0).all() and (f.pd >= 0).all()


@FAST
@given(t1=st.floats(0.0, 12.0), pd=st.floats(0.0, 7.0), b=st.floats(0.0, 2.5), scale=st.floats(1e-3, 1e4))
def test_scaling_round_trips_in_range_and_is_monotone(t1, pd, b, scale):
    """Round trip over the domain below the clip (x = atanh(1 - 1e-6) = 7.25: T1 up to 14.5 s, PD up to
    7.25 x the signal scale); a map at its lower bound 0 comes back as atanh(1e-6) x its normaliser."""
    maps = torch.tensor([[[t1]], [[pd * scale]], [[b]]], dtype=torch.float64)
    y = encode_maps(maps, scale)
    assert torch.isfinite(y).all() and (y >= -1).all() and (y < 1).all()
    back = decode_maps(y, scale)
    assert torch.isfinite(back).all()
    norm = torch.tensor([2.0, scale, 2.0], dtype=torch.float64).reshape(3, 1, 1)
    assert ((back - maps).abs() <= 1e-6 * maps.abs() + 3e-6 * norm).all(), (back, maps)
    y2 = encode_maps(maps * 1.01 + 1e-6, scale)
    assert (y2 >= y).all()


@FAST
@given(y=st.floats(-5.0, 5.0), scale=st.floats(1e-3, 1e4))
def test_decoding_any_network_output_is_finite_and_non_negative(y, scale):
    out = decode_maps(torch.full((3, 1, 1), y, dtype=torch.float32), scale)
    assert torch.isfinite(out).all() and (out >= 0).all()


# ------------------------------------------------------------------------------------ reader fuzz
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.integers(-10**6, 10**6),
                                     st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=8),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
SIDECAR = st.one_of(
    st.fixed_dictionaries({}, optional={"InversionTime": JSON_VALUES, "RepetitionTime": JSON_VALUES,
                                        "EchoTime": JSON_VALUES, "ImageType": JSON_VALUES, "qMRIProtocol": JSON_VALUES}),
    st.fixed_dictionaries({"InversionTime": st.lists(st.one_of(st.floats(-1, 5), st.floats(allow_nan=True)),
                                                     min_size=0, max_size=9)},
                          optional={"RepetitionTime": st.one_of(st.floats(allow_nan=True), st.lists(st.floats(), max_size=9))}),
    JSON_VALUES,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sidecar=SIDECAR, n=st.integers(1, 9), shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       values=st.sampled_from(["ok", "nan", "neg", "zero", "big"]), raw_sidecar=st.booleans())
def test_reader_fuzz_returns_a_series_or_one_input_error(tmp_path_factory, sidecar, n, shape, values, raw_sidecar):
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    data = rng.random((*shape, n)).astype(np.float32) + 0.1
    if values == "nan":
        data.flat[0] = np.nan
    elif values == "neg":
        data.flat[0] = -1.0
    elif values == "zero":
        data[:] = 0
    elif values == "big":
        data *= 3e38
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(d / "s.nii.gz"))
    text = json.dumps(sidecar, allow_nan=True) if not raw_sidecar else json.dumps(sidecar)[:-1]
    (d / "s.json").write_text(text)
    try:
        series = load_series(d / "s.nii.gz")
    except (InputError, ProtocolError) as e:
        assert str(e) and "\n" not in str(e)
        return
    assert series.data.ndim == 4 and np.isfinite(series.data).all() and (series.data >= 0).all()
    assert series.data.shape[-1] == len(series.protocol.tis) >= 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(min_size=0, max_size=600), gz=st.booleans())
def test_reader_fuzz_arbitrary_bytes(tmp_path_factory, blob, gz):
    d = tmp_path_factory.mktemp("bytes")
    name = "s.nii.gz" if gz else "s.nii"
    (d / name).write_bytes(blob)
    (d / "s.json").write_text(json.dumps({"InversionTime": [0.1, 0.5, 1.0], "RepetitionTime": 5.0}))
    with pytest.raises((InputError, ProtocolError)) as e:
        load_series(d / name)
    assert "\n" not in str(e.value)
