"""Issue 19, items 1 and 6: a weights card is data and --device is parsed, never pasted into a config
expression; the command line reports only the project's own input errors as bad input (a bug keeps its
traceback), --debug shows tracebacks, --quiet silences every progress bar, and --seed exists where a
message names it."""

import inspect
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_cases import INTERNAL_CASES, REPO, _map, _nifti, run_case  # noqa: E402

from custom_components.bundle.training import check_weights_card, read_weights_card, write_weights_card
from custom_components.io.series import parse_device
from custom_components.cli import QMRI, main
from custom_components.io import InputError

SHIPPED_CARDS = sorted(p for p in REPO.glob("bundles/*/models/*.json") if p.with_suffix(".pt").exists())  # a card is W.json beside W.pt
EVIL = "$__import__('pathlib').Path({!r}).write_text('owned') and 'compact'"


# ---------------------------------------------------------------------------------- item 1: the card
@pytest.mark.parametrize("card", SHIPPED_CARDS, ids=[f"{p.parts[-3]}/{p.name}" for p in SHIPPED_CARDS])
def test_every_shipped_card_passes_the_schema_unchanged(card):
    raw = json.loads(card.read_text())
    assert check_weights_card(raw, str(card)) == raw  # the protocol survives its own parser's round trip


def _paper_card(**changes):
    card = json.loads((REPO / "bundles" / "diffusor" / "models" / "model_fitcond.json").read_text())
    card.update(changes)
    return card


@pytest.mark.parametrize("changes", [
    {"network_preset": EVIL.format("x")},  # the example: code run by MONAI's ConfigParser
    {"prediction_type": "@network_def"},  # a reference to another config item
    {"network_preset": "%configs/train.json#network_preset"},  # a macro: part of another file
    {"network_preset": "huge"},  # not one of the networks' presets
    {"method": "$'diffusor'"},
    {"n_images": "$7"}, {"n_images": True}, {"n_images": 7.5}, {"n_images": 2},
    {"fit_condition": "$True"}, {"fit_condition": 1},
    {"protocol": "paper"},  # a string the config would resolve, not the protocol object
    {"protocol": {**_paper_card()["protocol"], "name": "$__import__('os').getcwd()"}},
    {"protocol": {**_paper_card()["protocol"], "repetition_time_s": "$10.0"}},
    {"protocol": {**_paper_card()["protocol"], "inversion_times_s": [0.05, "@x", 0.25]}},
    {"protocol": {**_paper_card()["protocol"], "echo_time_s": {"_target_": "os.getcwd"}}},
    {"protocol": {**_paper_card()["protocol"], "ordering": "spiral"}},  # the protocol's own parser refuses
    {"_target_": "os.getcwd"},  # not a card key
], ids=lambda c: ",".join(f"{k}={str(v)[:24]}" for k, v in c.items()))
def test_the_schema_refuses_anything_but_plain_data(changes):
    with pytest.raises(InputError, match="refused"):
        check_weights_card(_paper_card(**changes), "W.json")


def test_training_cannot_write_a_card_that_inference_refuses(tmp_path):
    with pytest.raises(InputError, match="expression or reference"):
        write_weights_card(tmp_path / "m.json", method="diffusor", network_preset="$'compact'")
    assert not (tmp_path / "m.json").exists()


def test_a_card_with_code_is_refused_before_it_runs(tmp_path, capsys):
    """The issue's card (shipped RIM weights, network_preset a "$" expression): before, MONAI evaluated it
    when the network was built, wrote the file and mapped; now: one line, exit 2, nothing run or written."""
    import shutil

    scan = _nifti(tmp_path)
    owned = tmp_path / "owned"
    shutil.copyfile(REPO / "bundles" / "rim" / "models" / "model.pt", tmp_path / "w.pt")
    card = json.loads((REPO / "bundles" / "rim" / "models" / "model.json").read_text())
    (tmp_path / "w.json").write_text(json.dumps({**card, "network_preset": EVIL.format(str(owned))}))
    code = main(_map(scan, "--method", "rim", "--weights", str(tmp_path / "w.pt")))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("qmri: error: ") and "\n" not in err and "network_preset" in err, err
    assert not owned.exists()
    assert not (tmp_path / "maps").exists()
    with pytest.raises(InputError):  # the config's own card_value(@ckpt_path, ...) reads through the schema too
        read_weights_card(tmp_path / "w.pt")


@pytest.mark.parametrize("device", ["cpu') if __import__('os') else ('cpu", "$torch.device('cpu')", "cuda:0;",
                                    "@device", "gpu"])
def test_device_is_parsed_never_pasted(device, tmp_path, capsys):
    with pytest.raises(InputError, match="--device must be"):
        parse_device(device)
    code = main(_map(_nifti(tmp_path), "--method", "rim", "--device", device))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--device must be" in err and "\n" not in err, err


