"""The one training loop: reproducible epochs, backups, the best epoch kept across a kill."""

import json
import math
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from keras import layers as L  # noqa: E402

from n6qat import fit  # noqa: E402
from n6qat.errors import N6QATError  # noqa: E402


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), name="x")
    x = L.Dense(8, activation="relu", name="hidden")(inputs)
    x = L.Dropout(0.5, name="dropout")(x)
    outputs = L.Dense(2, activation="sigmoid", name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    return model


def _batches(seed: int = 0, n: int = 40) -> fit.EpochBatches:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 6)).astype(np.float16)
    y = (rng.uniform(size=(n, 2)) < 0.5).astype(np.float32)
    rows = np.r_[np.arange(n), np.arange(5)]  # the first five rows upsampled
    return fit.EpochBatches(x, y, rows, batch_size=8, seed=seed)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = _batches(1), _batches(1)
    np.testing.assert_array_equal(a.order(3), b.order(3))
    assert not np.array_equal(a.order(3), a.order(4))
    assert not np.array_equal(a.order(3), _batches(2).order(3))
    assert sorted(a.order(0)) == sorted(a.index)  # a permutation of every (repeated) row
    assert len(a) == 45 and int(a.x.shape[0]) == 40  # distinct rows converted once
    ordered = fit.EpochBatches(np.zeros((4, 1)), np.zeros((4, 1)), np.arange(4), 2, 0, False)
    np.testing.assert_array_equal(ordered.order(5), np.arange(4))
    x, _ = next(iter(a.dataset(0)))
    assert x.dtype.name == "float32" and tuple(x.shape) == (8, 6)


def test_an_epoch_dataset_yields_its_order_through_a_fixed_pipeline():
    a = _batches(3)
    batches = list(a.dataset(2))
    np.testing.assert_array_equal(
        np.concatenate([x.numpy() for x, _ in batches]), a.x.numpy()[a.order(2)]
    )
    assert [int(x.shape[0]) for x, _ in batches] == [8] * 5 + [5]
    # Autotuning off: `fit` waited for the autotuner's next tick at the end of an epoch.
    assert a.dataset(2).options().autotune.enabled is False


def test_reseeded_dropout_gives_the_same_masks_after_any_load(tmp_path):
    """A loaded model's dropout starts from unseeded state; reseeding makes it reproducible."""
    _model().save(tmp_path / "m.keras")
    x = np.ones((4, 6), np.float32)
    outs = []
    for _ in range(2):
        model = keras.saving.load_model(tmp_path / "m.keras")
        fit.reseed_dropout(model, seed=3, epoch=1)
        outs.append(model(x, training=True).numpy())
    np.testing.assert_array_equal(*outs)
    fit.reseed_dropout(model, seed=3, epoch=2)
    assert not np.array_equal(model(x, training=True).numpy(), outs[0])


def test_selection_key_prefers_the_best_and_treats_nan_as_worst():
    high = fit.Selection("score", "max", tie_break="other")
    assert high.key({"score": 0.8, "other": 0.1}) > high.key({"score": 0.7, "other": 0.9})
    assert high.key({"score": 0.8, "other": 0.2}) > high.key({"score": 0.8, "other": 0.1})
    assert high.key({"score": 0.1}) > high.key({"score": math.nan})
    low = fit.Selection("val_loss", "min")
    assert low.key({"val_loss": 0.1}) > low.key({"val_loss": 0.2})


def test_an_improve_metric_must_strictly_beat_epoch_zero():
    rule = fit.Selection("top1", "max", tie_break="cmap", guard=("top1", "cmap"), improve="top1")
    start = {"epoch": 0, "top1": 0.8, "cmap": 0.5}
    assert rule.admits(start, start)  # epoch 0 itself
    assert not rule.admits({"top1": 0.8, "cmap": 0.9}, start)  # a tie keeps epoch 0
    assert not rule.admits({"top1": 0.9, "cmap": 0.4}, start)  # loses the guard
    assert rule.admits({"top1": 0.9, "cmap": 0.5}, start)
    assert rule.admits({"top1": 0.1, "cmap": 0.1}, None)  # no epoch 0: no guard


def test_a_gate_limit_measures_losses_in_points_against_the_reference_and_epoch_zero():
    limit = fit.GateLimit("top1", reference=0.90, max_loss=3.0, max_loss_vs_start=1.0)
    start = {"epoch": 0, "top1": 0.88}
    assert limit.passes({"top1": 0.87}, start)  # 3 points below the reference: at the limit
    assert not limit.passes({"top1": 0.86}, None)  # 4 points below the reference
    assert not limit.passes({"top1": 0.87}, {"top1": 0.885})  # 1.5 points below epoch 0
    assert not limit.passes({}, start)  # not measured


