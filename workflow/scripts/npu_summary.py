"""results/npu/summary.json: the host check's estimates beside stedgeai's numbers."""

import json
from pathlib import Path

from n6qat.atomic import write_text
from n6qat.rulelog import rule_logging
from n6qat.stedgeai import summarize_npu


def read_by_model(paths):
    return {
        m: json.loads(Path(p).read_text())
        for m, p in zip(snakemake.params.models, paths, strict=True)
    }


with rule_logging(snakemake.log[0]):
    summary = summarize_npu(
        read_by_model(snakemake.input.host), read_by_model(snakemake.input.stedgeai)
    )
    write_text(snakemake.output[0], json.dumps(summary, indent=2) + "\n")
