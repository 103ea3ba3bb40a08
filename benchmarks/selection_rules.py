"""Which QAT checkpoint rule keeps an epoch that is good on the test split, not just on val.

For each finished run folder (e.g. the seed folders of benchmarks/seeds.py) this reruns
the QAT rule in process, with the folder's inputs and the same settings (the run is
deterministic, so the history is the rule's; this is checked), and scores every epoch's
converted TFLite, epoch 0 (the PTQ model) included, on the validation split *and* on the
test split. It then applies each candidate selection rule to the validation columns
only and prints what the kept epoch scores on test, against epoch 0 (PTQ-INT8):

    python benchmarks/selection_rules.py /tmp/n6qat_seeds_*/seed-*

The seed of a folder comes from its name (``seed-<N>``, as benchmarks/seeds.py names
them) or from --seed. Per-epoch scores are written to ``<folder>/selection_epochs.csv``
(inside the run folder, not the repository), and reused on a second call.

The test split only judges the rules; a rule is worth adopting only if it also holds on
seeds that were not used to choose it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def resolved_config(configfile: Path, seed: int) -> dict:
    """The config as the workflow sees it: file + seed overrides + schema defaults."""
    from snakemake.utils import validate

    from n6qat.config import coerce_config

    schema = ROOT / "workflow/schemas/config.schema.yaml"
    config = yaml.safe_load(configfile.read_text()) or {}
    for section in ("split", "model", "qat", "convert"):
        config.setdefault(section, {})["seed"] = seed
    coerce_config(config, schema)
    validate(config, schema=str(schema))
    return config


def bce(scores: np.ndarray, chunks: pd.DataFrame, n_classes: int) -> float:
    """Mean chunk-level binary cross-entropy against the labels (a smooth score)."""
    from n6qat.train import multi_hot

    targets = multi_hot(chunks["label_index"], n_classes)
    p = np.clip(scores, 1e-6, 1 - 1e-6)
    return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


def epoch_scores(folder: Path, config: dict) -> pd.DataFrame:
    """Rerun QAT in ``folder``'s inputs; one row per epoch with val_* and test_* INT8 scores."""
    import n6qat.convert as convert
    import n6qat.qat as qat
    from n6qat.convert import calibration_set
    from n6qat.dataset import read_table
    from n6qat.evaluate import validation_metrics
    from n6qat.litert import run_tflite
    from n6qat.model import load_model, read_labels
    from n6qat.train import configure_runtime, epoch_batches, load_split

    cfg, evaluate = config["qat"], config["evaluate"]
    configure_runtime(config["compute"]["threads"], cfg["seed"])
    settings = qat.QATSettings.from_config({**cfg, "select_with": "tflite"})
    results = folder / "results"
    labels = read_labels(results / "index/labels.txt")
    model = load_model(results / "model/pretrained.keras")
    split = {
        name: load_split(results / f"features/{name}.npy", results / f"features/{name}_chunks.csv")
        for name in ("train", "val", "test")
    }
    train_batches, val_ds = epoch_batches(
        split["train"], split["val"], read_table(results / "index/train_upsampled.csv"),
        n_classes=len(labels), batch_size=settings.batch_size, seed=settings.seed,
    )  # fmt: skip
    test_x = np.asarray(split["test"][0], dtype=np.float32)
    val_x = np.asarray(split["val"][0], dtype=np.float32)
    fp32_val = model.predict(val_x, batch_size=256, verbose=0)

    last = {}
    original_convert = convert.convert_int8

    def remembering_convert(*args, **kwargs):
        last["tflite"] = original_convert(*args, **kwargs)
        return last["tflite"]

    original_scorer = qat._int8_scorer

    def watching_scorer(model_, settings_, calibration, files):
        inner = original_scorer(model_, settings_, calibration, files)

        def score():
            logs = inner()
            tflite = last["tflite"]
            val_scores = run_tflite(tflite, val_x)
            logs["val_int8_bce"] = bce(val_scores, split["val"][1], len(labels))
            logs["val_int8_fp32_agreement"] = float(
                np.mean(val_scores.argmax(1) == fp32_val.argmax(1))
            )
            test_scores = run_tflite(tflite, test_x)
            found = validation_metrics(test_scores, split["test"][1], labels,
                                       evaluate["pooling"], evaluate["threshold"])
            logs.update({f"test_int8_{key}": value for key, value in found.items()})
            return logs

        return score

    convert.convert_int8, qat._int8_scorer = remembering_convert, watching_scorer
    try:
        with tempfile.TemporaryDirectory(prefix="n6qat_selection_") as backup:
            result = qat.run_qat(
                model, train_batches, val_ds, settings, checkpoint_dir=Path(backup),
                calibration=calibration_set(*split["train"], config["convert"]),
                selection_files=qat.ValidationFiles(
                    split["val"][0], split["val"][1], labels, evaluate["pooling"],
                    evaluate["threshold"], io_dtype=config["convert"]["io_dtype"],
                ),
            )  # fmt: skip
    finally:
        convert.convert_int8, qat._int8_scorer = original_convert, original_scorer
    return result.table().reset_index()


