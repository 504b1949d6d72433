"""`qmri compare`: the report is written whole, its numbers are the methods' own, and known answers hold."""

from pathlib import Path

import numpy as np
import pytest

from custom_components.cli import main
from custom_components.reporting.comparison import (Case, MethodSpec, Result, brain_cases, brain_section, further_slice_seconds,
                                          methods_sentence, phantom_section, run_comparison, twin_case, verdicts)

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "nist_phantom_ir"


def test_sections_score_the_truth_perfectly():
    """A 'method' that returns the truth: zero NRMSE, SSIM 1, zero bias, and the twin table gives
    the ROI means of the true map (errors within the partial-volume-free ROI: ~0)."""
    case = brain_cases(1)[0]
    assert case.truth.shape[0] == 3 and case.extra["tissue"].shape == case.mask.shape
    spec = MethodSpec("truth", "truth", "mle")
    res = Result({"T1": case.truth[0], "PD": case.truth[1], "B": case.truth[2]}, 0.0, {})
    text, summ = brain_section([case], [{"truth": res}], [spec])
    assert summ["truth"]["t1_nrmse"] == 0 and summ["truth"]["t1_ssim"] == pytest.approx(1.0)
    assert "+0 (+0.0 %)" in text
    tw = twin_case(50.0)
    res = Result({"T1": tw.truth[0], "PD": tw.truth[1], "B": tw.truth[2]}, 0.0, {})
    text, summ = phantom_section(tw, {"mle": res}, [MethodSpec("mle", "fit", "mle")])
    assert summ["mle"]["max_abs_err"] < 0.5
    assert verdicts(summ, [MethodSpec("mle", "fit", "mle")]) == []


def test_compare_writes_the_report(tmp_path):
    """The classical fit alone through the whole report (small): every section, figures, and the
    fit's known accuracy on the SNR-50 twin (the 0.4-2 s spheres within 3 %)."""
    out = tmp_path / "docs"
    data = REAL if REAL.exists() else tmp_path / "none"
    path = run_comparison(out, brain_slices=1, methods=[MethodSpec("mle", "classical fit", "mle")], data_dir=data,
                          speed=True, log=lambda *a: None)
    text = path.read_text()
    heads = ["## 1. Real scans", "## 2. Synthetic brains, held out", "## 3. The robustness suite",
             "## 4. The development scene", "### SNR 50 (where the Diffusor's settings were chosen)", "### SNR 20",
             "## 5. Uncertainty", "## 6. Speed"]
    at = [text.find(h) for h in heads]
    assert min(at) > 0 and at == sorted(at)  # opens with the data nothing was chosen on; the twin later
    assert "(ROBUSTNESS.md)" in text
    assert (out / "figures" / "twin_snr50.png").stat().st_size > 10_000 and (out / "figures" / "brain.png").exists()
    row = next(line for line in text.splitlines() if line.startswith("| classical fit | ") and " / " in line)
    mean_err, max_err = (float(x) for x in row.split("|")[2].split("/"))
    assert max_err < 3.0 and mean_err <= max_err
    speed = next(line for line in text.splitlines() if line.startswith("| classical fit | 0 (iterative fit)"))
    assert float(speed.split("|")[3]) > 0 and float(speed.split("|")[-2]) > 100  # seconds; peak MB
    if REAL.exists():
        assert "site1_20200218 | plate5 (T1)" in text
    assert not list(out.glob("*.tmp"))


def test_methods_sentence_names_weights_and_the_diffusor_frames():
    specs = [MethodSpec("mle", "fit", "mle"), MethodSpec("d", "Diffusor", "diffusor", {"weights": "/x/model_fitcond.pt"}),
             MethodSpec("p", "plain", "diffusor", {"weights": "/x/model.pt"})]
    res = {"mle": Result({}, 0.0, {}), "d": Result({}, 0.0, {"symmetry": "dihedral"}), "p": Result({}, 0.0, {"symmetry": "none"})}
    assert methods_sentence(specs, res) == ("Methods: **fit** (`mle`); **Diffusor** (`diffusor`, model_fitcond.pt, members in "
                                            "the dihedral frames of the grid); **plain** (`diffusor`, model.pt).")


