"""Float training on the cached features: datasets, targets, the pretraining loop."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def configure_runtime(threads: int, seed: int | None = None) -> None:
    """TensorFlow's thread pools, op determinism and (with ``seed``) every global seed.

    Call before any TensorFlow op runs. ``threads`` must come from the config or the
    rule, not from ``--cores``: float sums over a different thread split round
    differently, so the same seed on another thread count gives other weights.
    """
    import keras
    import tensorflow as tf

    threads = max(1, int(threads))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def multi_hot(label_index: np.ndarray, n_classes: int) -> np.ndarray:
    """Targets for sigmoid outputs; negatives (index -1) get all zeros."""
    label_index = np.asarray(label_index)
    targets = np.zeros((len(label_index), n_classes), dtype=np.float32)
    pos = label_index >= 0
    targets[np.flatnonzero(pos), label_index[pos]] = 1.0
    return targets


def training_rows(chunks: pd.DataFrame, upsampled: pd.DataFrame) -> np.ndarray:
    """Feature rows for one training epoch: each chunk as often as its file is upsampled."""
    repeats = upsampled.groupby("path").size()
    times = chunks["path"].map(repeats).fillna(0).astype(int).to_numpy()
    return np.repeat(chunks["row"].to_numpy(), times)


def epoch_batches(
    train: tuple[np.ndarray, pd.DataFrame],
    val: tuple[np.ndarray, pd.DataFrame],
    upsampled: pd.DataFrame,
    n_classes: int,
    batch_size: int,
    seed: int = 0,
):
    """Upsampled training batches in a per-epoch seeded order, and ordered validation batches."""
    from n6qat.fit import EpochBatches

    (x_train, train_chunks), (x_val, val_chunks) = train, val
    train_batches = EpochBatches(
        x_train, multi_hot(train_chunks["label_index"], n_classes),
        training_rows(train_chunks, upsampled), batch_size, seed,
    )
    val_batches = EpochBatches(
        x_val, multi_hot(val_chunks["label_index"], n_classes),
        val_chunks["row"].to_numpy(), batch_size, seed, shuffle=False,
    )
    return train_batches, val_batches.dataset(0)


def compile_classifier(
    model, learning_rate: float, steps: int, weight_decay: float = 0.0, optimizer=None
):
    """Adam(W) with cosine decay over ``steps``, binary cross-entropy, AUC and accuracy.

    ``optimizer``: an existing one instead (a twin that trains the same variables).
    """
    import keras

    if optimizer is None:
        schedule = keras.optimizers.schedules.CosineDecay(
            learning_rate, max(1, steps), alpha=0.05
        )
        if weight_decay:
            optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
        else:
            optimizer = keras.optimizers.Adam(schedule)
    model.compile(
        optimizer=optimizer,
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="acc")],
    )


def load_split(features_npy: Path, chunks_csv: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """A split's cached features (memory-mapped) and its chunk table."""
    from n6qat.dataset import read_table
    from n6qat.features import load_features

    chunks = read_table(chunks_csv)
    return load_features(features_npy), chunks


