"""Test-split metrics for sigmoid classifiers whose negatives (noise folders) have no label.

Targets are multi-hot rows; a negative chunk or file is an all-zero row (label index -1).
Top-1 accuracy is over the labelled samples; ROC-AUC and average precision are per class
over all samples, negatives included, so false alarms on noise count against a model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from n6qat.names import LONG_NAMES
from n6qat.train import multi_hot

POOLINGS = ("mean", "max", "lme")
NONE_LABEL = "(none)"


def pool_files(
    scores: np.ndarray, chunks: pd.DataFrame, method: str = "mean", sharpness: float = 5.0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """File-level scores from a file's chunk scores; returns (scores, label_index, paths).

    ``lme`` is log-mean-exp, a soft maximum: ``log(mean(exp(s * x))) / s``.
    """
    if method not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {method!r}")
    keys = chunks["source"].astype(str) + "/" + chunks["path"].astype(str)
    codes, paths = pd.factorize(keys, sort=True)
    pooled = np.zeros((len(paths), scores.shape[1]), dtype=np.float64)
    for i in range(len(paths)):
        block = scores[codes == i].astype(np.float64)
        if method == "mean":
            pooled[i] = block.mean(axis=0)
        elif method == "max":
            pooled[i] = block.max(axis=0)
        else:
            top = block.max(axis=0)
            pooled[i] = top + np.log(np.mean(np.exp(sharpness * (block - top)), axis=0)) / sharpness
    labels = chunks.groupby(codes)["label_index"].first().to_numpy()
    return pooled, labels, list(paths)


def top1_accuracy(scores: np.ndarray, label_index: np.ndarray) -> float:
    """Share of labelled samples whose highest score is their class."""
    pos = label_index >= 0
    return float(np.mean(np.argmax(scores[pos], axis=1) == label_index[pos]))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall step curve (sklearn's definition); NaN without positives."""
    if targets.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(t)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / t.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half); NaN if one-sided."""
    pos, neg = scores[targets == 1], scores[targets == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = pd.Series(np.r_[pos, neg]).rank(method="average").to_numpy()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def f1(predicted: np.ndarray, targets: np.ndarray) -> float:
    tp = float(np.sum(predicted & (targets == 1)))
    fp = float(np.sum(predicted & (targets == 0)))
    fn = float(np.sum(~predicted & (targets == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def per_class_metrics(
    scores: np.ndarray, label_index: np.ndarray, labels: list[str], threshold: float = 0.5
) -> pd.DataFrame:
    """AP, ROC-AUC and F1 (at ``threshold``) of every class, one row each."""
    targets = multi_hot(label_index, len(labels))
    rows = []
    for c, name in enumerate(labels):
        rows.append({
            "label": name,
            "support": int(targets[:, c].sum()),
            "ap": average_precision(scores[:, c], targets[:, c]),
            "roc_auc": roc_auc(scores[:, c], targets[:, c]),
            "f1": f1(scores[:, c] >= threshold, targets[:, c]),
        })
    return pd.DataFrame(rows)


def summary_metrics(
    scores: np.ndarray, label_index: np.ndarray, labels: list[str], threshold: float = 0.5
) -> dict[str, float]:
    """Top-1 accuracy, macro F1, macro ROC-AUC and cmAP (mean AP over classes)."""
    per_class = per_class_metrics(scores, label_index, labels, threshold)
    return {
        "top1_accuracy": top1_accuracy(scores, label_index),
        "macro_f1": float(per_class["f1"].mean()),
        "macro_roc_auc": float(per_class["roc_auc"].mean(skipna=True)),
        "cmap": float(per_class["ap"].mean(skipna=True)),
    }


def validation_metrics(
    scores: np.ndarray,
    chunks: pd.DataFrame,
    labels: list[str],
    pooling: str = "mean",
    threshold: float = 0.5,
    prefix: str = "",
) -> dict[str, float]:
    """What a user reads of one model's chunk scores: file-level top-1, macro F1, cmAP.

    Also the chunk-level top-1 and the number of files; used to choose the QAT epoch and
    to gate the INT8 models on the validation split. ``prefix`` goes before every key
    (QAT's history: ``val_int8_``, ``val_sim_``).
    """
    file_scores, file_labels, _ = pool_files(scores, chunks, pooling)
    files = summary_metrics(file_scores, file_labels, labels, threshold)
    found = {
        "file_top1": files["top1_accuracy"],
        "file_macro_f1": files["macro_f1"],
        "file_cmap": files["cmap"],
        "chunk_top1": top1_accuracy(scores, chunks["label_index"].to_numpy()),
        "files": float(len(file_labels)),
    }
    return {f"{prefix}{key}": value for key, value in found.items()}


def confusion(
    scores: np.ndarray, label_index: np.ndarray, labels: list[str], threshold: float = 0.5
) -> pd.DataFrame:
    """Counts of true class (rows) against predicted class (columns).

    The prediction is the top class, or ``(none)`` when no score reaches ``threshold``;
    negatives are the ``(none)`` row.
    """
    names = [*labels, NONE_LABEL]
    none = len(labels)
    truth = np.where(label_index >= 0, label_index, none)
    pred = np.where(scores.max(axis=1) >= threshold, scores.argmax(axis=1), none)
    counts = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(counts, (truth, pred), 1)
    return pd.DataFrame(counts, index=pd.Index(names, name="true"), columns=names)


def predict(model_path: str, x: np.ndarray) -> np.ndarray:
    """Chunk scores of a ``.keras`` model (Keras) or a ``.tflite`` model (LiteRT)."""
    if str(model_path).endswith(".tflite"):
        from n6qat.litert import run_tflite

        return run_tflite(model_path, x)
    from n6qat.model import load_model
    from n6qat.model import predict as keras_predict

    return keras_predict(load_model(model_path), x, batch_size=64)


def host_latency_ms(tflite_path: str, x: np.ndarray, runs: int, num_threads: int = 1) -> dict:
    """Per-chunk host inference time of a TFLite model: median and p95 in milliseconds."""
    import time

    from n6qat.litert import load_interpreter

    interpreter = load_interpreter(tflite_path, num_threads)  # the kernels that score it
    detail = interpreter.get_input_details()[0]
    times = []
    for i in range(runs + 3):
        sample = x[i % len(x)][None].astype(detail["dtype"])
        interpreter.set_tensor(detail["index"], sample)
        start = time.perf_counter()
        interpreter.invoke()
        if i >= 3:  # warm-up
            times.append((time.perf_counter() - start) * 1000.0)
    return {
        "host_latency_ms_median": float(np.median(times)),
        "host_latency_ms_p95": float(np.percentile(times, 95)),
    }


def evaluate_scores(
    scores: dict[str, np.ndarray],
    chunks: pd.DataFrame,
    labels: list[str],
    pooling: str = "mean",
    threshold: float = 0.5,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """Summary (one row per model, file and chunk level), per-class table, confusions."""
    rows, per_class, confusions = [], [], {}
    chunk_labels = chunks["label_index"].to_numpy()
    for name, chunk_scores in scores.items():
        file_scores, file_labels, _ = pool_files(chunk_scores, chunks, pooling)
        row = {"model": name, "description": LONG_NAMES.get(name, name)}
        row.update({f"file_{k}": v for k, v in
                    summary_metrics(file_scores, file_labels, labels, threshold).items()})
        row.update({f"chunk_{k}": v for k, v in
                    summary_metrics(chunk_scores, chunk_labels, labels, threshold).items()})
        row["files"] = len(file_labels)
        row["chunks"] = len(chunk_labels)
        rows.append(row)
        table = per_class_metrics(file_scores, file_labels, labels, threshold)
        per_class.append(table.assign(model=name))
        confusions[name] = confusion(file_scores, file_labels, labels, threshold)
    return pd.DataFrame(rows), pd.concat(per_class, ignore_index=True), confusions


def save_scores(path: str, scores: np.ndarray, **extra: float) -> None:
    """Chunk scores (and scalars such as latencies) as ``.npz``, written atomically."""
    from n6qat.atomic import atomic_path

    with atomic_path(path) as tmp:
        np.savez(tmp, scores=scores, **extra)
