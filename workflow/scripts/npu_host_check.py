"""Host-side STM32N6 check of one INT8 model (thin adapter over n6qat.n6)."""

from n6qat.n6 import check_and_report
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    check_and_report(
        snakemake.input.model,
        snakemake.input.validation,
        json_path=snakemake.output.json,
        txt_path=snakemake.output.txt,
        strict=snakemake.params.strict,
        num_threads=snakemake.threads,
    )