def test_epochs_that_pass_the_gate_come_first():
    """When epoch 0 fails the gate, the best epoch that passes it is kept even if it loses
    a guarded metric to epoch 0; among passing epochs the guard still decides first."""
    base = fit.Selection("top1", "max", tie_break="cmap", guard=("top1", "cmap"),
                         improve="top1")  # fmt: skip
    gated = fit.Selection(**{**base.__dict__,
                             "gate": (fit.GateLimit("top1", 0.90, max_loss=3.0),)})  # fmt: skip
    start = {"epoch": 0, "top1": 0.86, "cmap": 0.85}  # fails the gate: 4 points lost
    admitted = {"epoch": 1, "top1": 0.865, "cmap": 0.86}  # guard: yes, gate: no
    passing = {"epoch": 2, "top1": 0.89, "cmap": 0.84}  # guard: no (cmAP), gate: yes
    both = {"epoch": 3, "top1": 0.875, "cmap": 0.86}  # guard and gate: yes
    assert fit.replay([start, admitted, passing], base, 2) == (1, 2)
    assert fit.replay([start, admitted, passing], gated, 2) == (2, 2)
    assert fit.replay([start, admitted, passing, both], gated, 3) == (3, 3)
    # Nothing passes: the guard decides, as without a gate.
    strict = fit.Selection(**{**base.__dict__, "gate": (fit.GateLimit("top1", 1.0, 0.0),)})
    assert fit.replay([start, admitted, passing], strict, 2) == (1, 2)
    assert gated.passes_gate(passing, start) and not base.passes_gate(passing, start)


def test_a_tie_with_epoch_zero_keeps_the_starting_weights(tmp_path):
    model = _model()
    start = model.get_weights()
    scores = iter([{"s": 0.5, "t": 0.1}, {"s": 0.5, "t": 0.9}, {"s": 0.4, "t": 0.9}])
    result = fit.fit_epochs(
        model, model, _batches(), None, 2, tmp_path / "ck",
        fit.Selection("s", "max", tie_break="t", guard=("s",), improve="s"), seed=5,
        score=lambda: next(scores), score_initial=True,
    )
    assert result.best_epoch == 0
    for a, b in zip(model.get_weights(), start, strict=True):
        np.testing.assert_array_equal(a, b)


class _Killed(Exception):
    pass


class _KillAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.kill_epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.kill_epoch:
            raise _Killed()


def _scripted_score(values):
    """Scores in a fixed order: the best epoch is known in advance."""
    queue = list(values)
    return lambda: {"val_score": queue.pop(0)}


def _run(ckpt, score_values, callbacks=()):
    model = _model()
    result = fit.fit_epochs(
        model, model, _batches(), None, 4, ckpt, fit.Selection("val_score", "max"), seed=5,
        score=_scripted_score(score_values), score_initial=True, callbacks=callbacks,
    )
    return model, result


def test_the_best_epoch_is_kept_across_an_interruption(tmp_path):
    scores = [0.1, 0.3, 0.9, 0.2, 0.4]  # epoch 0 .. 4: epoch 2 is best
    reference, ref_result = _run(tmp_path / "ref", scores)
    assert ref_result.best_epoch == 2

    with pytest.raises(_Killed):  # killed as epoch 4 starts, after the best epoch 2
        _run(tmp_path / "ck", scores, callbacks=[_KillAtEpoch(3)])
    state = json.loads((tmp_path / "ck" / fit.STATE_FILE).read_text())
    assert state["epochs_done"] == 3 and state["best_epoch"] == 2
    resumed, result = _run(tmp_path / "ck", scores[4:])  # only epoch 4 is still scored

    assert result.best_epoch == 2
    assert [e["epoch"] for e in result.history] == [0, 1, 2, 3, 4]
    assert result.history == ref_result.history  # bit-identical losses after the resume
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    table = result.table()
    assert table["selected"].tolist() == [False, False, True, False, False]


def _deferred_score(values, calls):
    """Scripted scores handed out later, as a background scorer does: ``calls`` records
    when each is asked for and when it is taken."""
    queue = list(values)

    def score():
        value = queue.pop(0)
        calls.append(("asked", value))

        def taken():
            calls.append(("taken", value))
            return {"val_score": value}

        return taken

    return score