def guarded(history: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    start = history.iloc[0]
    keep = np.ones(len(history), dtype=bool)
    for column in columns:
        keep &= history[column].to_numpy() >= start[column]
    return history[keep]


def best(frame: pd.DataFrame, keys: list[str], ascending: list[bool]) -> int:
    order = frame.sort_values(keys + ["epoch"], ascending=ascending + [True])
    return int(order["epoch"].iloc[0])


TOP1, CMAP = "val_int8_file_top1", "val_int8_file_cmap"


def rule_current(h: pd.DataFrame) -> int:
    """Today's rule: best val top-1 (cmAP breaks ties) among epochs losing neither to epoch 0
    and beating its top-1 (by at least one validation file)."""
    return rule_margin(1)(h)


def rule_guard_only(h: pd.DataFrame) -> int:
    """The earlier rule: a tie with epoch 0 on top-1 may replace it (by a better cmAP)."""
    return best(guarded(h, (TOP1, CMAP)), [TOP1, CMAP], [False, False])


def rule_margin(files: int):
    def rule(h: pd.DataFrame) -> int:
        one_file = 1.0 / float(h["val_int8_files"].iloc[0])
        start = h.iloc[0]
        admitted = guarded(h, (TOP1, CMAP))
        admitted = admitted[(admitted[TOP1] >= start[TOP1] + files * one_file - 1e-9)
                            | (admitted["epoch"] == 0)]
        return best(admitted, [TOP1, CMAP], [False, False])

    rule.__doc__ = f"today's rule, but an epoch must beat epoch 0 by >= {files} val files"
    return rule


def rule_bce(h: pd.DataFrame) -> int:
    """Lowest INT8 val BCE among epochs losing neither top-1 nor cmAP to epoch 0."""
    return best(guarded(h, (TOP1, CMAP)), ["val_int8_bce"], [True])


def rule_cmap(h: pd.DataFrame) -> int:
    """Best val cmAP (top-1 breaks ties) among epochs losing neither to epoch 0."""
    return best(guarded(h, (TOP1, CMAP)), [CMAP, TOP1], [False, False])


def rule_agreement(h: pd.DataFrame) -> int:
    """Best chunk top-1 agreement with FP32 on val, among epochs losing neither to epoch 0."""
    return best(guarded(h, (TOP1, CMAP)), ["val_int8_fp32_agreement", TOP1], [False, False])


def rule_sum(h: pd.DataFrame) -> int:
    """Best top-1 + cmAP, among epochs losing neither to epoch 0."""
    frame = guarded(h, (TOP1, CMAP)).assign(total=lambda f: f[TOP1] + f[CMAP])
    return best(frame, ["total"], [False])


def rule_last(h: pd.DataFrame) -> int:
    """The last epoch."""
    return int(h["epoch"].max())


RULES = {
    "current (top-1, cmAP ties, beat epoch 0)": rule_current,
    "earlier (ties with epoch 0 may win)": rule_guard_only,
    "margin 2 files": rule_margin(2),
    "margin 3 files": rule_margin(3),
    "cmAP first": rule_cmap,
    "top-1 + cmAP": rule_sum,
    "lowest INT8 BCE": rule_bce,
    "FP32 agreement": rule_agreement,
    "last epoch": rule_last,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--configfile", type=Path, default=ROOT / "config/config.yaml")
    parser.add_argument("--seed", type=int, default=None, help="seed of every folder")
    args = parser.parse_args(argv)
    rows = []
    for folder in args.folders:
        cache = folder / "selection_epochs.csv"
        if cache.is_file():
            history = pd.read_csv(cache)
        else:
            found = re.search(r"seed-(\d+)", folder.name)
            if args.seed is None and not found:
                sys.exit(f"{folder}: no seed in the name; pass --seed")
            seed = args.seed if args.seed is not None else int(found.group(1))
            history = epoch_scores(folder, resolved_config(args.configfile, seed))
            history.to_csv(cache, index=False)
        rule_history = folder / "results/model/qat_history.csv"
        if rule_history.is_file():
            ours = pd.read_csv(rule_history)
            same = np.allclose(ours[TOP1], history[TOP1]) and np.allclose(
                ours["loss"].fillna(0), history["loss"].fillna(0))
            if not same:
                print(f"WARNING {folder.name}: the rerun's history differs from the rule's")
        start = history.iloc[0]
        for name, rule in RULES.items():
            epoch = rule(history)
            kept = history.set_index("epoch").loc[epoch]
            rows.append({
                "run": folder.name, "rule": name, "epoch": epoch,
                "val top-1 gain": 100 * (kept[TOP1] - start[TOP1]),
                "test top-1 vs PTQ": 100 * (kept["test_int8_file_top1"]
                                            - start["test_int8_file_top1"]),
                "test cmAP vs PTQ": kept["test_int8_file_cmap"] - start["test_int8_file_cmap"],
            })  # fmt: skip
        print(f"{folder.name}: epochs 0-{int(history['epoch'].max())}, PTQ test top-1 "
              f"{100 * start['test_int8_file_top1']:.1f}", flush=True)
    table = pd.DataFrame(rows)
    per_seed = table.pivot(index="rule", columns="run", values="test top-1 vs PTQ")
    summary = table.groupby("rule").agg(
        mean_top1_vs_ptq=("test top-1 vs PTQ", "mean"),
        worst_top1_vs_ptq=("test top-1 vs PTQ", "min"),
        mean_cmap_vs_ptq=("test cmAP vs PTQ", "mean"),
    )
    print("\ntest file top-1 of the kept epoch minus PTQ-INT8's (points), per run:")
    print(per_seed.loc[list(RULES)].round(2).to_markdown())
    print("\nover the runs:")
    print(summary.loc[list(RULES)].round(3).to_markdown())
    print("\nkept epoch per run:")
    print(table.pivot(index="rule", columns="run", values="epoch").loc[list(RULES)].to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
