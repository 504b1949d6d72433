"""A learned model maps only the timing it was trained for: the inversion times and the repetition times."""

import numpy as np
import pytest
import torch

from custom_components.physics.protocol import (ProtocolError, check_same_timing, get_protocol, nist_15t_protocol,
                                        paper_protocol)
from custom_components.physics.signal_model import signal


def test_same_protocol_passes_and_small_differences_are_tolerated():
    check_same_timing(paper_protocol(), paper_protocol())
    check_same_timing(paper_protocol(), paper_protocol().with_(repetition_time_s=10.1))  # 1 %
    check_same_timing(nist_15t_protocol(True), nist_15t_protocol(True))


def test_tr_differences_that_change_the_signal_are_refused():
    # the reason for the check: the Siemens scans' TR (growing to 2.46 s) against TR 1 s changes the
    # signal of T1 = 1 s at TI 0.8 s from 0.47 to 0.19 PD
    params = torch.tensor([1.0, 1.0, 2.0])
    s_const = signal(params, nist_15t_protocol(False), dim=0)
    s_var = signal(params, nist_15t_protocol(True), dim=0)
    np.testing.assert_allclose([float(s_const[-1]), float(s_var[-1])], [0.47, 0.19], atol=0.01)
    with pytest.raises(ProtocolError, match=r"trained for TR 1.0 s, the input has TR \[1.0, 1.0, 1.0, 1.26, 1.86, 2.46\] s"):
        check_same_timing(nist_15t_protocol(False), nist_15t_protocol(True))
    with pytest.raises(ProtocolError, match="trained for TR 10.0 s, scan.nii has TR 3.0 s"):
        check_same_timing(paper_protocol(), paper_protocol().with_(repetition_time_s=3.0), where="scan.nii")


def test_inversion_times_are_checked_first_and_unknown_tr_is_not_refused():
    with pytest.raises(ProtocolError, match="trained for TIs"):
        check_same_timing(paper_protocol(), get_protocol("nist15"))
    check_same_timing(paper_protocol(), paper_protocol().with_(repetition_time_s=None))


# ------------------------------------------------------------------------ timing from headers (issue 19, item 2)
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from custom_components.physics.protocol import Protocol, from_bids_sidecars, from_dicom_headers  # noqa: E402

PAPER_TIS = [0.05, 0.10, 0.25, 0.50, 0.85, 1.50, 2.50]
FSE_SIDECAR = {"InversionTime": PAPER_TIS, "RepetitionTime": 4.0, "EchoTime": 0.1, "EchoTrainLength": 64}


def _steady_state_mz(t1, b, ti, tr, readout, n_cycles=200):
    """Mz / M0 at TI by stepping the pulse sequence (independent of the closed form): inversion
    Mz -> (1 - B) Mz, free relaxation for TI, readout that leaves Mz = 0, free relaxation until TR."""
    def relax(mz, t):
        return 1.0 - (1.0 - mz) * np.exp(-t / t1)

    mz = 1.0
    for _ in range(n_cycles):
        mz = relax((1.0 - b) * mz, ti)
        at_ti = mz
        mz = relax(0.0, tr - ti - readout)
    return at_ti


def test_the_model_matches_a_stepped_sequence_with_a_long_echo_train():
    """With the echo spacing given, an FSE protocol whose train takes 0.64 s of TR 4 s gives the signal
    of the stepped sequence (recovery = TR - readout in the closed form)."""
    p = from_bids_sidecars([FSE_SIDECAR], echo_spacing_s=0.01)
    assert p.readout_duration_s == pytest.approx(0.64)
    np.testing.assert_allclose(p.recovery_times_s(), 4.0 - 0.64)
    for t1, b in ((0.3, 2.0), (1.5, 1.9), (4.0, 1.6)):
        s = signal(torch.tensor([t1, 1.0, b], dtype=torch.float64), p).numpy()
        ref = [abs(_steady_state_mz(t1, b, ti, 4.0, 0.64)) for ti in PAPER_TIS]
        np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-12)


