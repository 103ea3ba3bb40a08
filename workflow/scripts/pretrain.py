"""Train the FP32 DS-CNN on the cached features (thin adapter over n6qat.train)."""

from n6qat.dataset import read_table
from n6qat.features import FeatureSettings
from n6qat.model import build_dscnn, read_labels, save_model
from n6qat.rulelog import rule_logging
from n6qat.train import (
    backup_dir,
    configure_runtime,
    finish_backup,
    load_split,
    pretrain,
    write_history,
)

with rule_logging(snakemake.log[0]) as log:
    configure_runtime(snakemake.params.threads, snakemake.params.model["seed"])
    cfg = snakemake.params.model
    settings = FeatureSettings.from_dict(snakemake.params.settings)
    labels = read_labels(snakemake.input.labels)
    model = build_dscnn(
        settings, len(labels), width=cfg["width"], depth=cfg["depth"],
        dropout=cfg["dropout"], seed=cfg["seed"],
    )
    log.info("DS-CNN: %d parameters, input %s", model.count_params(), settings.input_shape)
    backup = backup_dir(
        snakemake.params.backup,
        {**cfg, **settings.to_dict(), "threads": snakemake.params.threads},
        tuple(snakemake.input),
    )
    result = pretrain(
        model,
        load_split(snakemake.input.train, snakemake.input.train_chunks),
        load_split(snakemake.input.val, snakemake.input.val_chunks),
        read_table(snakemake.input.upsampled),
        n_classes=len(labels),
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"],
        patience=cfg["patience"],
        min_epochs=cfg["min_epochs"],
        checkpoint_dir=backup,
        seed=cfg["seed"],
    )
    save_model(model, snakemake.output.model)
    write_history(result, snakemake.output.history)
    finish_backup(backup)
