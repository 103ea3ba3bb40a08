"""One training loop for pretraining and QAT: reproducible epochs, a backup after each
epoch, and the best epoch kept across interruptions.

Each epoch is one ``fit`` call on data whose order depends only on (seed, epoch), with
every dropout seed reset from (seed, epoch) too, so a run resumed after epoch k trains
epoch k + 1 exactly as an uninterrupted run does. After every epoch the loop writes the
trainer's variables and optimizer state, the best epoch's weights and the history into
``checkpoint_dir`` (each file under a temporary name, then renamed; ``state.json``, which
names the others, last), so a kill at any moment leaves a consistent backup.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from n6qat.atomic import atomic_path, write_text
from n6qat.errors import N6QATError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass(frozen=True)
class GateLimit:
    """One limit of a quality gate on an epoch's ``metric`` (larger is better), in points
    (100 x the metric): at most ``max_loss`` below ``reference`` and, when given, at most
    ``max_loss_vs_start`` below epoch 0's value (the loss arithmetic of ``n6qat.gate``)."""

    metric: str
    reference: float
    max_loss: float
    max_loss_vs_start: float | None = None

    def passes(self, logs: dict[str, float], start: dict[str, float] | None) -> bool:
        value = logs.get(self.metric, math.nan)
        if math.isnan(value):
            return False
        if not 100.0 * (self.reference - value) <= self.max_loss + 1e-9:
            return False
        if self.max_loss_vs_start is None or start is None:
            return True
        loss = 100.0 * (start.get(self.metric, math.nan) - value)
        return not loss > self.max_loss_vs_start + 1e-9


@dataclass(frozen=True)
class Selection:
    """Which epoch's weights are kept: the best ``monitor`` value (ties: ``tie_break``).

    ``guard``: metrics (larger is better) that an epoch must not lose against epoch 0,
    the starting weights, to be kept at all. ``improve``: a metric (larger is better)
    that an epoch must strictly beat epoch 0 on, so that a tie keeps the starting
    weights (epoch 0 is then only replaced by a measured gain). ``patience``: stop after
    this many epochs without a new best (None: never stop early), but never before ``min_epochs``.

    ``gate``: ``GateLimit``s, the quality gate the kept weights will face (e.g. the
    INT8 model's loss to the FP32 reference). Epochs that pass it come first: the best
    one the guard admits, else the best one that passes, else (no epoch passes) the
    best one the guard admits. So when the starting weights fail the gate, an epoch
    that passes it is kept even if it loses a guarded metric to epoch 0.
    """

    monitor: str = "val_loss"
    mode: str = "min"
    tie_break: str | None = None
    guard: tuple[str, ...] = ()
    improve: str | None = None
    patience: int | None = None
    min_epochs: int = 0
    gate: tuple[GateLimit, ...] = ()

    def passes_gate(self, logs: dict[str, float], start: dict[str, float] | None) -> bool:
        """Whether there is a gate and ``logs``'s epoch passes every limit of it
        (``start``: epoch 0's logs)."""
        return bool(self.gate) and all(limit.passes(logs, start) for limit in self.gate)

    def rank(self, logs, start) -> tuple[bool, bool] | None:
        """(passes the gate, admitted by the guard); None: never kept."""
        passes, admitted = self.passes_gate(logs, start), self.admits(logs, start)
        return (passes, admitted) if passes or admitted else None

    def admits(self, logs: dict[str, float], start: dict[str, float] | None) -> bool:
        """Whether the guard lets ``logs``'s epoch be kept (always, without epoch 0)."""
        if start is None or logs is start:
            return True
        def value(entry, metric):
            return entry.get(metric, -math.inf)

        if self.improve and not value(logs, self.improve) > value(start, self.improve):
            return False
        return all(value(logs, m) >= value(start, m) for m in self.guard)

    def key(self, logs: dict[str, float]) -> tuple[float, float]:
        """A sort key where larger is better; NaN (not measured) is worst."""
        sign = -1.0 if self.mode == "min" else 1.0
        values = [logs.get(self.monitor, math.nan)]
        values.append(logs.get(self.tie_break, math.nan) if self.tie_break else 0.0)
        return tuple(-math.inf if math.isnan(v) else sign * v for v in values)


@dataclass
class FitResult:
    """The per-epoch logs (epoch 0: before training, when scored) and the kept epoch."""

    history: list[dict[str, float]]
    best_epoch: int | None

    def table(self):
        """The history as a DataFrame indexed by epoch, with a ``selected`` column."""
        import pandas as pd

        frame = pd.DataFrame(self.history).set_index("epoch")
        frame["selected"] = frame.index == self.best_epoch
        return frame