def test_a_fse_sidecar_whose_echo_train_cannot_fit_in_tr_is_refused_in_one_line():
    """The issue's sidecar: 64 echoes, effective TE 0.1 s, TR 4 s. Before, echo spacing = TE made the
    readout 6.4 s, the recovery TR - readout = -2.4 s and the model's exp(+2.4/T1) term gave ~7e20 x PD
    for T1 = 50 ms; now the protocol is refused before any fit, naming where each timing came from."""
    with pytest.raises(ProtocolError) as e:
        from_bids_sidecars([FSE_SIDECAR])
    msg = str(e.value)
    assert "\n" not in msg
    for piece in ("impossible timing", "6.4 s readout", "sidecar EchoTime", "sidecar EchoTrainLength",
                  "sidecar RepetitionTime", "--echo_spacing"):
        assert piece in msg, (piece, msg)
    # the same train built directly, or any train ending after the next inversion, is refused too
    with pytest.raises(ProtocolError, match="impossible timing"):
        Protocol(tuple(PAPER_TIS), repetition_time_s=4.0, echo_train_length=64, echo_spacing_s=0.1)
    with pytest.raises(ProtocolError, match="impossible timing"):  # 2.5 + 0.64 > 3.1: fits TR but not after TI
        Protocol(tuple(PAPER_TIS), repetition_time_s=3.1, echo_train_length=64, echo_spacing_s=0.01)
    Protocol(tuple(PAPER_TIS), repetition_time_s=3.15, echo_train_length=64, echo_spacing_s=0.01)  # fits


def test_every_timing_has_a_named_source():
    p = from_bids_sidecars([FSE_SIDECAR], echo_spacing_s=0.01)
    src = p.timing_provenance
    assert src["inversion_times_s"] == "sidecar InversionTime"
    assert src["repetition_time_s"] == "sidecar RepetitionTime"
    assert src["echo_train_length"] == "sidecar EchoTrainLength"
    assert "--echo_spacing" in src["echo_spacing_s"]
    assert "0.64 s" in src["readout_duration_s"]
    # without an echo spacing: the echo time, the largest spacing an effective TE allows
    q = from_bids_sidecars([dict(FSE_SIDECAR, RepetitionTime=10.0, EchoTime=0.01)])
    assert q.echo_spacing_s == 0.01 and "largest echo spacing" in q.timing_provenance["echo_spacing_s"]
    # documented defaults are named as defaults; --etl replaces the header's value and says so
    r = from_bids_sidecars([{"InversionTime": PAPER_TIS, "RepetitionTimeExcitation": 10.0}])
    assert r.echo_train_length == 1 and r.timing_provenance["echo_train_length"].startswith("default 1")
    assert r.timing_provenance["repetition_time_s"] == "sidecar RepetitionTimeExcitation"
    assert r.timing_provenance["echo_spacing_s"].startswith("default 0 s")
    f = from_bids_sidecars([{"InversionTime": PAPER_TIS}])
    assert f.recovery_times_s() is None and "full recovery" in f.timing_provenance["repetition_time_s"]
    e = from_bids_sidecars([FSE_SIDECAR], echo_spacing_s=0.01, echo_train_length=32)
    assert e.readout_duration_s == pytest.approx(0.32)
    assert "--etl" in e.timing_provenance["echo_train_length"] and "64" in e.timing_provenance["echo_train_length"]
    # an echo train of unknown duration is refused rather than taken as instantaneous
    with pytest.raises(ProtocolError, match="readout's duration is unknown"):
        from_bids_sidecars([{"InversionTime": PAPER_TIS, "RepetitionTime": 10.0, "EchoTrainLength": 64}])
    for bad in (0.0, -0.01, float("nan")):
        with pytest.raises(ProtocolError, match="echo spacing must be"):
            from_bids_sidecars([FSE_SIDECAR], echo_spacing_s=bad)
    with pytest.raises(ProtocolError, match="whole number"):
        from_bids_sidecars([FSE_SIDECAR], echo_spacing_s=0.01, echo_train_length=2.5)