def test_further_slice_cost_is_the_difference_or_named_timing_noise():
    assert further_slice_seconds(60.7, 110.6) == "49.9"
    assert further_slice_seconds(3.3, 3.1) == "< 0.1 (timing noise)"  # the 2-slice run was faster: not a negative cost
    assert further_slice_seconds(1.0, 1.04) == "< 0.1 (timing noise)"


def test_compare_refuses_bad_arguments(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "x"), "--brain_slices", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qmri: error:") and "--brain_slices must be at least 1" in err[0]
    assert not (tmp_path / "x").exists()


def test_case_series_round_trip():
    from custom_components.physics.protocol import get_protocol

    c = Case("x", np.random.rand(7, 8, 6), get_protocol("paper"), np.ones((8, 6), bool))
    s = c.series()
    assert s.data.shape == (8, 6, 1, 7) and np.allclose(s.data[:, :, 0, :], np.moveaxis(c.images, 0, -1))


def test_weights_for_protocol_reads_the_shipped_cards():
    from custom_components.reporting.comparison import weights_for_protocol
    from custom_components.physics.protocol import get_protocol

    assert weights_for_protocol("diffusor", get_protocol("paper")).name == "model.pt"
    assert weights_for_protocol("diffusor", get_protocol("paper"), fit_condition=True).name == "model_fitcond.pt"
    assert weights_for_protocol("resnet", get_protocol("paper")).name == "model.pt"
    # the real scans' protocols: TR 1 s (GE, Philips) and the Siemens scans' variable TR are different models
    assert weights_for_protocol("resnet", get_protocol("nist15")).name == "model_nist15.pt"
    assert weights_for_protocol("resnet", get_protocol("nist15_variable_tr")).name == "model_nist15_variable_tr.pt"
    assert weights_for_protocol("diffusor", get_protocol("nist15"), fit_condition=True).name == "model_fitcond_nist15.pt"
    assert weights_for_protocol("diffusor", get_protocol("nist15")).name == "model_nist15.pt"  # images only (0.8.0)
    assert weights_for_protocol("diffusor", get_protocol("nist15_variable_tr"),
                                fit_condition=True).name == "model_fitcond_nist15_variable_tr.pt"
    assert weights_for_protocol("diffusor", get_protocol("nist15_variable_tr")) is None


def test_real_scan_sphere_tables_and_timing_text():
    from custom_components.reporting.comparison import _timing, real_scan_sphere_tables
    from custom_components.physics.protocol import nist_15t_protocol

    assert _timing(nist_15t_protocol()) == "TIs 50, 100, 200, 400, 600, 800 ms, TR 1 s"
    assert _timing(nist_15t_protocol(True)).endswith("TR 1, 1, 1, 1.26, 1.86, 2.46 s")
    rows = [{"sphere": k + 1, "reference_ms": r, "mean_ms": 1.1 * r, "std_ms": 5.0, "error_percent": 10.0,
             "in_vivo_range": 400 <= r <= 2000} for k, r in enumerate([1500.0, 300.0])]
    text = real_scan_sphere_tables([(Path("/d/site9/plate5"), MethodSpec("mle", "fit", "mle"), rows),
                                    (Path("/d/site9/plate5"), MethodSpec("rim", "RIM", "rim"), rows)])
    lines = text.splitlines()
    assert lines[0] == "#### site9 / plate5" and lines[2] == "| sphere | reference T1 (ms) | fit | RIM |"
    assert lines[4] == "| **1** | **1500.0** | **1650 ± 5 (+10.0 %)** | **1650 ± 5 (+10.0 %)** |"
    assert lines[5] == "| 2 | 300.0 | 330 ± 5 (+10.0 %) | 330 ± 5 (+10.0 %) |"