def epoch_seed(seed: int, epoch: int, salt: str = "") -> int:
    """A 31-bit seed that depends only on (seed, epoch, salt)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{salt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def reseed_dropout(model: keras.Model, seed: int, epoch: int) -> None:
    """Set every seed generator of ``model`` (dropout and other random layers) from (seed, epoch).

    A loaded model's generators start from unseeded state; without this the dropout
    masks, and so the trained weights, differ from run to run.
    """
    for index, layer in enumerate(_seeded_layers(model)):
        for number, generator in enumerate(getattr(layer, "_seed_generators", [])):
            value = epoch_seed(seed, epoch, f"{index}/{number}/{layer.name}")
            generator.state.assign(np.array([value, 0], dtype=generator.state.dtype))


def _seeded_layers(model) -> Iterable:
    seen: set[int] = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            yield layer
        for attr in ("layer", "output_range", "input_range", "logit_range", "batch_norm"):
            inner = getattr(layer, attr, None)
            if inner is not None and hasattr(inner, "_seed_generators") and id(inner) not in seen:
                seen.add(id(inner))
                yield inner


class EpochBatches:
    """Training batches in an order that depends only on (seed, epoch).

    ``rows`` index ``features`` (repeats allowed: upsampled files); the distinct rows are
    converted to float32 once and every epoch gathers its shuffled batches from them.
    """

    def __init__(
        self, features: np.ndarray, targets: np.ndarray, rows: np.ndarray, batch_size: int,
        seed: int, shuffle: bool = True,
    ):
        import tensorflow as tf

        unique, index = np.unique(np.asarray(rows), return_inverse=True)
        self.x = tf.constant(np.asarray(features[unique], dtype=np.float32))
        self.y = tf.constant(np.asarray(targets)[unique])
        self.index = index.astype(np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle

    def __len__(self) -> int:
        return len(self.index)

    def with_targets(self, targets: np.ndarray) -> EpochBatches:
        """The same rows in the same orders, with other targets for the distinct rows."""
        import copy

        import tensorflow as tf

        changed = copy.copy(self)
        changed.y = tf.constant(np.asarray(targets, dtype=np.float32))
        return changed

    def order(self, epoch: int) -> np.ndarray:
        """Positions into the distinct rows, in this epoch's order."""
        if not self.shuffle:
            return self.index
        rng = np.random.default_rng([self.seed, int(epoch)])
        return self.index[rng.permutation(len(self.index))]

    def dataset(self, epoch: int) -> tf.data.Dataset:
        import tensorflow as tf

        x, y = self.x, self.y
        ds = tf.data.Dataset.from_tensor_slices(self.order(epoch)).batch(self.batch_size)
        ds = ds.map(lambda i: (tf.gather(x, i), tf.gather(y, i))).prefetch(2)
        # No autotuning: the buffers and parallelism here are fixed anyway, and with it on
        # an epoch's `fit` returned only at the autotuner's next tick (a multiple of ~5.15 s
        # from its start: up to 4.5 s lost, ~2 s in every third epoch of the demo's
        # pretraining). The batches are the same either way.
        options = tf.data.Options()
        options.autotune.enabled = False
        return ds.with_options(options)