def test_dicom_headers_name_their_fields_and_refuse_an_impossible_train():
    from pydicom.dataset import Dataset

    def ds(ti_ms, etl):
        d = Dataset()
        d.InversionTime, d.RepetitionTime, d.EchoTime, d.EchoTrainLength = f"{ti_ms:g}", "4000", "100", etl
        return d

    heads = [ds(t * 1000, 64) for t in PAPER_TIS]
    with pytest.raises(ProtocolError, match=r"impossible timing.*DICOM EchoTime \(0018,0081\).*DICOM EchoTrainLength"):
        from_dicom_headers(heads)
    p = from_dicom_headers(heads, echo_spacing_s=0.01)
    assert p.readout_duration_s == pytest.approx(0.64)
    assert p.timing_provenance["repetition_time_s"] == "DICOM RepetitionTime (0018,0080)"
    assert "--echo_spacing" in p.timing_provenance["echo_spacing_s"]
    se = from_dicom_headers([ds(t * 1000, 1) for t in PAPER_TIS])  # spin echo: one echo of 0.1 s fits
    assert se.readout_duration_s == pytest.approx(0.1) and "one echo per excitation" in se.timing_provenance["echo_spacing_s"]


def test_sources_reach_the_output_sidecars_and_our_own_sidecars_read_back(tmp_path):
    """save_series writes the echo spacing (qMRIProtocol) beside the effective TE, so a series whose
    TE is not its echo spacing reads back; map sidecars carry qMRITimingSources."""
    from custom_components.io import load_series, protocol_sidecar, save_series
    from custom_components.mapping import map_series, sidecars_for

    prot = Protocol(tuple(PAPER_TIS), repetition_time_s=4.0, echo_time_s=0.1, echo_train_length=64,
                    echo_spacing_s=0.01, name="fse")
    t1 = np.linspace(0.3, 2.0, 4).reshape(2, 2, 1)
    params = np.stack([t1, np.full_like(t1, 100.0), np.full_like(t1, 1.9)])
    data = signal(params, prot).numpy().transpose(1, 2, 3, 0).astype(np.float32)
    path = save_series(tmp_path / "s.nii.gz", data, np.eye(4), prot)
    series = load_series(path)
    assert series.protocol == prot
    assert series.protocol.timing_provenance["echo_spacing_s"] == "sidecar qMRIProtocol.echo_spacing_s"
    # the same file with a dcm2niix-like sidecar (no qMRIProtocol) is refused; --echo_spacing rescues it
    sc = json.loads(Path(path).with_name("s.json").read_text())
    del sc["qMRIProtocol"], sc["qMRITimingSources"]
    Path(path).with_name("s.json").write_text(json.dumps(sc))
    from custom_components.io import InputError

    with pytest.raises(InputError, match="impossible timing"):
        load_series(path)
    series = load_series(path, echo_spacing=0.01, tis=PAPER_TIS)
    src = protocol_sidecar(series.protocol)["qMRITimingSources"]
    assert src["echo_spacing_s"].startswith("echo_spacing argument") and src["inversion_times_s"].startswith("tis argument")
    res = map_series(series, method="ls", progress=False)
    np.testing.assert_allclose(res.maps["T1"][..., 0][res.mask[..., 0]], t1[..., 0][res.mask[..., 0]], rtol=1e-3)
    for side in sidecars_for(res, series, "ls").values():
        assert side["Protocol"]["qMRITimingSources"] == src


def test_presets_and_shipped_weights_cards_still_build():
    for name in ("paper", "nist15", "nist15_variable_tr"):
        get_protocol(name)
    cards = sorted(Path(__file__).resolve().parents[1].glob("bundles/*/models/*.json"))
    assert cards
    for card in cards:
        d = json.loads(card.read_text())
        if "protocol" in d:
            Protocol.from_dict(d["protocol"])
