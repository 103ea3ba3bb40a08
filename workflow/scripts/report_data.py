"""Class counts before and after upsampling, and the files the index rejected."""

import pandas as pd

from n6qat.atomic import write_text
from n6qat.report import rejected_html
from n6qat.report_figures import plot_class_counts, save_figure
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    counts = pd.read_csv(snakemake.input.counts)
    save_figure(plot_class_counts(counts, snakemake.params.negatives), snakemake.output.counts)
    rejected = pd.read_csv(snakemake.input.rejected, dtype=str, keep_default_na=False)
    write_text(snakemake.output.rejected, rejected_html(rejected))