def test_real_scan_verdict_compares_each_model_with_the_fit_on_the_same_scans():
    from custom_components.reporting.comparison import real_scan_verdict

    def rows(err):  # one 0.4-2 s sphere with error err (%), one outside the range that must not count
        return [{"sphere": 1, "reference_ms": 1000.0, "mean_ms": 1000.0 * (1 + err / 100), "std_ms": 10.0,
                 "error_percent": err, "in_vivo_range": True},
                {"sphere": 2, "reference_ms": 50.0, "mean_ms": 100.0, "std_ms": 1.0, "error_percent": 100.0,
                 "in_vivo_range": False}]

    a, b = Path("/d/site1/plate5"), Path("/d/site2/plate5")
    fit, net = MethodSpec("mle", "fit", "mle"), MethodSpec("resnet", "ResNet", "resnet")
    text = real_scan_verdict([(a, fit, rows(2.0)), (b, fit, rows(-4.0)), (a, net, rows(-1.0)), (b, net, rows(10.0))])
    assert "ResNet: 5.5 % against the fit's 3.0 % on the same 2 scan(s); better than the fit on 1 of them" in text
    assert real_scan_verdict([(a, fit, rows(2.0))]) == ""


def test_real_scan_verdict_sets_each_model_beside_the_tv_fit_too():
    """The TV-regularised fit is a baseline (no verdict line of its own); each learned model's line also
    gives the TV fit's mean error on the scans both mapped and on how many the model beats it."""
    from custom_components.reporting.comparison import real_scan_verdict

    def rows(err):
        return [{"sphere": 1, "reference_ms": 1000.0, "mean_ms": 1000.0 * (1 + err / 100), "std_ms": 10.0,
                 "error_percent": err, "in_vivo_range": True}]

    a, b = Path("/d/site1/plate5"), Path("/d/site2/plate5")
    fit, tv, net = MethodSpec("mle", "fit", "mle"), MethodSpec("tv", "TV-regularised fit", "tv"), MethodSpec("rim", "RIM", "rim")
    text = real_scan_verdict([(a, fit, rows(2.0)), (b, fit, rows(-4.0)), (a, tv, rows(1.0)), (b, tv, rows(3.0)),
                              (a, net, rows(-1.5)), (b, net, rows(10.0))])
    assert ("RIM: 5.8 % against the fit's 3.0 % on the same 2 scan(s); better than the fit on 1 of them; against the "
            "TV-regularised fit's 2.0 % (5.8 % on the same 2 scan(s)), better on 0 of them") in text
    assert "TV-regularised fit:" not in text