def fit_epochs(
    trainer: keras.Model,
    kept: keras.Model,
    train: EpochBatches | Callable[[int], Any] | Any,
    val: Any,
    epochs: int,
    checkpoint_dir: Path,
    selection: Selection,
    seed: int,
    score: Callable[[], dict[str, float]] | None = None,
    score_initial: bool = False,
    epoch_begin: Callable[[int], None] | None = None,
    callbacks: Iterable[keras.callbacks.Callback] = (),
    unlogged: Iterable[str] = (),
) -> FitResult:
    """Train the compiled ``trainer`` for ``epochs``; leave the best epoch's weights in ``kept``.

    ``kept`` is the model whose weights are the result: the trainer itself, or the model
    a QAT twin shares its variables with. ``train`` gives each epoch's data: an
    ``EpochBatches``, a function of the epoch, or one dataset for every epoch. ``score``
    adds metrics to an epoch's logs after it (e.g. the INT8 simulation on validation). It
    returns them, or a function that waits for them: that epoch is then logged, selected
    and backed up after the next epoch has trained, while its score is computed elsewhere
    (a kill in between loses both epochs, never the backup before them). With
    ``score_initial`` the weights before training are scored as epoch 0 and can be
    the ones kept. ``epoch_begin`` runs before each epoch (e.g. activation recalibration).
    Metrics named in ``unlogged`` stay in the history but not in the log's epoch lines
    (e.g. training accuracy against soft targets, which means nothing).
    Rerunning with the same ``checkpoint_dir`` continues after the last finished epoch.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    unlogged = tuple(unlogged)
    state = _read_state(checkpoint_dir)
    history: list[dict[str, float]] = state.get("history", [])
    best_epoch: int | None = state.get("best_epoch")
    done = int(state.get("epochs_done", 0))
    _build_optimizer(trainer)
    pending: list[_Epoch] = []  # an epoch whose score is still being computed

    def settle() -> None:
        """Log, select and back up the pending epoch, once its score is in."""
        nonlocal best_epoch
        epoch = pending.pop()
        waited = time.perf_counter()
        if epoch.score is not None:
            epoch.logs.update(epoch.score() if callable(epoch.score) else epoch.score)
        scoring = epoch.scoring + time.perf_counter() - waited
        history.append(epoch.logs)
        number = epoch.logs["epoch"]
        new_best = _new_best(history, best_epoch, selection)
        best_epoch = number if new_best else best_epoch
        _save(checkpoint_dir, epoch.state, epoch.weights, history, number, best_epoch,
              new_best)  # fmt: skip
        if number == 0:
            log.info("epoch 0 (before training; scoring %.1f s): %s", scoring,
                     _brief(epoch.logs, unlogged))  # fmt: skip
            return
        timing = f"{epoch.seconds:.1f} s"
        if epoch.score is not None:
            timing += f", scoring {scoring:.1f} s"
        log.info("epoch %d of %d (%s): %s%s", number, epochs, timing,
                 _brief(epoch.logs, unlogged),
                 " (best so far)" if new_best else "")  # fmt: skip

    def finished(logs: dict[str, float], seconds: float) -> None:
        """Score the current weights; settle the epoch before, then this one unless its
        score is deferred (then its state is copied for the backup written later)."""
        started = time.perf_counter()
        found = None if score is None else score()
        deferred = callable(found)
        state, weights = _trainer_state(trainer), kept.weights
        current = _Epoch(
            logs, found, seconds, time.perf_counter() - started,
            _arrays(state) if deferred else state, _arrays(weights) if deferred else weights,
        )
        if pending:
            settle()
        pending.append(current)
        if not deferred:
            settle()

    if state:
        _restore(trainer, checkpoint_dir / state["last"])
        log.info("resuming after epoch %d of %d (backup %s)", done, epochs, checkpoint_dir)
    elif score is not None and score_initial:
        finished({"epoch": 0}, 0.0)
    data_for = _epoch_data(train)
    for epoch in range(done, epochs):
        if pending and selection.patience is not None:
            settle()
        if _patience_exhausted(history, best_epoch, selection):
            log.info("stopping early: no better %s for %d epochs", selection.monitor,
                     selection.patience)
            break
        reseed_dropout(trainer, seed, epoch)
        if epoch_begin is not None:
            epoch_begin(epoch)
        started = time.perf_counter()
        fitted = trainer.fit(
            data_for(epoch), validation_data=val, initial_epoch=epoch, epochs=epoch + 1,
            shuffle=False, verbose=0, callbacks=list(callbacks),
        )
        seconds = time.perf_counter() - started
        logs = {"epoch": epoch + 1}
        logs.update({key: float(values[-1]) for key, values in fitted.history.items()})
        finished(logs, seconds)
    if pending:
        settle()
    state = _read_state(checkpoint_dir)
    if state.get("best"):
        _load_weights(kept, checkpoint_dir / state["best"])
    log.info("kept epoch %s by %s", best_epoch, selection.monitor)
    return FitResult(history=history, best_epoch=best_epoch)


@dataclass
class _Epoch:
    """A trained (or starting) epoch: its logs, its score (metrics, a function that waits
    for them, or None), and what its backup holds (variables, or copies of their values
    while the score is deferred)."""

    logs: dict[str, float]
    score: dict[str, float] | Callable[[], dict[str, float]] | None
    seconds: float
    scoring: float
    state: list
    weights: list


def _arrays(variables) -> list[np.ndarray]:
    """Copies of the variables' values, for a backup written later."""
    return [np.array(v.numpy(), copy=True) for v in variables]


