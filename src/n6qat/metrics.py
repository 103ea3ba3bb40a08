"""How closely an approximation (an INT8 model's output) follows a float reference.

The single home of output-agreement metrics: gates, reports and diagnostics call these
so that edge cases (zero vectors, exact copies) mean the same everywhere. One convention
for zero vectors: their cosine is 1.0 when both are all zero and 0.0 when only one is;
a ratio over a zero norm (the relative L2 error, Pearson's r) is undefined, nan (None in
`stedgeai_metrics`, whose table prints it as "n.a.").
"""

from __future__ import annotations

import math

import numpy as np

from n6qat.errors import N6QATError

# The columns of `stedgeai validate`'s evaluation table, in its order.
METRIC_NAMES = ("acc", "rmse", "mae", "l2r", "mean", "std", "nse", "cos")


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between the flattened arrays, in float64.

    With a zero vector the angle is undefined: 1.0 when both are all zero (they agree),
    0.0 when only one is (the gate's semantics, and the host check's `cos`).
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"cosine_similarity needs arrays of one size, got {x.size} and {y.size}")
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 or ny == 0.0:
        return 1.0 if nx == ny else 0.0
    return float(np.dot(x, y) / (nx * ny))


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖ref‖² / ‖ref − approx‖²) in dB.

    inf when the approximation is exact; -inf when the reference is zero but the
    approximation is not (all noise, no signal).
    """
    ref = np.asarray(reference, dtype=np.float64).ravel()
    approx = np.asarray(approximation, dtype=np.float64).ravel()
    if ref.shape != approx.shape:
        raise ValueError(f"sqnr_db needs arrays of one size, got {ref.size} and {approx.size}")
    noise = float(np.sum((ref - approx) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def relative_l2_error(reference: np.ndarray, test: np.ndarray) -> float:
    """||test - reference|| / ||reference|| (ST's l2r) in float64; nan for a zero reference."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    ref_norm = float(np.linalg.norm(ref))
    return float(np.linalg.norm(out - ref) / ref_norm) if ref_norm > 0 else float("nan")


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the flattened arrays in float64; nan when either is constant."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    dx, dy = x - x.mean(), y - y.mean()
    denominator = float(np.linalg.norm(dx) * np.linalg.norm(dy))
    return float(np.dot(dx, dy) / denominator) if denominator > 0 else float("nan")


def agreement(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """How closely `test` (e.g. the INT8 model) follows `reference` (the Keras model).

    cosine: over the flattened arrays (the gate value); cosine_per_sample_mean: mean of
    per-sample cosines; rmse, mae, max_abs_error; l2r: `relative_l2_error`; pearson_r over
    the flattened arrays; top1_agreement: share of samples whose argmax on the last axis
    matches (with one output unit: the > 0.5 decision). Zero vectors: see the module.
    """
    ref, out = _compared(reference, test)
    diff = out - ref
    rows = zip(ref.reshape(len(ref), -1), out.reshape(len(out), -1), strict=True)
    per_sample = [cosine_similarity(a, b) for a, b in rows]
    return {
        "cosine": cosine_similarity(ref, out),
        "cosine_per_sample_mean": float(np.mean(per_sample)),
        **_rmse_mae(diff),
        "max_abs_error": float(np.max(np.abs(diff))),
        "l2r": relative_l2_error(ref, out),
        "pearson_r": pearson_r(ref, out),
        "top1_agreement": _top1_share(ref, out),
    }


def stedgeai_metrics(reference: np.ndarray, test: np.ndarray) -> dict[str, float | None]:
    """The columns of `stedgeai validate`'s table (METRIC_NAMES), error = test - reference.

    acc: share (percent) of samples whose argmax on the last axis agrees, None with one
    output unit; rmse, mae; l2r = ||error|| / ||reference||; mean and std of the error;
    nse = 1 - sum(error^2) / sum((reference - mean(reference))^2); cos over the flattened
    arrays (`cosine_similarity`). Undefined ratios (a zero or constant reference) are None.
    """
    ref, out = _compared(reference, test)
    err = out - ref
    spread = float(np.sum((ref - ref.mean()) ** 2))
    many_units = ref.ndim > 1 and ref.shape[-1] > 1
    return {
        "acc": 100.0 * _top1_share(ref, out) if many_units else None,
        **_rmse_mae(err),
        "l2r": relative_l2_error(ref, out) if float(np.linalg.norm(ref)) > 0 else None,
        "mean": float(np.mean(err)),
        "std": float(np.std(err)),
        "nse": 1.0 - float(np.sum(err**2)) / spread if spread > 0 else None,
        "cos": cosine_similarity(ref, out),
    }


def _compared(reference: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays in float64, checked to share one (N, ...) shape with N >= 1."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape:
        raise N6QATError(f"cannot compare outputs of shapes {ref.shape} and {out.shape}")
    if ref.ndim == 0 or ref.size == 0:
        raise N6QATError(f"cannot compare outputs of shape {ref.shape}; need (N, ...) with N >= 1")
    return ref, out


def _rmse_mae(error: np.ndarray) -> dict[str, float]:
    return {"rmse": float(np.sqrt(np.mean(error**2))), "mae": float(np.mean(np.abs(error)))}


def _top1_share(ref: np.ndarray, out: np.ndarray) -> float:
    """Share of samples whose argmax on the last axis agrees (one unit: the > 0.5 decision)."""
    if ref.shape[-1] == 1:
        same = (ref[..., 0] > 0.5) == (out[..., 0] > 0.5)
    else:
        same = np.argmax(ref, axis=-1) == np.argmax(out, axis=-1)
    return float(np.mean(same))
