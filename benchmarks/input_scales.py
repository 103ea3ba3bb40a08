"""FP32, PTQ-INT8 and QAT-INT8 for each input compression (`features.magnitude_scale`).

For every scale (default: none, sqrt, log, pcen) and seed, the whole default DAG runs
from the features on in a fresh folder, as `benchmarks/seeds.py` does, with only
`features.magnitude_scale` changed: each scale gets its own features, pretrained model,
PTQ and QAT. Every scale folder is a `seeds.py` work folder (``<workdir>/<scale>``, with
its own demo trees and ``seed-N`` runs), so a rerun reuses what finished.

A run the INT8 gate stops is a row with the gate's message. With --lift-gates the gate's
limits are lifted (`convert.max_loss_vs_fp32` and `max_loss_vs_ptq` to 100 points,
`min_simulation_cosine` to 0), so that a poor scale is measured instead of stopped; the
last column then says whether the config's own gates would have passed the QAT model
(from its `results/convert/qat.json`).

Printed (and written to --out): test-split file top-1 and cmAP, mean ± sd over the
seeds, per scale, then every run.

    python benchmarks/input_scales.py --seeds 7 42 --workdir /tmp/scales
    python benchmarks/input_scales.py --scales log --seeds 7 --lift-gates --workdir /tmp/scales
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seeds import MODELS, ROOT, demo_trees, mean_sd, run_seed  # noqa: E402 (same runs as seeds.py)
from selection_rules import resolved_config  # noqa: E402

SCALES = ("none", "sqrt", "log", "pcen")
LIFTED_GATES = {"max_loss_vs_fp32": 100.0, "max_loss_vs_ptq": 100.0, "min_simulation_cosine": 0.0}


def scale_config(base: Path, scale: str, folder: Path, lift_gates: bool) -> Path:
    """``base`` with ``features.magnitude_scale`` set (and the INT8 gates lifted)."""
    config = yaml.safe_load(base.read_text()) or {}
    config.setdefault("features", {})["magnitude_scale"] = scale
    if lift_gates:
        config.setdefault("convert", {}).update(LIFTED_GATES)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("config-lifted-gates.yaml" if lift_gates else "config.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def default_gate(base: Path, row: dict) -> str:
    """Whether the run's QAT model passes the gates of ``base``: its gate checks
    (measured on validation) against those limits."""
    from n6qat.gate import GateSettings

    record = Path(row["folder"]) / "results/convert/qat.json"
    if "error" in row or not record.exists():
        return "n/a"
    gate = GateSettings.from_config(resolved_config(base, row["seed"])["convert"])
    limits = {"simulation_fidelity": gate.min_simulation_cosine,
              "file_top1_loss_vs_fp32": gate.max_loss_vs_fp32,
              "file_top1_loss_vs_ptq": gate.max_loss_vs_ptq}  # fmt: skip
    failed = []
    for check in json.loads(record.read_text())["gate"]["checks"]:
        limit = limits.get(check["check"])
        if limit is None:
            continue
        fidelity = check["check"] == "simulation_fidelity"
        if (check["measured"] < limit) if fidelity else (check["measured"] > limit):
            measured = f"{check['measured']:.{4 if fidelity else 2}f}"
            failed.append(f"{check['check']} {measured} (limit {limit})")
    return "stops: " + "; ".join(failed) if failed else "passes"


def markdown(results: dict[str, list[dict]], base: Path) -> str:
    metrics = (("file_top1_accuracy", "top-1 %", 100.0, 1), ("file_cmap", "cmAP", 1.0, 3))
    header = ["scale", "seeds"] + [f"{MODELS[m]} {label}" for _, label, _, _ in metrics
                                   for m in MODELS]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scale, rows in results.items():
        done = [row for row in rows if "error" not in row]
        cells = [scale, str(len(done))]
        for key, _, factor, digits in metrics:
            cells += [mean_sd([factor * r[f"{m}.{key}"] for r in done], digits) for m in MODELS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| scale | seed | " + " | ".join(f"{MODELS[m]} top-1" for m in MODELS)
              + " | " + " | ".join(f"{MODELS[m]} cmAP" for m in MODELS)
              + " | default gates |", "|" + "---|" * (3 + 2 * len(MODELS))]  # fmt: skip
    for scale, rows in results.items():
        for row in rows:
            if "error" in row:
                lines.append(f"| {scale} | {row['seed']} | FAILED: {row['error']} |")
                continue
            top1 = [f"{100 * row[f'{m}.file_top1_accuracy']:.1f}" for m in MODELS]
            cmap = [f"{row[f'{m}.file_cmap']:.3f}" for m in MODELS]
            lines.append(f"| {scale} | {row['seed']} | " + " | ".join(top1 + cmap)
                         + f" | {default_gate(base, row)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", choices=SCALES, default=list(SCALES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 42, 1])
    parser.add_argument("--configfile", type=Path, default=ROOT / "config/config.yaml")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--lift-gates", action="store_true",
                        help="measure runs the INT8 gates would stop (see LIFTED_GATES)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="n6qat_scales_"))).resolve()
    base = args.configfile.resolve()
    print(f"work folder: {workdir}", flush=True)
    # A scale folder may be a link to an earlier seeds.py work folder: run it by its real
    # path, which its runs' recorded paths (demo trees) use.
    folders = {scale: (workdir / scale).resolve() for scale in args.scales}
    configs = {
        scale: scale_config(base, scale, folders[scale], args.lift_gates)
        for scale in args.scales
    }
    trees = {scale: demo_trees(folders[scale], configs[scale], args.cores)
             for scale in args.scales}  # fmt: skip
    results: dict[str, list[dict]] = {scale: [] for scale in args.scales}
    for seed in args.seeds:  # seed by seed: every scale has the same seeds at any time
        for scale in args.scales:
            folder, configfile = folders[scale], configs[scale]
            row = run_seed(seed, folder / f"seed-{seed}", configfile, trees[scale], args.cores)
            status = row.get("error") or "  ".join(
                f"{MODELS[m]} {100 * row[f'{m}.file_top1_accuracy']:.1f}" for m in MODELS
            )
            print(f"{scale} seed {seed} ({row['seconds']:.0f} s): {status}", flush=True)
            results[scale].append(row)
    table = markdown(results, base)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 1 if any("error" in row for rows in results.values() for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
