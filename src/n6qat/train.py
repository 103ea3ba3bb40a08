"""Float training on the cached features: datasets, targets, the pretraining loop."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def configure_threads(threads: int) -> None:
    """Give TensorFlow the rule's threads (call before any TensorFlow op runs)."""
    import tensorflow as tf

    threads = max(1, int(threads))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))


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


def make_dataset(
    features: np.ndarray,
    targets: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
):
    """A tf.data pipeline over the given feature rows (features cast to float32)."""
    import tensorflow as tf

    x = np.asarray(features[np.sort(np.unique(rows))], dtype=np.float32)
    remap = {r: i for i, r in enumerate(np.sort(np.unique(rows)))}
    idx = np.array([remap[r] for r in rows], dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((x[idx], targets[rows]))
    if shuffle:
        ds = ds.shuffle(len(idx), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def split_datasets(
    train: tuple[np.ndarray, pd.DataFrame],
    val: tuple[np.ndarray, pd.DataFrame],
    upsampled: pd.DataFrame,
    n_classes: int,
    batch_size: int,
    seed: int = 0,
):
    """Shuffled, upsampled training batches and ordered validation batches."""
    (x_train, train_chunks), (x_val, val_chunks) = train, val
    train_ds = make_dataset(
        x_train, multi_hot(train_chunks["label_index"], n_classes),
        training_rows(train_chunks, upsampled), batch_size, True, seed,
    )
    val_ds = make_dataset(
        x_val, multi_hot(val_chunks["label_index"], n_classes),
        val_chunks["row"].to_numpy(), batch_size, False,
    )
    return train_ds, val_ds


def compile_classifier(model, learning_rate: float, steps: int, weight_decay: float = 0.0):
    """Adam(W) with cosine decay over ``steps``, binary cross-entropy, AUC and accuracy."""
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps), alpha=0.05)
    if weight_decay:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.Adam(schedule)
    model.compile(
        optimizer=optimizer,
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="acc")],
    )


def fit_classifier(
    model,
    train_ds,
    val_ds,
    epochs: int,
    patience: int,
    checkpoint_dir: Path,
):
    """Train with early stopping on validation loss, keeping the best epoch's weights.

    Progress is backed up after every epoch to ``checkpoint_dir/epochs`` and the
    per-epoch metrics appended to ``checkpoint_dir/history.csv``; a rerun after an
    interruption resumes from the last finished epoch (model and optimizer state).
    """
    import keras

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [
        keras.callbacks.BackupAndRestore(  # double: a save torn by a kill falls back
            str(checkpoint_dir / "epochs"), save_freq="epoch", double_checkpoint=True
        ),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, restore_best_weights=True
        ),
        keras.callbacks.CSVLogger(str(checkpoint_dir / "history.csv"), append=True),
    ]
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, verbose=2
    )
    return history.history


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
) -> dict:
    """Train ``model`` in place on the upsampled training chunks; returns the history."""
    train_ds, val_ds = split_datasets(train, val, upsampled, n_classes, batch_size, seed)
    rows = training_rows(train[1], upsampled)
    val_chunks = val[1]
    if trainable_head_only:
        for layer in model.layers[:-1]:
            layer.trainable = False
    steps = epochs * int(np.ceil(len(rows) / batch_size))
    compile_classifier(model, learning_rate, steps)
    log.info("training on %d chunks per epoch (%d unique), %d validation chunks",
             len(rows), len(np.unique(rows)), len(val_chunks))
    history = fit_classifier(model, train_ds, val_ds, epochs, patience, checkpoint_dir)
    for layer in model.layers:
        layer.trainable = True
    return history


def finish_backup(checkpoint_dir: Path, history_out: Path | None) -> None:
    """Move the finished run's history to its output and drop the epoch backups."""
    import shutil

    from n6qat.atomic import atomic_path

    checkpoint_dir = Path(checkpoint_dir)
    if history_out is not None:
        with atomic_path(history_out) as tmp:
            shutil.copyfile(checkpoint_dir / "history.csv", tmp)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def write_history(history: dict[str, list[float]], path: Path) -> None:
    """Per-epoch metrics as a CSV (one row per epoch), written atomically."""
    from n6qat.atomic import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame(history).rename_axis("epoch").to_csv(tmp)
