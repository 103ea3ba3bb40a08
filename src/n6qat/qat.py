"""Quantization-aware fine-tuning: train a model through its INT8 twin, keep the best epoch.

`run_qat` trains the model's variables through `n6qat.int8_twin` (fake-quantized weights
and, by default, simulated int8 activations on the converter's calibration ranges) with
the fit loop of `n6qat.fit`, optionally against the frozen FP32 model as a teacher
(`distilled`), and keeps the epoch whose converted INT8 model scores best on validation
(`_int8_scorer`, `_selection`). The saved model holds no fake-quant ops: the twin's
wrappers are never serialized.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from n6qat.background_scoring import BackgroundScorer
from n6qat.config import with_schema_defaults
from n6qat.errors import N6QATError
from n6qat.fake_quant import ActivationRange
from n6qat.int8_twin import (
    all_layers,
    build_qat_model,
    calibrate_activation_ranges,
    in_batches,
    recalibrate,
    simulated_int8,
    twin_layers,
)
from n6qat.model import predict
from n6qat.train import multi_hot

log = logging.getLogger(__name__)

CALIBRATION_BATCHES = 8
"""Training batches used to initialise activation ranges before QAT."""

OPTIMIZERS = ("adam", "adamw", "sgd")

SOFT_TARGET_METRICS = ("acc", "auc")
"""Training metrics left out of the history when QAT trains on distilled (soft) targets."""

SELECTIONS = ("int8_file_top1", "int8_file_cmap", "last")
"""How QAT picks the epoch it keeps: the INT8 model's validation file top-1 or cmAP
(each breaking the other's ties), or simply the last epoch. Epoch 0, the starting
weights, competes too: a later epoch must lose neither metric to it and strictly beat
it on the first, so a tie on the first keeps the PTQ-equivalent starting weights. With
the INT8 gate's limits (``run_qat(gate=)``), epochs that pass the gate come first."""

SELECT_WITH = ("tflite", "simulation")
"""What scores an epoch for the selection: its converted full-INT8 TFLite (what is
deployed: the PTQ baseline is then exactly epoch 0) or the twin's INT8 simulation."""


@dataclass(frozen=True)
@with_schema_defaults("qat", frozen_layers="freeze")
class QATSettings:
    """What a user chooses for quantization-aware fine-tuning (config section ``qat``).

    Every default is the schema's (`n6qat.config.schema_defaults`).
    """

    epochs: int
    learning_rate: float
    batch_size: int
    optimizer: str
    weight_decay: float
    clipnorm: float | None
    per_channel: bool
    simulate_activations: bool
    frozen_layers: tuple[str, ...]
    seed: int
    selection: str
    select_with: str
    distillation: float

    @classmethod
    def from_config(cls, qat: dict) -> QATSettings:
        """The settings of config section ``qat`` (keys as in the schema; missing: default)."""
        fields = {key: value for key, value in qat.items() if key != "freeze"}
        return cls(**fields, frozen_layers=tuple(qat.get("freeze", ())))

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen_layers", tuple(self.frozen_layers))
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clipnorm is not None and not self.clipnorm > 0:
            problems.append(f"clipnorm must be > 0 or null, got {self.clipnorm}")
        if not self.distillation >= 0:
            problems.append(f"distillation must be >= 0, got {self.distillation}")
        if self.select_with not in SELECT_WITH:
            problems.append(f"select_with must be one of {SELECT_WITH}, got {self.select_with!r}")
        if self.selection not in SELECTIONS:
            problems.append(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if problems:
            raise N6QATError("Invalid QAT settings (config key qat): " + "; ".join(problems))


def _optimizer(settings: QATSettings) -> keras.optimizers.Optimizer:
    common = {"learning_rate": settings.learning_rate, "clipnorm": settings.clipnorm}
    if settings.optimizer == "adamw":
        return keras.optimizers.AdamW(weight_decay=settings.weight_decay, **common)
    weight_decay = settings.weight_decay or None
    if settings.optimizer == "sgd":
        return keras.optimizers.SGD(momentum=0.9, weight_decay=weight_decay, **common)
    return keras.optimizers.Adam(weight_decay=weight_decay, **common)


def _batched(dataset: tf.data.Dataset, model: keras.Model, batch_size: int, name: str):
    """Batch a dataset of single examples; one that yields batches is used as it is."""
    spec = dataset.element_spec
    rank = len(model.inputs[0].shape)
    if not (isinstance(spec, tuple) and len(spec) == 2 and len(spec[0].shape) in (rank - 1, rank)):
        raise N6QATError(
            f"{name} must yield (features, target) pairs with features shaped like the "
            f"model input {tuple(model.inputs[0].shape)} (batched or not); got {spec}."
        )
    if len(spec[0].shape) == rank:
        return dataset
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


@dataclass(frozen=True)
class ValidationFiles:
    """Validation chunks with their files, for choosing the epoch by file-level INT8 metrics."""

    features: np.ndarray
    chunks: pd.DataFrame
    labels: list[str]
    pooling: str = "mean"
    threshold: float = 0.5
    io_dtype: str = "float32"


def _chunk_metrics(scores: np.ndarray, targets: np.ndarray, loss) -> dict[str, float]:
    """``val_loss``, ``val_acc`` and ``val_auc`` of chunk scores against their multi-hot
    targets: what Keras's validation reports for a twin compiled as `run_qat` compiles it."""
    accuracy, auc = keras.metrics.BinaryAccuracy(), keras.metrics.AUC()
    accuracy.update_state(targets, scores)
    auc.update_state(targets, scores)
    return {
        "val_loss": float(np.mean(keras.ops.convert_to_numpy(
            keras.losses.get(loss)(targets, scores)))),
        "val_acc": float(accuracy.result()),
        "val_auc": float(auc.result()),
    }  # fmt: skip


def _int8_scorer(
    model, settings: QATSettings, calibration, files: ValidationFiles, twin=None,
    background=None, loss="binary_crossentropy",
):  # fmt: skip
    """Validation metrics of the model's current weights in INT8: the simulation's
    (``val_sim_*``, and its chunk-level ``val_loss``, ``val_acc``, ``val_auc``) and,
    selecting with the TFLite, the converted model's (``val_int8_*``).

    ``twin``: the training twin, when it is the full simulation on ``calibration``'s
    ranges (it is then recalibrated here, as the next epoch would do); otherwise a
    ``simulated_int8`` twin of its own is built. ``background``: a
    ``n6qat.background_scoring.BackgroundScorer`` that converts and runs the TFLite in
    its worker process; the scorer then returns a function that waits for the metrics
    (``n6qat.fit.fit_epochs`` calls it once the next epoch has trained).
    """
    from n6qat.convert import convert_int8
    from n6qat.evaluate import validation_metrics
    from n6qat.litert import run_tflite

    if twin is None:
        twin = simulated_int8(model, calibration, settings.per_channel, settings.batch_size)
    x = np.asarray(files.features, dtype=np.float32)
    rows = files.chunks["row"].to_numpy()
    targets = multi_hot(files.chunks["label_index"].to_numpy(), len(files.labels))

    def metrics(scores, prefix: str) -> dict[str, float]:
        return validation_metrics(
            scores, files.chunks, files.labels, files.pooling, files.threshold, prefix
        )

    def score():
        recalibrate(twin)
        twin.ranges_current = True  # until the weights change
        simulated = predict(twin, x)
        logs = {**_chunk_metrics(simulated[rows], targets, loss),
                **metrics(simulated, "val_sim_")}  # fmt: skip
        if settings.select_with != "tflite":
            return logs
        if background is not None:
            waiting = background.submit(model.get_weights())
            return lambda: {**logs, **waiting.result()}
        tflite = convert_int8(
            model, calibration, settings.per_channel, files.io_dtype, signature=False
        )
        logs.update(metrics(run_tflite(tflite, x), "val_int8_"))
        return logs

    return score


def _selection(
    settings: QATSettings, scored: bool, validated: bool, gate=None, reference=None
):  # fmt: skip
    """The epoch selection rule; with ``gate`` (``n6qat.gate.GateSettings``) and
    ``reference`` (the FP32 reference's validation metrics) epochs that pass the INT8
    gate come first."""
    from n6qat.fit import GateLimit, Selection

    if settings.selection == "last" or not (scored or validated):
        return Selection("epoch", "max")
    if not scored:
        return Selection("val_loss", "min")
    source = "int8" if settings.select_with == "tflite" else "sim"
    first, second = (f"val_{source}_file_top1", f"val_{source}_file_cmap")
    if settings.selection == "int8_file_cmap":
        first, second = second, first
    limits = ()
    if gate is not None and reference is not None:
        limits = tuple(
            GateLimit(f"val_{source}_{metric}", reference[metric], gate.max_loss_vs_fp32,
                      gate.max_loss_vs_ptq)  # fmt: skip
            for metric in gate.metrics
        )
    return Selection(
        first, "max", tie_break=second, guard=(first, second), improve=first, gate=limits
    )


def reference_metrics(reference: keras.Model, files: ValidationFiles) -> dict[str, float]:
    """The FP32 reference model's validation metrics, as the INT8 gate measures them."""
    from n6qat.evaluate import validation_metrics

    x = np.asarray(files.features, np.float32)
    scores = predict(reference, x)
    return validation_metrics(scores, files.chunks, files.labels, files.pooling, files.threshold)


def distilled(batches, teacher: keras.Model, weight: float):
    """The batches with targets (labels + weight * teacher scores) / (1 + weight).

    Binary cross-entropy is linear in its target, so training on these targets is
    training on (task loss + weight * BCE against the frozen FP32 teacher) / (1 + weight);
    against the teacher's sigmoid outputs, BCE is their KL divergence plus a constant. The
    teacher is the model before QAT: it pulls the quantized model back to the FP32
    function instead of fitting the labels further.
    """
    scores = predict(teacher, batches.x)
    return batches.with_targets((batches.y.numpy() + weight * scores) / (1.0 + weight))


def run_qat(
    model: keras.Model,
    train_ds,
    val_ds: tf.data.Dataset | None,
    settings: QATSettings,
    checkpoint_dir: Path,
    loss="binary_crossentropy",
    callbacks: Iterable[keras.callbacks.Callback] = (),
    calibration: np.ndarray | None = None,
    selection_files: ValidationFiles | None = None,
    background_scoring: bool = True,
    gate=None,
    reference: keras.Model | None = None,
):
    """Fine-tune `model` in place on the INT8 simulation; return the ``n6qat.fit.FitResult``.

    ``train_ds``: an ``n6qat.fit.EpochBatches`` (resumable bit-exactly) or a tf.data
    dataset of examples (batched here with `settings.batch_size`) or of batches.
    Validation runs on the quantized twin. When epochs are scored (``selection_files``
    with a calibration set), their ``val_loss``, ``val_acc`` and ``val_auc`` are the
    scoring simulation's on those chunks, with ranges re-derived for the epoch's weights,
    and ``val_ds`` is not run; otherwise Keras validates the twin on ``val_ds``. A backup
    of weights, optimizer state, history and the best epoch is written to
    `checkpoint_dir` after every epoch; rerunning with the same directory continues after
    the last finished epoch.

    With activation simulation and a `calibration` set (the chunks the converter will
    calibrate on), ranges come from that set, re-derived at every epoch start, instead
    of moving averages of batch ranges. With ``selection_files`` (and a calibration set)
    every epoch, and the starting weights as epoch 0, is scored in INT8 (the converted
    TFLite or the simulation, ``settings.select_with``) by file-level validation
    metrics; the best epoch (``settings.selection``) that loses neither top-1 nor cmAP
    against epoch 0 is kept, so QAT never keeps weights that quantize worse than the
    starting ones. With ``gate`` (``n6qat.gate.GateSettings``, the limits the converted
    model will face), epochs whose INT8 metrics pass the gate against the FP32
    ``reference`` model (default: `model` before QAT) and against epoch 0 come first: if
    the starting weights fail it, the best epoch that passes is kept even when it loses
    a guarded metric to epoch 0. Otherwise the lowest simulated validation loss is kept,
    or the last epoch without validation data. With ``background_scoring`` the TFLite conversion and
    run of each epoch take place in a worker process while the next epoch trains
    (`n6qat.background_scoring`): the same metrics, the same kept epoch.
    """
    from n6qat.fit import EpochBatches, FitResult, fit_epochs

    checkpoint_dir = Path(checkpoint_dir)
    keras.utils.set_random_seed(settings.seed)
    soft_targets = isinstance(train_ds, EpochBatches) and settings.distillation > 0
    # Accuracy and AUC against the blended (label + teacher) targets mean nothing: a soft
    # target never equals a thresholded prediction. Validation keeps the labels.
    meaningless = SOFT_TARGET_METRICS if soft_targets else ()
    if not isinstance(train_ds, EpochBatches):
        train_ds = _batched(train_ds, model, settings.batch_size, "train_ds")
    elif soft_targets:
        train_ds = distilled(train_ds, model, settings.distillation)
    val = None if val_ds is None else _batched(val_ds, model, settings.batch_size, "val_ds")
    trainable = {id(layer): (layer, layer.trainable) for layer in all_layers(model)}
    background = None
    if (background_scoring and settings.select_with == "tflite"
            and selection_files is not None and calibration is not None):  # fmt: skip
        # Started first: the worker imports TensorFlow while the twin is built.
        files = selection_files
        background = BackgroundScorer(
            model, calibration, settings.per_channel, files.io_dtype, files.features,
            files.chunks, files.labels, files.pooling, files.threshold,
        )
    try:
        twin = build_qat_model(
            model, settings.per_channel, settings.simulate_activations, settings.frozen_layers
        )
        epoch_begin = None
        calibrated_twin = settings.simulate_activations and calibration is not None
        if calibrated_twin:
            for quantizer in twin_layers(twin):
                if isinstance(quantizer, ActivationRange):
                    quantizer.tracking = False
            twin.calibration_batches = in_batches(calibration, settings.batch_size)
            recalibrate(twin)
            # Set by the scorer: the ranges are already those of the current weights.
            twin.ranges_current = False

            def epoch_begin(epoch: int) -> None:
                if not twin.ranges_current:
                    recalibrate(twin)
                twin.ranges_current = False
        elif settings.simulate_activations:
            first = train_ds.dataset(0) if isinstance(train_ds, EpochBatches) else train_ds
            calibrate_activation_ranges(twin, (x for x, _ in first.take(CALIBRATION_BATCHES)))
        score = None
        fp32 = None
        if selection_files is not None and calibration is not None:
            if gate is not None:
                fp32 = reference_metrics(model if reference is None else reference,
                                         selection_files)  # fmt: skip
                log.info("FP32 reference on validation (the INT8 gate's): %s",
                         {m: round(fp32[m], 4) for m in gate.metrics})  # fmt: skip
            # The calibrated training twin is the full simulation on the converter's
            # calibration set: it scores too (one twin to build, one calibration an epoch).
            score = _int8_scorer(
                model, settings, calibration, selection_files,
                twin=twin if calibrated_twin else None, background=background, loss=loss,
            )
        twin.compile(
            optimizer=_optimizer(settings),
            loss=loss,
            metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="acc")],
        )
        # A scored epoch's val_loss, val_acc and val_auc come from the scoring simulation
        # (ranges re-derived for its weights), so fit runs no validation pass of its own.
        result = fit_epochs(
            twin, model, train_ds, None if score is not None else val, settings.epochs,
            checkpoint_dir,
            _selection(settings, score is not None, val is not None, gate, fp32), settings.seed,
            score=score, score_initial=True, epoch_begin=epoch_begin, callbacks=callbacks,
            unlogged=meaningless,
        )
    finally:
        if background is not None:
            background.close()
        for layer, flag in trainable.values():
            layer.trainable = flag
    if meaningless:
        history = [{k: v for k, v in logs.items() if k not in meaningless}
                   for logs in result.history]  # fmt: skip
        result = FitResult(history=history, best_epoch=result.best_epoch)
    return result
