"""Run the whole workflow for several seeds and print FP32, PTQ-INT8 and QAT-INT8 side by side.

Each seed sets the split, pretraining, QAT and calibration seeds; every run is a fresh
folder (features on: the audio trees are shared), with the default target (`make run`'s).
Printed per seed and as mean ± sd over the runs that finished: test-split file-level top-1
and cmAP, the simulation-fidelity cosine of QAT-INT8, whether QAT-INT8 >= PTQ-INT8, and
the sha256 of both .tflite files. With --repeat-first the first seed runs twice in two
fresh folders and the hashes are compared (reproducibility).

    python benchmarks/seeds.py --seeds 1 2 3 4 5 --repeat-first
    python benchmarks/seeds.py --configfile tests/config/tiny.yaml --seeds 1 2 3

Everything is written under --workdir (default: a new temporary folder); nothing in the
repository changes. A seed whose run fails (e.g. the INT8 gate) is reported with its
error and counted as failed; the exit status is 1 when any run failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"fp32": "FP32", "ptq_int8": "PTQ-INT8", "qat_int8": "QAT-INT8"}
METRICS = {"file_top1_accuracy": "top-1 %", "file_cmap": "cmAP"}


def snakemake(workdir: Path, configfile: Path, cores: int, *args: str):
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(configfile), "--cores", str(cores),
        *args,
    ]  # fmt: skip
    # This checkout's package, not the one the venv's editable install points at.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def demo_trees(workdir: Path, configfile: Path, cores: int) -> dict[str, str]:
    """Generate the demo trees once (as the config asks) and return their absolute paths."""
    shared = workdir / "data"
    shared.mkdir(parents=True, exist_ok=True)
    result = snakemake(shared, configfile, cores, "resources/demo/manifest.csv")
    if result.returncode != 0:
        sys.exit(f"demo generation failed:\n{result.stderr[-3000:]}")
    return {split: str(shared / f"resources/demo/{split}") for split in ("train", "test")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_seed(seed: int, folder: Path, configfile: Path, trees: dict, cores: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    overrides = [
        "data=" + json.dumps(trees), f'split={{"seed": {seed}}}', f'model={{"seed": {seed}}}',
        f'qat={{"seed": {seed}}}', f'convert={{"seed": {seed}}}',
    ]
    started = time.perf_counter()
    result = snakemake(folder, configfile, cores, "--config", *overrides)
    row: dict = {"seed": seed, "folder": str(folder), "seconds": time.perf_counter() - started}
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "n6qat error" in line
                  or "Error in rule" in line]
        logs = sorted((folder / "logs").glob("**/*.log"), key=lambda p: p.stat().st_mtime)
        tail = logs[-1].read_text().strip().splitlines()[-3:] if logs else []
        row["error"] = "; ".join(errors[:2] + tail)[-600:]
        return row
    summary = pd.read_csv(folder / "results/eval/summary.csv").set_index("model")
    for model in MODELS:
        for metric in METRICS:
            row[f"{model}.{metric}"] = float(summary.loc[model, metric])
    qat = json.loads((folder / "results/convert/qat.json").read_text())
    row["qat.simulation_cosine"] = qat["simulation_fidelity"]["cosine"]
    history = pd.read_csv(folder / "results/model/qat_history.csv")
    row["qat.kept_epoch"] = int(history.loc[history["selected"], "epoch"].iloc[0])
    for model in ("ptq", "qat"):
        row[f"sha256.{model}"] = sha256(folder / f"results/model_{model}_int8.tflite")
    return row


def mean_sd(values: list[float], digits: int = 4) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    header = ["seed"] + [f"{MODELS[m]} {METRICS[k]}" for k in METRICS for m in MODELS]
    header += ["QAT ≥ PTQ (top-1)", "sim. cosine", "kept epoch", "minutes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    done = [row for row in rows if "error" not in row]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['seed']} | FAILED: {row['error']} |")
            continue
        cells = [str(row["seed"])]
        for metric in METRICS:
            scale = 100.0 if metric == "file_top1_accuracy" else 1.0
            cells += [f"{scale * row[f'{m}.{metric}']:.{1 if scale > 1 else 3}f}" for m in MODELS]
        ok = row["qat_int8.file_top1_accuracy"] >= row["ptq_int8.file_top1_accuracy"]
        cells += ["yes" if ok else "NO", f"{row['qat.simulation_cosine']:.4f}",
                  str(row["qat.kept_epoch"]), f"{row['seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["mean ± sd"]
    for metric in METRICS:
        scale = 100.0 if metric == "file_top1_accuracy" else 1.0
        for m in MODELS:
            values = [scale * row[f"{m}.{metric}"] for row in done]
            cells.append(mean_sd(values, 1 if scale > 1 else 3))  # as the rows above
    cells += ["", mean_sd([row["qat.simulation_cosine"] for row in done]), "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--configfile", type=Path, default=ROOT / "config/config.yaml")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeat-first", action="store_true",
                        help="run the first seed twice in fresh folders and compare hashes")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="n6qat_seeds_"))
    configfile = args.configfile.resolve()
    print(f"work folder: {workdir}", flush=True)
    trees = demo_trees(workdir, configfile, args.cores)
    plan = [(seed, workdir / f"seed-{seed}") for seed in args.seeds]
    if args.repeat_first:
        plan.insert(1, (args.seeds[0], workdir / f"seed-{args.seeds[0]}-repeat"))
    rows = []
    for seed, folder in plan:
        row = run_seed(seed, folder, configfile, trees, args.cores)
        status = row.get("error") or "  ".join(
            f"{MODELS[m]} {row[f'{m}.file_top1_accuracy']:.4f}" for m in MODELS
        )
        print(f"seed {seed} ({folder.name}, {row['seconds']:.0f} s): {status}", flush=True)
        rows.append(row)
    first, *others = rows
    table = markdown([r for r in rows if not r["folder"].endswith("-repeat")])
    if args.repeat_first and "error" not in first and "error" not in rows[1]:
        same = all(first[f"sha256.{m}"] == rows[1][f"sha256.{m}"] for m in ("ptq", "qat"))
        table += (
            f"\n\nTwo fresh runs of seed {first['seed']}: "
            + ("identical" if same else "DIFFERENT")
            + " sha256 of both .tflite files "
            + f"(ptq {first['sha256.ptq'][:16]}… / {rows[1]['sha256.ptq'][:16]}…, "
            + f"qat {first['sha256.qat'][:16]}… / {rows[1]['sha256.qat'][:16]}…)"
        )
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