def test_device_forms_that_are_accepted():
    import torch

    for d in ("cpu", "cuda", "cuda:1", "mps"):
        assert parse_device(d) == torch.device(d)
    for d in ("cpu ", "", None, 0, "cuda:-1"):
        with pytest.raises(InputError, match="--device must be"):
            parse_device(d)


# ------------------------------------------------------------------------ item 6: errors, quiet, seed
@pytest.mark.parametrize("case", INTERNAL_CASES, ids=[c.name for c in INTERNAL_CASES])
def test_a_bug_is_not_dressed_up_as_bad_input(case, tmp_path):
    """Before: every ValueError/OSError became `qmri: error: ...`, exit 2. Now a bug shows its traceback."""
    o = run_case(case, tmp_path / "case")
    assert case.as_expected(o), o
    assert o.code == 1 and o.stderr.rstrip().splitlines()[-1].startswith("ValueError: operands"), o.stderr


def test_a_bug_propagates_out_of_main(tmp_path, monkeypatch):
    from custom_components.methods import fitting

    def broken(self, *a, **k):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(fitting.InversionRecoveryModel, "fit", broken)
    with pytest.raises(ZeroDivisionError):
        main(_map(_nifti(tmp_path)))
    assert not (tmp_path / "maps").exists()


def test_debug_shows_the_traceback_of_bad_input(tmp_path, monkeypatch, capsys):
    scan = _nifti(tmp_path, sidecar=False)  # no inversion times: bad input
    assert main(_map(scan)) == 2
    assert capsys.readouterr().err.startswith("qmri: error: ")
    with pytest.raises(InputError, match="no inversion times"):
        main(_map(scan, "--debug"))
    monkeypatch.setenv("QMRI_DEBUG", "1")
    with pytest.raises(InputError, match="no inversion times"):
        main(_map(scan))


@pytest.mark.parametrize("args, message", [
    (["--noise", "poisson"], "--noise must be"),
    (["--n_coils", "0"], "--n_coils must be at least 1"),
    (["--sigma", "-1"], "--sigma must be a positive number"),
    (["--method", "diffusor", "--steps", "x"], "--steps must be an integer"),
    (["--method", "diffusor", "--seed", "-1"], "--seed must be at least 0"),
    (["--seed", "3"], "--seed apply to the diffusor only, not to mle"),
    (["--method", "ls", "--samples", "3"], "--samples apply to the diffusor only, not to ls"),
])
def test_map_flags_are_checked_as_bad_input(args, message, tmp_path, capsys):
    """Flags the library would refuse with a plain ValueError (now a traceback) are bad input at the
    command line; before, --seed did not exist and mle/ls ignored the Diffusor's flags silently."""
    code = main(_map(_nifti(tmp_path), *args))
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "maps").exists()


def test_every_flag_an_error_message_suggests_exists(tmp_path, capsys):
    """`--samples/--steps/--sampler/--seed/--symmetry apply to the diffusor only` named a --seed that
    `qmri map` did not have."""
    params = set(inspect.signature(QMRI.map).parameters)
    assert main(_map(_nifti(tmp_path), "--method", "resnet", "--samples", "2", "--seed", "1")) == 2
    err = capsys.readouterr().err
    flags = re.findall(r"--([a-z_]+)", err)
    assert "seed" in flags and set(flags) <= params, err


def _t1(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(str(folder / "T1map.nii.gz")).dataobj)


def test_diffusor_quiet_is_silent_and_seed_draws_the_ensemble(tmp_path, capfd):
    """A 8x8 paper-protocol series, 1 member, 2 steps. --quiet: nothing on stdout or stderr (before,
    the sampler's tqdm bars still appeared). --seed: the same seed gives the same maps, another seed
    another draw, and the sidecar records it."""
    scan = _nifti(tmp_path)
    small = ["--method", "diffusor", "--samples", "1", "--steps", "2", "--symmetry", "none"]
    capfd.readouterr()
    assert main(["map", str(scan), "--out", str(tmp_path / "a"), *small, "--seed", "1", "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert out == "" and "DPM-Solver" not in err and "it/s" not in err and "%|" not in err, err
    assert main(["map", str(scan), "--out", str(tmp_path / "b"), *small, "--seed", "1"]) == 0
    out, err = capfd.readouterr()
    assert "DPM-Solver++(2M) 2 steps" in err  # without --quiet the bars are there (the check above can see them)
    assert main(["map", str(scan), "--out", str(tmp_path / "c"), *small, "--seed", "2", "--quiet"]) == 0
    a, b, c = _t1(tmp_path / "a"), _t1(tmp_path / "b"), _t1(tmp_path / "c")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert json.loads((tmp_path / "c" / "T1map.json").read_text())["Fit"]["seed"] == 2


def test_report_of_an_image_without_a_phantom_is_bad_input(tmp_path, capsys):
    """An empty map has no phantom body: one line and exit 2, not a traceback (the error is the user's)."""
    path = tmp_path / "blank_T1map.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.float32), np.eye(4)), str(path))
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qmri: error:") and "no phantom body" in err[0]
