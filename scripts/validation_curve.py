"""Validation curves of bundle training logs as a markdown table.

    python scripts/validation_curve.py runs/resnet.log [runs/rim.log ...] [--labels resnet,rim] [--metric val_t1_mape]

Reads the lines the bundles' StatsHandler writes after each validation
("Epoch[N] Metrics -- val_pd_mape: X val_t1_mape: Y") and prints one row per log, one column per
validated epoch. A resumed run's log holds the epochs after the resume only; pass both logs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)$")


def read_curve(path: str | Path, metric: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        m = LINE.search(line)
        if not m:
            continue
        values = dict(re.findall(r"(\w+): ([-+0-9.eE]+)", m.group(2)))
        if metric in values:
            out[int(m.group(1))] = float(values[metric])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--labels", default=None, help="comma-separated row labels (default: the file names)")
    ap.add_argument("--metric", default="val_t1_mape")
    a = ap.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [Path(p).stem for p in a.logs]
    if len(labels) != len(a.logs):
        print("validation_curve: error: one label per log", file=sys.stderr)
        return 2
    curves = [read_curve(p, a.metric) for p in a.logs]
    epochs = sorted(set().union(*curves))
    if not epochs:
        print(f"validation_curve: error: no '{a.metric}' validation lines in {', '.join(a.logs)}", file=sys.stderr)
        return 2
    print("| epoch | " + " | ".join(str(e) for e in epochs) + " |")
    print("|---|" + "---|" * len(epochs))
    for lab, c in zip(labels, curves):
        print(f"| {lab}: {a.metric} | " + " | ".join(f"{c[e]:.1f}" if e in c else "" for e in epochs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
