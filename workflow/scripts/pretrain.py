"""Train the FP32 DS-CNN on the cached features (thin adapter over n6qat.train)."""

from n6qat.features import FeatureSettings
from n6qat.model import build_dscnn, read_labels, save_model
from n6qat.rulelog import rule_logging
from n6qat.train import (
    backup_dir,
    configure_runtime,
    finish_backup,
    prepare_rule,
    pretrain_rule,
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
    result = pretrain_rule(
        model, snakemake.input, len(labels), cfg, backup, epochs=cfg["epochs"]
    )
    save_model(model, snakemake.output.model)
    write_history(result, snakemake.output.history)
    if "pretrained" in snakemake.output.keys():  # no model.pretrained: prepare this model
        # Its classes are the dataset's, so no head is swapped and no backup is written.
        prepare_rule(
            snakemake.output.model, snakemake.input, settings, cfg, snakemake.params.threads,
            snakemake.params.backup, snakemake.output.pretrained, snakemake.output.info,
        )
    finish_backup(backup)
