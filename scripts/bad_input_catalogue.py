"""Run the bad-input catalogue (tests/bad_input_cases.py) and write docs/bad_input.md: each case, what it
is, the exit status and the one-line error `qmri map` gives, and whether anything was left behind.

    python scripts/bad_input_catalogue.py [--out docs/bad_input.md]
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bad_input_cases import CASES, INTERNAL_CASES, run_case  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "bad_input.md"))
    args = ap.parse_args(argv)
    rows = []
    failures = 0
    for case in CASES + INTERNAL_CASES:
        with tempfile.TemporaryDirectory() as tmp:
            o = run_case(case, Path(tmp) / "case")
            lines_ = o.stderr.splitlines()
            msg = lines_[0] if len(lines_) < 2 else f"{lines_[0]} ... {lines_[-1]}"  # a traceback: first and last line
            msg = msg.replace(tmp, "<tmp>").replace(str(REPO), "<repo>").replace("|", "\\|")
            msg = re.sub(r"\x1b\[[0-9;]*m", "", msg)
            ok = case.as_expected(o)
            failures += not ok
            left = "nothing" if not o.new_files else ", ".join(o.new_files)
            rows.append(f"| `{case.name}` | {case.what} | {o.code} | {msg} | {left} | {'yes' if ok else '**NO**'} |")
    lines = [
        "# Bad input: what `qmri map` refuses, and how",
        "",
        "Each row is a test (`tests/test_bad_input.py`, cases in `tests/bad_input_cases.py`). For every case the",
        "command prints one line on stderr, exits with status 2, leaves no output (maps are written under",
        "temporary names and renamed only when all are complete), does not change its inputs, and runs no",
        "code from a weights file (weights are read with `torch.load(weights_only=True)`). A bundle's configs",
        "are code (MONAI's `$` expressions and `_target_`s run when a config is parsed): take `--bundle`",
        "folders only from people you trust, as you would a Python package. A weights file's card is data: it",
        "is checked against a schema (plain numbers, booleans, the protocol, names from fixed lists; no string",
        "starting with `$`, `@` or `%`) before any of it reaches a config, and `--device` is parsed, never pasted.",
        "",
        "The last row is not bad input but a bug planted in the code: `qmri` shows its traceback and exits with",
        "status 1 instead of dressing it up as a user error (`--debug` or `QMRI_DEBUG=1` shows the traceback of",
        "bad input too).",
        "",
        "| case | input | exit | the error line (paths shortened to `<tmp>` and `<repo>`) | left behind | as expected |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Not refused, by design: inversion times in any order (the images are sorted with their TIs, and the",
        "sidecar's `InputNotes` say so); an output folder that exists and is empty; `--overwrite` into a",
        "folder of earlier results (only the files being written are replaced, each atomically, never an input).",
        "Large volumes are read once (the limit above, `QMRI_MAX_INPUT_GB`, default 8 GB as float64, checked from",
        "each file's header) and mapped slice by slice (learned methods) or in chunks of voxels (the fit): beyond",
        "the input and the output maps, which are held whole, the working memory does not grow with the number",
        "of slices.",
        "",
        f"Made by `python scripts/bad_input_catalogue.py` on {date.today().isoformat()}, {platform.machine()} CPU.",
        "",
    ]
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print(f"{len(CASES) + len(INTERNAL_CASES) - failures}/{len(CASES) + len(INTERNAL_CASES)} cases as expected -> {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
