"""Check the FP32 checkpoint against features and classes; swap the head if asked."""

from n6qat.features import FeatureSettings
from n6qat.rulelog import rule_logging
from n6qat.train import configure_runtime, prepare_rule

with rule_logging(snakemake.log[0]):
    configure_runtime(snakemake.params.threads, snakemake.params.model["seed"])
    prepare_rule(
        snakemake.input.checkpoint, snakemake.input,
        FeatureSettings.from_dict(snakemake.params.settings), snakemake.params.model,
        snakemake.params.threads, snakemake.params.backup,
        snakemake.output.model, snakemake.output.info,
    )
