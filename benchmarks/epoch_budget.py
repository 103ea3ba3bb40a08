"""Which smaller epoch budgets would have kept the same epochs, replayed on finished runs.

For every run folder (e.g. the seed folders of `benchmarks/seeds.py`), the recorded
histories are replayed through the workflow's own selection and early-stopping rules
(`n6qat.fit`) with smaller budgets:

- QAT, `qat.epochs` = 1 ... the run's: QAT trains at a constant learning rate, so its
  first N epochs do not depend on the budget. Where the replay keeps the run's epoch,
  that budget gives the same weights and the same INT8 model bit for bit.
- pretraining, `model.patience` = 1 ... the run's (same `min_epochs`): the learning-rate
  schedule spans `model.epochs`, not the epochs run, so again the first epochs are the
  same and an equal kept epoch means the same model. (`model.epochs` itself changes the
  schedule and cannot be replayed.)

Printed per budget: in how many runs the kept epoch is the run's, and the median seconds
it would save (the epochs not run, at the run's own logged epoch and scoring times).

    python benchmarks/epoch_budget.py /tmp/seeds/seed-*

Reads only; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # n6qat.qat imports TensorFlow

from n6qat.config import schema_defaults  # noqa: E402
from n6qat.fit import Selection, replay  # noqa: E402
from n6qat.qat import QATSettings, _selection  # noqa: E402

EPOCH_LINE = re.compile(r"epoch (\d+) of \d+ \(([\d.]+) s(?:, scoring ([\d.]+) s)?\)")


def epoch_seconds(log: Path) -> dict[int, float]:
    """Epoch -> logged seconds (training plus INT8 scoring)."""
    found = {}
    for match in EPOCH_LINE.finditer(log.read_text() if log.exists() else ""):
        found[int(match[1])] = float(match[2]) + float(match[3] or 0.0)
    return found


def history(csv: Path) -> list[dict]:
    frame = pd.read_csv(csv).drop(columns=["selected"], errors="ignore")
    return [{k: v for k, v in row.items() if pd.notna(v)} for row in frame.to_dict("records")]


def config_of(folder: Path) -> dict:
    """The run's model and qat sections: schema defaults under the folder's config/config.yaml
    (a seeds.py folder has none: this checkout's). Seed overrides change no budget."""
    path = folder / "config/config.yaml"
    if not path.exists():
        path = ROOT / "config/config.yaml"
    cfg = yaml.safe_load(path.read_text()) or {}
    return {section: {**schema_defaults(section), **(cfg.get(section) or {})}
            for section in ("model", "qat")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finished run folders")
    args = parser.parse_args(argv)

    qat_rows, pretrain_rows = [], []
    for folder in args.folders:
        cfg = config_of(folder)
        model_dir = folder / "results/model"
        qat_history = history(model_dir / "qat_history.csv")
        settings = QATSettings.from_config(cfg["qat"])
        selection = _selection(settings, scored="val_int8_file_top1" in qat_history[0] or
                               "val_sim_file_top1" in qat_history[0], validated=True)
        ran = max(h["epoch"] for h in qat_history)
        kept, _ = replay(qat_history, selection, ran)
        seconds = epoch_seconds(folder / "logs/qat.log")
        for budget in range(1, ran + 1):
            budget_kept, _ = replay(qat_history, selection, budget)
            saved = sum(s for e, s in seconds.items() if e > budget)
            qat_rows.append((folder.name, budget, budget_kept == kept, saved, kept))
        fp32 = history(model_dir / "pretrain_history.csv")
        patience, min_epochs = cfg["model"]["patience"], cfg["model"]["min_epochs"]
        base = Selection("val_loss", "min", patience=patience, min_epochs=min_epochs)
        kept, run_to = replay(fp32, base, cfg["model"]["epochs"])
        seconds = epoch_seconds(folder / "logs/pretrain.log")
        for p in range(1, patience + 1):
            shorter = Selection("val_loss", "min", patience=p, min_epochs=min_epochs)
            p_kept, p_run = replay(fp32, shorter, cfg["model"]["epochs"])
            saved = sum(s for e, s in seconds.items() if p_run < e <= run_to)
            pretrain_rows.append((folder.name, p, p_kept == kept, saved, kept))

    for title, rows, knob in (("QAT", qat_rows, "qat.epochs"),
                              ("pretraining", pretrain_rows, "model.patience")):
        frame = pd.DataFrame(rows, columns=["run", "budget", "same", "saved", "kept"])
        kept = ", ".join(f"{r}: {k}" for r, k in frame.groupby("run")["kept"].first().items())
        print(f"\n{title}: kept epoch per run ({kept})\n")
        print(f"| {knob} | runs keeping the same epoch | median seconds saved |")
        print("|---|---|---|")
        for budget, group in frame.groupby("budget"):
            print(f"| {budget} | {int(group['same'].sum())} of {len(group)} | "
                  f"{statistics.median(group['saved']):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
