"""Classical fit of the real NIST phantom scans in ../shared/data/nist_phantom_ir, sphere by sphere.

    python scripts/nist_real_report.py --out docs/nist_real_scans.md [--data ../shared/data/nist_phantom_ir]

For every scan folder (site*/plate*): `qmri map FOLDER --out out/nist_real/<site>_<plate> --method mle`
(the same function the command calls), then the sphere report against the 1.5 T reference values
of the plate (plate5: T1 plate, NiCl2; plate4: T2 plate, MnCl2; phantom version 1, about 20 C).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nist_phantom_ir"))
    ap.add_argument("--maps", default=str(REPO / "out" / "nist_real"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--method", default="mle")
    a = ap.parse_args()

    from custom_components.reporting.evaluation import format_table_markdown, locate_spheres, sphere_table, table_summary
    from custom_components.io import load_series, save_maps
    from custom_components.mapping import map_series, output_arrays, sidecars_for
    from custom_components.data.phantoms import reference_values

    folders = sorted(p for p in Path(a.data).glob("site*/plate*") if p.is_dir())
    if not folders:
        raise SystemExit(f"no scan folders under {a.data}")
    sections, summary = [], []
    for folder in folders:
        site, plate_dir = folder.parent.name, folder.name
        plate = "T1" if plate_dir == "plate5" else "T2"
        t = time.perf_counter()
        series = load_series(folder)
        res = map_series(series, method=a.method, progress=False)
        dt = time.perf_counter() - t
        save_maps(Path(a.maps) / f"{site}_{plate_dir}", output_arrays(res), series.affine,
                  sidecars_for(res, series, a.method), overwrite=True)
        t1 = res.maps["T1"][:, :, 0]
        ref = reference_values(plate, 1.5, 1)["T1_s"]
        spacing = series.voxel_size_mm[:2]
        layout = locate_spheres(series.data[:, :, 0, :].transpose(2, 0, 1), spacing, plate=plate, t1_map=t1,
                                reference_t1_s=ref)
        rows = sphere_table(t1, layout, ref, t1_range_s=(0.4, 2.0))
        tr = series.protocol.repetition_time_s
        tr_txt = ", ".join(f"{x:g}" for x in tr) if isinstance(tr, tuple) else f"{tr:g}"
        title = (f"{site} / {plate_dir} ({plate} plate): TI {', '.join(f'{x * 1000:g}' for x in series.tis_s)} ms, "
                 f"TR {tr_txt} s; fit {res.info.get('noise')} (sigma {res.info.get('sigma', float('nan')):.3g}), {dt:.1f} s")
        sections.append(format_table_markdown(rows, title))
        sections.append("Input notes: " + "; ".join(series.notes))
        s = table_summary(rows)
        summary.append((site, plate_dir, s))
        print(sections[-2], "\n")

    head = [f"# Classical fit ({a.method}) of the real NIST phantom scans (1.5 T)", "",
            f"Made by `python scripts/nist_real_report.py --out docs/nist_real_scans.md` on {date.today()}, "
            f"{platform.machine()} CPU. References: phantom version 1, 1.5 T, about 20 C "
            "(shared/data/nist_phantom_ir/README.md). Spheres located from the images (no per-scan coordinates); "
            "ROI = 0.6 x sphere radius. Bold rows: reference T1 within 0.4-2 s.", "",
            "| scan | spheres in 0.4-2 s | mean abs. T1 error (%) | mean CV (%) | all 14 spheres: mean abs. T1 error (%) | mean CV (%) |",
            "|---|---|---|---|---|---|"]
    for site, plate_dir, s in summary:
        iv, al = s["in_vivo_range"], s["all"]
        head.append(f"| {site}/{plate_dir} | {iv['n']} | {iv['mean_abs_error_percent']:.1f} | {iv['mean_cv_percent']:.1f} | "
                    f"{al['mean_abs_error_percent']:.1f} | {al['mean_cv_percent']:.1f} |")
    text = "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n"
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        print(f"-> {a.out}")


if __name__ == "__main__":
    main()
