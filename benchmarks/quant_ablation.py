"""INT8 ablation on finished run folders: PTQ, QAT, distillation, equalization, per-tensor.

For every run folder made by `benchmarks/seeds.py` (one per seed), this takes the run's
features and pretrained model and builds, for per-channel and per-tensor weights:

- PTQ: the pretrained model converted to full INT8;
- QAT: quantization-aware fine-tuning with labels only (`qat.distillation` 0);
- QAT+distill: the same with the frozen FP32 teacher (`qat.distillation`, default 1.0);
- CLE+PTQ and CLE+QAT: cross-layer equalization (`n6qat.equalize`, ReLU6 handled as
  --relu6 says) before PTQ, and before QAT with the teacher.

Everything else is the run's config (its seed, `compute.threads`, the QAT schedule and
checkpoint selection). Each model is scored on the run's held-out test split in file-level
top-1 and cmAP, with TFLite's built-in int8 kernels, as the workflow's evaluation does.
The per-channel PTQ and QAT+distill rows are the workflow's own `model_ptq_int8.tflite` and
`model_qat_int8.tflite` settings; they are recomputed here in process, and
`--check-against-run` compares them with the run's `results/eval/summary.csv`.

Printed (and written to --out): a markdown table, one row per variant and weight mode,
mean ± sd over the seeds, then every seed's numbers. Each (run, variant) result is cached
in `<run>/quant_ablation/<variant>.json`, so an interrupted benchmark resumes.

    python benchmarks/quant_ablation.py /tmp/n6qat_seeds_x/seed-{1,2,3} --out ablation.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from selection_rules import resolved_config  # noqa: E402 (the same seeded config)

VARIANTS = ("PTQ", "QAT", "QAT+distill", "CLE+PTQ", "CLE+QAT")
MODES = {"per-channel": True, "per-tensor": False}
METRICS = {"file_top1": "top-1 %", "file_cmap": "cmAP"}


def seed_of(folder: Path) -> int:
    """The seed of a `benchmarks/seeds.py` run folder (named ``seed-N``)."""
    name = folder.name
    if not name.startswith("seed-") or not name[5:].lstrip("-").isdigit():
        raise SystemExit(f"{folder}: not a seeds.py run folder (seed-N); pass --seed")
    return int(name[5:])


class Run:
    """A finished run folder's inputs, loaded once for all variants."""

    def __init__(self, folder: Path, config: dict):
        from n6qat.convert import calibration_set
        from n6qat.dataset import read_table
        from n6qat.model import read_labels
        from n6qat.train import load_split

        self.folder, self.config = folder, config
        results = folder / "results"
        self.pretrained = results / "model/pretrained.keras"
        self.labels = read_labels(results / "index/labels.txt")
        self.split = {
            name: load_split(results / f"features/{name}.npy",
                             results / f"features/{name}_chunks.csv")
            for name in ("train", "val", "test")
        }  # fmt: skip
        self.upsampled = read_table(results / "index/train_upsampled.csv")
        self.calibration = calibration_set(*self.split["train"], config["convert"])

    def model(self, equalized: bool, relu6: str):
        from n6qat.equalize import equalize_pairs
        from n6qat.model import load_model

        model = load_model(self.pretrained)
        if equalized:
            model, _ = equalize_pairs(model, self.calibration, relu6=relu6)
        return model

    def test_scores(self, scores: np.ndarray) -> dict[str, float]:
        from n6qat.evaluate import validation_metrics

        evaluate = self.config["evaluate"]
        found = validation_metrics(scores, self.split["test"][1], self.labels,
                                   evaluate["pooling"], evaluate["threshold"])  # fmt: skip
        return {"file_top1": 100.0 * found["file_top1"], "file_cmap": float(found["file_cmap"])}

    def qat(self, model, per_channel: bool, distillation: float) -> None:
        """Fine-tune ``model`` in place as the workflow's qat rule does, with these settings."""
        from n6qat.qat import QATSettings, ValidationFiles, run_qat
        from n6qat.train import epoch_batches

        cfg, evaluate = self.config["qat"], self.config["evaluate"]
        settings = QATSettings.from_config(
            {**cfg, "per_channel": per_channel, "distillation": distillation}
        )
        train_batches, val_ds = epoch_batches(
            self.split["train"], self.split["val"], self.upsampled,
            n_classes=len(self.labels), batch_size=settings.batch_size, seed=settings.seed,
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="n6qat_ablation_") as backup:
            run_qat(
                model, train_batches, val_ds, settings, checkpoint_dir=Path(backup),
                calibration=self.calibration,
                selection_files=ValidationFiles(
                    *self.split["val"], self.labels, evaluate["pooling"],
                    evaluate["threshold"], io_dtype=self.config["convert"]["io_dtype"],
                ),
            )  # fmt: skip

    def variant(self, variant: str, per_channel: bool, relu6: str) -> dict[str, float]:
        import keras

        from n6qat.convert import convert_int8
        from n6qat.litert import run_tflite

        keras.utils.set_random_seed(self.config["qat"]["seed"])  # as the qat rule starts
        model = self.model(variant.startswith("CLE"), relu6)
        if variant.endswith("QAT"):  # QAT, CLE+QAT
            self.qat(model, per_channel, self.config["qat"]["distillation"] if
                     variant == "CLE+QAT" else 0.0)  # fmt: skip
        elif variant == "QAT+distill":
            self.qat(model, per_channel, self.config["qat"]["distillation"])
        tflite = convert_int8(model, self.calibration, per_channel,
                              self.config["convert"]["io_dtype"])  # fmt: skip
        return self.test_scores(run_tflite(tflite, np.asarray(self.split["test"][0], np.float32)))

    def fp32(self) -> dict[str, float]:
        model = self.model(False, "skip")
        x = np.asarray(self.split["test"][0], np.float32)
        return self.test_scores(np.asarray(model.predict(x, batch_size=256, verbose=0)))