def _epoch_data(train) -> Callable[[int], Any]:
    if isinstance(train, EpochBatches):
        return train.dataset
    if callable(train) and not hasattr(train, "element_spec"):
        return train
    return lambda epoch: train


def replay(
    history: list[dict[str, float]], selection: Selection, epochs: int
) -> tuple[int | None, int]:
    """(kept epoch, last epoch run) of ``fit_epochs`` with budget ``epochs`` on weights
    that would log ``history`` (a longer run's, epoch 0 first when it was scored).

    What a smaller budget or patience would have kept, where the first epochs do not
    depend on them (e.g. a constant learning rate), without training again.
    """
    seen = history[:1] if history and history[0]["epoch"] == 0 else []
    best_epoch = 0 if seen else None
    for logs in (entry for entry in history if 1 <= entry["epoch"] <= epochs):
        if _patience_exhausted(seen, best_epoch, selection):
            break
        seen.append(logs)
        best_epoch = logs["epoch"] if _new_best(seen, best_epoch, selection) else best_epoch
    return best_epoch, seen[-1]["epoch"] if seen else 0


def _new_best(history: list[dict[str, float]], best_epoch, selection: Selection) -> bool:
    """Whether the last epoch of ``history`` replaces ``best_epoch`` as the kept one."""
    logs = history[-1]
    start = history[0] if history[0]["epoch"] == 0 else None
    rank = selection.rank(logs, start)
    if rank is None:
        return False
    if best_epoch is None:
        return True
    best = _entry(history, best_epoch)
    return (rank, selection.key(logs)) > (selection.rank(best, start), selection.key(best))


def _entry(history: list[dict[str, float]], epoch: int) -> dict[str, float]:
    return next(entry for entry in history if entry["epoch"] == epoch)


def _patience_exhausted(history, best_epoch, selection: Selection) -> bool:
    if selection.patience is None or best_epoch is None or not history:
        return False
    last = history[-1]["epoch"]
    return last >= selection.min_epochs and last - best_epoch >= selection.patience


def _brief(logs: dict[str, float], unlogged: Iterable[str] = ()) -> str:
    skip = {"epoch", *unlogged}
    return " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k not in skip)


def _build_optimizer(trainer) -> None:
    optimizer = trainer.optimizer
    if optimizer is None:
        raise N6QATError("fit_epochs needs a compiled model (call compile first)")
    if not optimizer.built:
        optimizer.build(trainer.trainable_variables)


def _trainer_state(trainer) -> list:
    return [*trainer.variables, *trainer.optimizer.variables]


def _save(directory: Path, state, weights, history, epoch: int, best_epoch, new_best: bool):
    """Write this epoch's backup (``state``: the trainer's and optimizer's variables or
    their values, ``weights``: the kept model's); the state file, written last, makes it
    the current one."""
    last = f"epoch-{epoch}.npz"
    _write_arrays(directory / last, state)
    old = _read_state(directory)
    best = f"best-{epoch}.npz" if new_best else old.get("best")
    if new_best:
        _write_arrays(directory / best, weights)
    state = {
        "epochs_done": epoch if epoch > 0 else 0, "last": last, "best": best,
        "best_epoch": best_epoch, "history": history,
    }
    write_text(directory / STATE_FILE, json.dumps(state, indent=1) + "\n")
    keep = {STATE_FILE, last, best}
    for path in directory.glob("*.npz"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _write_arrays(path: Path, variables) -> None:
    arrays = {f"v{i:04d}": np.asarray(v if isinstance(v, np.ndarray) else v.numpy())
              for i, v in enumerate(variables)}  # fmt: skip
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def _read_arrays(path: Path, variables, what: str) -> None:
    variables = list(variables)
    with np.load(path) as data:
        arrays = [data[f"v{i:04d}"] for i in range(len(data.files))]
    shapes = [tuple(v.shape) for v in variables]
    if [a.shape for a in arrays] != shapes:
        raise N6QATError(
            f"the backup {path} does not match the {what} being trained ({len(arrays)} saved "
            f"arrays, {len(shapes)} variables); delete {path.parent} to start afresh"
        )
    for variable, array in zip(variables, arrays, strict=True):
        variable.assign(array)


def _restore(trainer, path: Path) -> None:
    _read_arrays(path, _trainer_state(trainer), "model and optimizer")


def _load_weights(kept, path: Path) -> None:
    _read_arrays(path, kept.weights, "model")


def _read_state(directory: Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise N6QATError(f"the training backup {path} is unreadable ({err}); delete "
                         f"{directory} to start afresh") from err