@pytest.mark.parametrize("patience", [None, 2])
def test_a_deferred_score_keeps_what_an_immediate_one_keeps(tmp_path, patience):
    """An epoch whose score comes later is selected and backed up once the next epoch has
    trained: the same history, kept epoch and weights, also across a kill between."""
    scores = [0.1, 0.3, 0.9, 0.2, 0.4]
    rule = fit.Selection("val_score", "max", patience=patience)

    def run(folder, score, callbacks=()):
        model = _model()
        result = fit.fit_epochs(
            model, model, _batches(), None, 4, tmp_path / folder, rule, seed=5,
            score=score, score_initial=True, callbacks=callbacks,
        )
        return model, result

    reference, expected = run("ref", _scripted_score(scores))
    calls = []
    model, result = run("deferred", _deferred_score(scores, calls))
    assert result.history == expected.history and result.best_epoch == expected.best_epoch
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    if patience is None:  # each score is taken after the next epoch's is asked for
        assert calls[:4] == [("asked", 0.1), ("asked", 0.3), ("taken", 0.1), ("asked", 0.9)]
    else:  # early stopping needs every score before the next epoch
        assert calls[:4] == [("asked", 0.1), ("taken", 0.1), ("asked", 0.3), ("taken", 0.3)]

    with pytest.raises(_Killed):  # epoch 3 trained, its score not yet taken
        run("ck", _deferred_score(scores, []), callbacks=[_KillAtEpoch(3)])
    state = json.loads((tmp_path / "ck" / fit.STATE_FILE).read_text())
    assert state["epochs_done"] == (2 if patience is None else 3)
    model, result = run("ck", _deferred_score(scores[state["epochs_done"] + 1 :], []))
    assert result.history == expected.history and result.best_epoch == expected.best_epoch
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_epoch_zero_wins_when_training_never_beats_it(tmp_path):
    model, result = _run(tmp_path / "ck", [0.9, 0.1, 0.2, 0.3, 0.4])
    start = _model().get_weights()
    assert result.best_epoch == 0
    for a, b in zip(model.get_weights(), start, strict=True):
        np.testing.assert_array_equal(a, b)


def test_patience_stops_early_and_keeps_the_best(tmp_path):
    model = _model()
    result = fit.fit_epochs(
        model, model, _batches(), None, 6, tmp_path / "ck",
        fit.Selection("val_score", "max", patience=2), seed=5,
        score=_scripted_score([0.5, 0.9, 0.1, 0.2, 0.3, 0.4]),
    )
    assert [e["epoch"] for e in result.history] == [1, 2, 3, 4] and result.best_epoch == 2


def test_unlogged_metrics_stay_in_the_history_but_not_in_the_epoch_lines(tmp_path, caplog):
    model = _model()
    with caplog.at_level("INFO", logger="n6qat.fit"):
        result = fit.fit_epochs(
            model, model, _batches(), None, 2, tmp_path / "ck", fit.Selection("val_score", "max"),
            seed=5, score=_scripted_score([0.5, 0.9]), unlogged=("loss",),
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and all("val_score=" in line for line in lines)
    assert not any("loss=" in line for line in lines)
    assert all("loss" in epoch for epoch in result.history)


def test_a_backup_from_another_model_is_refused(tmp_path):
    _run(tmp_path / "ck", [0.1, 0.2, 0.3, 0.4, 0.5], callbacks=[_KillAtEpoch(99)])
    other = keras.Sequential([keras.Input((6,)), L.Dense(3)])
    other.compile(optimizer="adam", loss="mse")
    with pytest.raises(N6QATError, match="does not match"):
        fit.fit_epochs(other, other, _batches(), None, 5, tmp_path / "ck",
                       fit.Selection("loss"), seed=5)


def test_early_stopping_waits_for_min_epochs(tmp_path):
    model = _model()
    result = fit.fit_epochs(
        model, model, _batches(), None, 6, tmp_path / "ck",
        fit.Selection("val_score", "max", patience=1, min_epochs=4), seed=5,
        score=_scripted_score([0.9, 0.1, 0.2, 0.3, 0.4, 0.5]),
    )
    assert [e["epoch"] for e in result.history] == [1, 2, 3, 4] and result.best_epoch == 1


@pytest.mark.parametrize("patience", [None, 2])
def test_replaying_a_history_keeps_what_a_run_with_that_budget_keeps(tmp_path, patience):
    """`fit.replay` on a long run's history gives the epoch a shorter run keeps."""
    values = [0.5, 0.6, 0.4, 0.9, 0.3, 0.2, 0.95]
    rule = fit.Selection("val_score", "max", guard=("val_score",), patience=patience)

    def run(epochs, folder):
        model = _model()
        return fit.fit_epochs(
            model, model, _batches(), None, epochs, tmp_path / folder, rule, seed=5,
            score=_scripted_score(values), score_initial=True,
        )

    long = run(6, "long")
    assert fit.replay(long.history, rule, 6) == (long.best_epoch, long.history[-1]["epoch"])
    for epochs in (1, 3, 4):
        short = run(epochs, f"short{epochs}")
        assert fit.replay(long.history, rule, epochs) == (
            short.best_epoch, short.history[-1]["epoch"]
        )
