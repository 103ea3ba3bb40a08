"""Quantization-aware fine-tuning of the pretrained model (thin adapter over n6qat.qat)."""

from n6qat.convert import calibration_set
from n6qat.dataset import read_table
from n6qat.model import load_model, read_labels, save_model
from n6qat.qat import QATSettings, run_qat
from n6qat.rulelog import rule_logging
from n6qat.train import (
    backup_dir,
    configure_threads,
    finish_backup,
    load_split,
    split_datasets,
    write_history,
)

with rule_logging(snakemake.log[0]) as log:
    configure_threads(snakemake.threads)
    cfg = snakemake.params.qat
    settings = QATSettings(
        epochs=cfg["epochs"],
        learning_rate=cfg["learning_rate"],
        batch_size=cfg["batch_size"],
        optimizer=cfg["optimizer"],
        weight_decay=cfg["weight_decay"],
        clipnorm=cfg["clipnorm"],
        per_channel=cfg["per_channel"],
        simulate_activations=cfg["simulate_activations"],
        frozen_layers=tuple(cfg["freeze"]),
        seed=cfg["seed"],
    )
    labels = read_labels(snakemake.input.labels)
    model = load_model(snakemake.input.model)
    train = load_split(snakemake.input.train, snakemake.input.train_chunks)
    train_ds, val_ds = split_datasets(
        train,
        load_split(snakemake.input.val, snakemake.input.val_chunks),
        read_table(snakemake.input.upsampled),
        n_classes=len(labels),
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    backup = backup_dir(snakemake.params.backup, cfg, tuple(snakemake.input))
    log.info("QAT: %s", settings)
    history = run_qat(
        model, train_ds, val_ds, settings, checkpoint_dir=backup,
        calibration=calibration_set(*train, snakemake.params.calibration),
    )
    save_model(model, snakemake.output.model)
    write_history(history, snakemake.output.history)
    finish_backup(backup, None)
