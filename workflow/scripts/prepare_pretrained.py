"""Check the FP32 checkpoint against features and classes; swap the head if asked."""

from n6qat.features import FeatureSettings
from n6qat.model import prepare_pretrained, read_labels, save_model, write_json
from n6qat.rulelog import rule_logging
from n6qat.train import backup_dir, configure_runtime, finish_backup, pretrain_rule

with rule_logging(snakemake.log[0]) as log:
    configure_runtime(snakemake.params.threads, snakemake.params.model["seed"])
    cfg = snakemake.params.model
    labels = read_labels(snakemake.input.labels)
    model, info, replaced = prepare_pretrained(
        snakemake.input.checkpoint,
        labels,
        FeatureSettings.from_dict(snakemake.params.settings),
        labels_file=cfg["labels"],
        safe_mode=cfg["safe_mode"],
        replace=cfg["replace_head"],
        seed=cfg["seed"],
        train_frontend=not cfg["freeze_frontend"],
    )
    if replaced:
        log.info("classifier head replaced for %d classes; training it", len(labels))
        backup = backup_dir(
            snakemake.params.backup, {**cfg, "threads": snakemake.params.threads},
            tuple(snakemake.input),
        )
        result = pretrain_rule(
            model, snakemake.input, len(labels), cfg, backup, epochs=cfg["head_epochs"],
            trainable_head_only=True,
        )
        info["head_training"] = {"best_epoch": result.best_epoch, "epochs": result.history}
        finish_backup(backup)
    save_model(model, snakemake.output.model)
    write_json(snakemake.output.info, info)
