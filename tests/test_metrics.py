"""The one set of output-agreement metrics (n6qat.metrics): hand-computed cases and edge cases."""

import math

import numpy as np
import pytest

from n6qat.errors import N6QATError
from n6qat.metrics import (
    agreement,
    cosine_similarity,
    pearson_r,
    relative_l2_error,
    sqnr_db,
    stedgeai_metrics,
)


def test_cosine_of_zero_vectors_follows_one_convention():
    zero, one = np.zeros(3), np.ones(3)
    assert cosine_similarity(zero, zero) == 1.0  # both silent: they agree
    assert cosine_similarity(zero, one) == 0.0
    assert cosine_similarity(one, zero) == 0.0
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 0.0
    assert cosine_similarity(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(1.0)


def test_every_caller_sees_the_same_cosine():
    ref = np.array([[0.0, 0.0], [0.0, 0.0]])
    out = np.array([[0.0, 0.0], [0.1, 0.0]])
    assert agreement(ref, out)["cosine"] == stedgeai_metrics(ref, out)["cos"] == 0.0
    assert agreement(ref, ref)["cosine"] == stedgeai_metrics(ref, ref)["cos"] == 1.0


def test_undefined_ratios():
    zero = np.zeros((2, 2))
    assert math.isnan(relative_l2_error(zero, np.ones((2, 2))))
    assert math.isnan(pearson_r(np.ones(4), np.arange(4.0)))
    table = stedgeai_metrics(zero, np.ones((2, 2)))
    assert table["l2r"] is None and table["nse"] is None


def test_agreement_hand_computed():
    ref = np.array([[0.9, 0.1], [0.2, 0.8]])
    out = np.array([[0.7, 0.3], [0.6, 0.4]])
    found = agreement(ref, out)
    assert found["top1_agreement"] == 0.5
    assert found["max_abs_error"] == pytest.approx(0.4)
    assert found["mae"] == pytest.approx(0.3)
    assert found["l2r"] == pytest.approx(math.sqrt(0.4) / math.sqrt(1.5))


def test_shapes_must_match():
    with pytest.raises(N6QATError, match="shapes"):
        agreement(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(N6QATError, match="N >= 1"):
        agreement(np.zeros((0, 2)), np.zeros((0, 2)))


def test_sqnr_hand_computed():
    # ||w||^2 = 25, ||w - q||^2 = 0.25: 10 log10(100) = 20 dB
    assert sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 3.5])) == pytest.approx(20.0)
    assert sqnr_db(np.array([1.0, -1.0]), np.array([1.0, -1.0])) == math.inf
    assert sqnr_db(np.zeros(2), np.ones(2)) == -math.inf
    # uniform weights on [-1, 1], int8 step 1/127: signal 1/3, noise step^2 / 12,
    # so SQNR = 10 log10(4 * 127^2) = 48.1 dB
    w = np.random.default_rng(0).uniform(-1, 1, 100_000)
    scale = np.abs(w).max() / 127
    assert sqnr_db(w, np.round(w / scale) * scale) == pytest.approx(20 * math.log10(254), abs=0.1)
