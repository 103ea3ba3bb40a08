"""Quantization-aware fine-tuning of the pretrained model (thin adapter over n6qat.qat)."""

from n6qat.convert import calibration_set
from n6qat.dataset import read_table
from n6qat.gate import GateSettings
from n6qat.model import load_model, read_labels, save_model
from n6qat.qat import QATSettings, ValidationFiles, run_qat
from n6qat.rulelog import rule_logging
from n6qat.train import (
    backup_dir,
    configure_runtime,
    epoch_batches,
    finish_backup,
    load_split,
    write_history,
)

with rule_logging(snakemake.log[0]) as log:
    configure_runtime(snakemake.params.threads, snakemake.params.qat["seed"])
    cfg = snakemake.params.qat
    settings = QATSettings.from_config(cfg)
    labels = read_labels(snakemake.input.labels)
    model = load_model(snakemake.input.model)
    reference = snakemake.input.reference
    # The INT8 gate's FP32 reference: the pretrained model, when QAT starts from its
    # equalized copy (otherwise the starting model itself).
    reference = None if reference == snakemake.input.model else load_model(reference)
    train = load_split(snakemake.input.train, snakemake.input.train_chunks)
    val = load_split(snakemake.input.val, snakemake.input.val_chunks)
    train_batches, val_ds = epoch_batches(
        train, val, read_table(snakemake.input.upsampled), n_classes=len(labels),
        batch_size=settings.batch_size, seed=settings.seed,
    )
    evaluate = snakemake.params.evaluate
    backup = backup_dir(
        snakemake.params.backup,
        {"qat": cfg, "calibration": snakemake.params.calibration, "evaluate": evaluate,
         "threads": snakemake.params.threads},
        tuple(snakemake.input),
    )
    log.info("QAT: %s", settings)
    result = run_qat(
        model, train_batches, val_ds, settings, checkpoint_dir=backup,
        calibration=calibration_set(*train, snakemake.params.calibration),
        selection_files=ValidationFiles(
            val[0], val[1], labels, evaluate["pooling"], evaluate["threshold"],
            io_dtype=snakemake.params.calibration["io_dtype"],
        ),
        gate=GateSettings.from_config(snakemake.params.calibration),
        reference=reference,
    )
    save_model(model, snakemake.output.model)
    write_history(result, snakemake.output.history)
    finish_backup(backup)