def test_verdicts_and_tables_compare_with_both_baselines():
    """Twin verdicts, the twin summary table and the brain verdicts set a learned method beside the
    plain and the TV-regularised fit; the default methods include the TV fit."""
    from custom_components.reporting.comparison import brain_verdicts, default_methods

    assert [s.key for s in default_methods()[:2]] == ["mle", "tv"] and default_methods()[1].label == "TV-regularised fit"
    sel = list(range(3))

    def summ(err, std, short):
        return {"mean_abs_err": err, "max_abs_err": 2 * err, "std_ms": std, "short_mean_abs_err": short, "in_range": sel}

    specs = [MethodSpec("mle", "fit", "mle"), MethodSpec("tv", "TV fit", "tv"), MethodSpec("d", "Diffusor", "diffusor")]
    s = {"mle": summ(1.0, [10, 10, 10], 5.0), "tv": summ(3.0, [4, 4, 4], 4.0), "d": summ(2.0, [5, 5, 3], 4.5)}
    (line,) = verdicts(s, specs)
    assert line.startswith("- **Diffusor**: in accuracy on the 0.4-2 s spheres it loses to the classical fit (mean abs. error 2.0 % vs 1.0 %")
    assert ("Against the TV-regularised fit it beats it on the 0.4-2 s spheres (2.0 % vs 3.0 %, max 4.0 % vs 6.0 %), its "
            "within-sphere std is lower in 1 of 3, and for 0.1-0.4 s it loses to it (4.5 % vs 4.0 %).") in line
    b = {"mle": {"t1_nrmse": 0.2, "pd_nrmse": 0.1}, "tv": {"t1_nrmse": 0.1, "pd_nrmse": 0.05}, "d": {"t1_nrmse": 0.15, "pd_nrmse": 0.07}}
    assert brain_verdicts(b, specs) == ["- **Diffusor**: T1 NRMSE 0.150 against the classical fit's 0.200 and the "
                                        "TV-regularised fit's 0.100; PD NRMSE 0.070 against 0.100 and 0.050: better in "
                                        "T1 than the classical fit."]
    tw = twin_case(50.0)
    res = {k: Result({"T1": tw.truth[0] * f, "PD": tw.truth[1], "B": tw.truth[2]}, 0.0, {}) for k, f in (("mle", 1.0), ("tv", 1.01), ("d", 1.02))}
    text, _ = phantom_section(tw, res, specs)
    head = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert "std below the fit's | 0.4-2 s spheres with a within-sphere std below the TV fit's | seconds" in head
    row = next(line for line in text.splitlines() if line.startswith("| TV fit | "))
    assert row.split(" | ")[4] == "-"  # no comparison of the TV fit with itself


def test_only_real_scans_replaces_section_1_and_keeps_the_rest(tmp_path, capsys):
    from custom_components.reporting.comparison import update_real_scan_section

    report = tmp_path / "RESULTS.md"
    report.write_text("# R\n\nkept 0\n\n## 1. Real scans (old)\n\nold table\n\n## 2. Brains\n\nkept 2\n")
    empty = tmp_path / "no_scans"
    empty.mkdir()
    update_real_scan_section(tmp_path, data_dir=empty, methods=[MethodSpec("mle", "fit", "mle")])
    text = report.read_text()
    assert "old table" not in text and text.count("## 1. Real scans") == 1
    assert text.startswith("# R\n\nkept 0\n\n## 1. Real scans of the NIST phantom")
    assert text.endswith("## 2. Brains\n\nkept 2\n")
    assert f"No scan folders under {empty}" in text and "--only real_scans` on " in text
    assert not list(tmp_path.glob("*.tmp"))
    # no report yet, or a wrong --only: one line, nothing written
    assert main(["compare", "--out", str(tmp_path / "new"), "--only", "real_scans"]) == 2
    assert "no report to update" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["compare", "--out", str(tmp_path), "--only", "twin"]) == 2
    assert "--only takes real_scans" in capsys.readouterr().err


def test_evaluate_twin_decomposes_the_fit_std_into_noise(tmp_path):
    """The classical fit is unbiased at 0.2-1 s on the twin: its within-sphere std there is noise,
    with no spatial pattern beyond the estimate's sampling error; --decompose needs 2+ seeds."""
    import re
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate_twin.py"
    out = tmp_path / "t.md"
    r = subprocess.run([sys.executable, str(script), "--method", "mle", "--seeds", "3", "--decompose", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {}
    for line in out.read_text().splitlines():
        m = re.match(r"\|\s*\**(\d+)\**\s*\|\s*\**([\d.]+)\**\s*\|\s*\**([\d.]+) / ([\d.]+) / ([\d.]+) / [\d.]+\**\s*\|", line)
        if m:
            rows[int(m[1])] = tuple(float(m[k]) for k in (3, 4, 5))
    assert sorted(rows) == list(range(1, 15))
    for k in (4, 5, 6, 7):  # 0.69-0.24 s
        total, noise, pattern = rows[k]
        assert noise == pytest.approx(total, rel=0.15) and pattern < 0.5 * noise
    bad = subprocess.run([sys.executable, str(script), "--method", "mle", "--seeds", "1", "--decompose"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--decompose needs --seeds 2" in bad.stderr
