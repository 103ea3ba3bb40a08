"""Float vs INT8 scores of the test chunks: FP32 vs PTQ-INT8 and QAT-FP32 vs QAT-INT8."""

import numpy as np

from n6qat.names import short_name
from n6qat.report_figures import plot_output_scatter, save_figure
from n6qat.report_tables import output_agreement
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]) as log:
    scores = {
        name: np.load(path)["scores"]
        for name, path in zip(snakemake.params.models, snakemake.input.scores, strict=True)
    }
    pairs = {
        f"{short_name(ref)} vs {short_name(test)}": (scores[ref], scores[test])
        for ref, test in snakemake.params.pairs
    }
    for title, (ref, test) in pairs.items():
        log.info("%s: %s", title, output_agreement(ref, test))
    save_figure(plot_output_scatter(pairs), snakemake.output.figure)
