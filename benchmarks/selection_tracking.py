"""How well the QAT twin's INT8 simulation tracks the converted TFLite, epoch by epoch.

QAT scores every epoch twice on the validation split (results/model/qat_history.csv):
``val_sim_*`` from the twin in simulated mode, ``val_int8_*`` from the converted TFLite.
For each run folder given (e.g. the seed folders of benchmarks/seeds.py) this prints the
mean absolute gap between the two per metric, how often they rank two epochs the same
way, whether selecting by the simulation would keep the same epoch as selecting by the
TFLite, and how much TFLite score selecting by the simulation would give away.

    python benchmarks/selection_tracking.py /tmp/n6qat_seeds_*/seed-*
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = ("file_top1", "file_cmap")


def kept(history: pd.DataFrame, source: str) -> int:
    """The epoch QAT's selection keeps when scoring with ``source`` (sim or int8)."""
    top1, cmap = f"val_{source}_file_top1", f"val_{source}_file_cmap"
    start = history.iloc[0]
    admitted = history[(history[top1] >= start[top1]) & (history[cmap] >= start[cmap])]
    best = admitted.sort_values([top1, cmap, "epoch"], ascending=[False, False, True])
    return int(best["epoch"].iloc[0])


def pair_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of epoch pairs that both orders rank the same way (ties in either skipped)."""
    same = total = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        if da and db:
            total += 1
            same += da == db
    return same / total if total else float("nan")


def run_row(folder: Path) -> dict:
    history = pd.read_csv(folder / "results/model/qat_history.csv")
    row = {"run": folder.name, "epochs": len(history) - 1}
    for metric in METRICS:
        sim, int8 = history[f"val_sim_{metric}"], history[f"val_int8_{metric}"]
        row[f"{metric} |sim - tflite| (points)"] = 100 * float(np.mean(np.abs(sim - int8)))
        row[f"{metric} same order of epoch pairs"] = pair_agreement(sim.to_numpy(), int8.to_numpy())
    by_sim, by_tflite = kept(history, "sim"), kept(history, "int8")
    scores = history.set_index("epoch")
    row["kept by sim"], row["kept by tflite"] = by_sim, by_tflite
    row["tflite top-1 given away (points)"] = 100 * float(
        scores.loc[by_tflite, "val_int8_file_top1"] - scores.loc[by_sim, "val_int8_file_top1"]
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="finished run folders")
    args = parser.parse_args(argv)
    rows = [run_row(f) for f in args.folders if (f / "results/model/qat_history.csv").is_file()]
    if not rows:
        print("no finished run among the folders", file=sys.stderr)
        return 1
    table = pd.DataFrame(rows).set_index("run").astype(float)
    table.loc["mean"] = table.mean(numeric_only=True)
    print(table.round(3).T.to_markdown() if hasattr(table, "to_markdown") else table.T)
    return 0


if __name__ == "__main__":
    sys.exit(main())