def backup_dir(base: Path, settings: dict, inputs: tuple[str, ...] = ()) -> Path:
    """A folder for epoch backups keyed by the settings and the inputs' sizes and times.

    A rerun with a changed config or changed inputs never resumes stale state.
    """
    import hashlib
    import json
    import os

    stamps = [(str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in inputs]
    blob = json.dumps([settings, stamps], sort_keys=True, default=str).encode()
    key = hashlib.blake2b(blob, digest_size=6).hexdigest()
    return Path(base) / key


def pretrain(
    model,
    train: tuple[np.ndarray, pd.DataFrame],
    val: tuple[np.ndarray, pd.DataFrame],
    upsampled: pd.DataFrame,
    n_classes: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    checkpoint_dir: Path,
    seed: int = 0,
    trainable_head_only: bool = False,
    min_epochs: int = 0,
):
    """Train ``model`` in place, keeping the epoch with the lowest validation loss.

    Early stopping (``patience`` epochs without a better validation loss) never stops
    before ``min_epochs``. The steps run on a twin whose BatchNormalizations are fused
    (``n6qat.fused_batch_norm``); ``model`` is compiled with the same optimizer, so it
    is saved with the optimizer state as before.

    Returns the ``n6qat.fit.FitResult``; a rerun with the same ``checkpoint_dir``
    resumes after the last finished epoch, with the same result as an uninterrupted run.
    """
    from n6qat.fit import Selection, fit_epochs
    from n6qat.fused_batch_norm import fused_trainer

    train_batches, val_ds = epoch_batches(train, val, upsampled, n_classes, batch_size, seed)
    if trainable_head_only:
        for layer in model.layers[:-1]:
            layer.trainable = False
    steps = epochs * int(np.ceil(len(train_batches) / batch_size))
    compile_classifier(model, learning_rate, steps)
    trainer = fused_trainer(model)
    if trainer is not model:
        compile_classifier(trainer, learning_rate, steps, optimizer=model.optimizer)
    log.info("training on %d chunks per epoch (%d unique), %d validation chunks",
             len(train_batches), int(train_batches.x.shape[0]), len(val[1]))
    result = fit_epochs(
        trainer, model, train_batches, val_ds, epochs, checkpoint_dir,
        Selection("val_loss", "min", patience=patience, min_epochs=min_epochs), seed,
    )
    for layer in model.layers:
        layer.trainable = True
    return result


def pretrain_rule(
    model, inputs, n_classes: int, cfg: dict, checkpoint_dir: Path, epochs: int,
    trainable_head_only: bool = False,
):
    """``pretrain`` on a rule's inputs with config section ``model`` (``cfg``).

    ``inputs`` names the cached features and tables: ``train``, ``train_chunks``,
    ``val``, ``val_chunks`` and ``upsampled`` (the training set after upsampling).
    """
    from n6qat.dataset import read_table

    return pretrain(
        model,
        load_split(inputs.train, inputs.train_chunks),
        load_split(inputs.val, inputs.val_chunks),
        read_table(inputs.upsampled),
        n_classes=n_classes,
        epochs=epochs,
        batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"],
        patience=cfg["patience"],
        min_epochs=cfg["min_epochs"],
        checkpoint_dir=checkpoint_dir,
        seed=cfg["seed"],
        trainable_head_only=trainable_head_only,
    )


def prepare_rule(
    checkpoint: Path, inputs, settings, cfg: dict, threads: int, backup_base: Path,
    out_model: Path, out_info: Path,
) -> None:
    """Check ``checkpoint`` against the features and classes, swap and train its head if
    config section ``model`` (``cfg``) asks, and save it as the pretrained model.

    ``inputs`` names the labels file and what ``pretrain_rule`` reads. Runs as rule
    ``prepare_pretrained`` on a user's checkpoint, and inside ``pretrain`` on the model it
    has just saved (the same function on the same file: the same bytes, one process fewer).
    """
    from n6qat.model import prepare_pretrained, read_labels, save_model, write_json

    labels = read_labels(inputs.labels)
    model, info, replaced = prepare_pretrained(
        checkpoint, labels, settings, labels_file=cfg["labels"], safe_mode=cfg["safe_mode"],
        replace=cfg["replace_head"], seed=cfg["seed"], train_frontend=not cfg["freeze_frontend"],
    )
    if replaced:
        log.info("classifier head replaced for %d classes; training it", len(labels))
        backup = backup_dir(backup_base, {**cfg, "threads": threads}, tuple(inputs))
        result = pretrain_rule(
            model, inputs, len(labels), cfg, backup, epochs=cfg["head_epochs"],
            trainable_head_only=True,
        )
        info["head_training"] = {"best_epoch": result.best_epoch, "epochs": result.history}
        finish_backup(backup)
    save_model(model, out_model)
    write_json(out_info, info)


def finish_backup(checkpoint_dir: Path) -> None:
    """Drop a finished run's epoch backups."""
    import shutil

    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def write_history(result, path: Path) -> None:
    """Per-epoch metrics of a ``FitResult`` as a CSV (one row per epoch), written atomically."""
    from n6qat.atomic import atomic_path

    with atomic_path(path) as tmp:
        result.table().to_csv(tmp)
