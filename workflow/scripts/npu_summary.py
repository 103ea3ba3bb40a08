"""results/npu/summary.json: the host check's estimates beside stedgeai's numbers."""

import json

from n6qat.atomic import write_text
from n6qat.npu_summary import read_by_model, summarize_npu
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    models = snakemake.params.models
    summary = summarize_npu(
        read_by_model(models, snakemake.input.host),
        read_by_model(models, snakemake.input.stedgeai),
    )
    write_text(snakemake.output[0], json.dumps(summary, indent=2) + "\n")
