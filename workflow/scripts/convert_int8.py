"""Full-INT8 conversion of one float model, measured for the gate (adapter over n6qat.convert)."""

from pathlib import Path

from n6qat.convert import convert_and_measure
from n6qat.model import load_model, read_labels
from n6qat.rulelog import rule_logging
from n6qat.train import configure_runtime, load_split

with rule_logging(snakemake.log[0]):
    configure_runtime(snakemake.params.threads)
    convert_and_measure(
        load_model(snakemake.input.model),
        name=snakemake.wildcards.model,
        train=load_split(snakemake.input.train, snakemake.input.train_chunks),
        val=load_split(snakemake.input.val, snakemake.input.val_chunks),
        settings=snakemake.params.convert,
        out_tflite=Path(snakemake.output.tflite),
        out_validation=Path(snakemake.output.validation),
        out_report=Path(snakemake.output.report),
        labels=read_labels(snakemake.input.labels),
        reference=load_model(snakemake.input.reference),
        pooling=snakemake.params.evaluate["pooling"],
        threshold=snakemake.params.evaluate["threshold"],
        out_layers=Path(snakemake.output.layers),
        layer_samples=snakemake.params.layer_samples,
        out_weights=Path(snakemake.output.weights),
    )
