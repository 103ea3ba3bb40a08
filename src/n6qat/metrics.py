"""How closely an approximation (an INT8 model's output) follows a float reference.

The single home of output-agreement metrics: gates, reports and diagnostics call these
so that edge cases (zero vectors, exact copies) mean the same everywhere.
"""

from __future__ import annotations

import math

import numpy as np


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between the flattened arrays, in float64.

    With a zero vector the angle is undefined: 1.0 when both are all zero (they agree),
    0.0 when only one is (the gate semantics of `n6qat.convert`).
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