def cached(folder: Path, key: str, compute) -> dict[str, float]:
    path = folder / "quant_ablation" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    keys = ["FP32"] + [f"{v}, {m}" for m in MODES for v in VARIANTS]
    seeds = sorted(results)
    lines = [
        f"Test split, {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± sd",
        "",
        "| model | " + " | ".join(METRICS.values()) + " | "
        + " | ".join(f"top-1 seed {s}" for s in seeds) + " |",
        "|---" * (1 + len(METRICS) + len(seeds)) + "|",
    ]  # fmt: skip
    for key in keys:
        if not all(key in results[s] for s in seeds):
            continue
        cells = []
        for metric in METRICS:
            values = [results[s][key][metric] for s in seeds]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            digits = 1 if metric == "file_top1" else 3
            cells.append(f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}")
        per_seed = [f"{results[s][key]['file_top1']:.1f}" for s in seeds]
        lines.append(f"| {key} | " + " | ".join(cells + per_seed) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="seeds.py run folders (seed-N)")
    parser.add_argument("--configfile", type=Path, default=ROOT / "config/config.yaml")
    parser.add_argument("--relu6", default="bounded", help="n6qat.equalize ReLU6 mode")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--check-against-run", action="store_true",
                        help="compare per-channel PTQ / QAT+distill with the run's evaluation")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)

    from n6qat.train import configure_runtime

    threads = {resolved_config(args.configfile, seed_of(f))["compute"]["threads"]
               for f in args.folders}  # fmt: skip
    if len(threads) != 1:
        raise SystemExit(f"the runs' compute.threads differ ({sorted(threads)}): run them apart")
    configure_runtime(threads.pop())
    results: dict[int, dict[str, dict[str, float]]] = {}
    for folder in args.folders:
        seed = seed_of(folder)
        run = Run(folder, resolved_config(args.configfile, seed))
        found = results.setdefault(seed, {})
        found["FP32"] = cached(folder, "fp32", run.fp32)
        for mode in args.modes:
            for variant in args.variants:
                key = f"{variant}, {mode}"
                slug = f"{variant}-{mode}-{args.relu6 if 'CLE' in variant else ''}"
                found[key] = cached(
                    folder, slug.replace("+", "_").strip("-"),
                    lambda v=variant, m=mode, r=run: r.variant(v, MODES[m], args.relu6),
                )
                print(f"seed {seed} {key}: {found[key]}", flush=True)
        if args.check_against_run:
            summary = pd.read_csv(folder / "results/eval/summary.csv").set_index("model")
            for name, key in (("fp32", "FP32"), ("ptq_int8", "PTQ, per-channel"),
                              ("qat_int8", "QAT+distill, per-channel")):  # fmt: skip
                if key in found:
                    run_value = 100.0 * float(summary.loc[name, "file_top1_accuracy"])
                    print(f"seed {seed} {key}: here {found[key]['file_top1']:.2f}, "
                          f"the run's evaluation {run_value:.2f}")
    text = table(results)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
