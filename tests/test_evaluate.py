"""Metric functions against hand-computed cases and against scikit-learn."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from n6qat.evaluate import (
    average_precision,
    confusion,
    f1,
    pool_files,
    roc_auc,
    summary_metrics,
    top1_accuracy,
)


def test_hand_computed_cases():
    # AP: positives at ranks 1 and 3 of 4 -> (1/1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == (
        pytest.approx((1 + 2 / 3) / 2)
    )
    # AUC: 3 of the 4 positive/negative pairs are ordered right
    assert roc_auc(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5  # a tie counts half
    assert f1(np.array([True, True, False]), np.array([1, 0, 1])) == pytest.approx(0.5)
    scores = np.array([[0.9, 0.1], [0.2, 0.6], [0.7, 0.8], [0.1, 0.2]])
    labels = np.array([0, 1, 0, -1])
    assert top1_accuracy(scores, labels) == pytest.approx(2 / 3)  # the negative is not counted


def test_against_sklearn():
    rng = np.random.default_rng(3)
    n, c = 300, 5
    labels = rng.integers(-1, c, n)
    scores = rng.random((n, c))
    scores[np.arange(n)[labels >= 0], labels[labels >= 0]] += 0.4
    scores = np.round(scores, 2)  # ties, as sigmoid outputs of an INT8 model have
    targets = np.zeros((n, c), dtype=int)
    targets[np.arange(n)[labels >= 0], labels[labels >= 0]] = 1
    for k in range(c):
        assert average_precision(scores[:, k], targets[:, k]) == pytest.approx(
            average_precision_score(targets[:, k], scores[:, k])
        )
        assert roc_auc(scores[:, k], targets[:, k]) == pytest.approx(
            roc_auc_score(targets[:, k], scores[:, k])
        )
    m = summary_metrics(scores, labels, [f"c{k}" for k in range(c)], threshold=0.8)
    assert m["macro_roc_auc"] == pytest.approx(roc_auc_score(targets, scores, average="macro"))
    assert m["cmap"] == pytest.approx(average_precision_score(targets, scores, average="macro"))
    assert m["macro_f1"] == pytest.approx(
        f1_score(targets, (scores >= 0.8).astype(int), average="macro", zero_division=0)
    )


def test_pooling_and_confusion():
    chunks = pd.DataFrame({
        "source": ["test"] * 5, "path": ["a", "a", "b", "c", "c"],
        "label_index": [0, 0, 1, -1, -1],
    })
    scores = np.array([[0.2, 0.1], [0.8, 0.1], [0.3, 0.9], [0.1, 0.2], [0.3, 0.1]])
    mean, labels, paths = pool_files(scores, chunks, "mean")
    assert paths == ["test/a", "test/b", "test/c"] and list(labels) == [0, 1, -1]
    np.testing.assert_allclose(mean[0], [0.5, 0.1])
    top, _, _ = pool_files(scores, chunks, "max")
    np.testing.assert_allclose(top[0], [0.8, 0.1])
    soft, _, _ = pool_files(scores, chunks, "lme")
    assert mean[0, 0] < soft[0, 0] < top[0, 0]
    table = confusion(mean, labels, ["x", "y"])
    assert table.loc["x", "x"] == 1 and table.loc["y", "y"] == 1
    assert table.loc["(none)", "(none)"] == 1
