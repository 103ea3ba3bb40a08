"""The summary table with the QAT-INT8 / PTQ-INT8 / FP32 differences, and its bar chart."""

import pandas as pd

from n6qat.atomic import atomic_path, write_text
from n6qat.report import html_table
from n6qat.report_figures import plot_summary, save_figure
from n6qat.report_tables import summary_with_deltas
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]) as log:
    summary = pd.read_csv(snakemake.input.summary)
    table = summary_with_deltas(summary)
    log.info("summary with differences:\n%s", table.to_string())
    with atomic_path(snakemake.output.csv) as tmp:
        table.to_csv(tmp)
    note = (
        "Test split; file level pools each file's chunk scores. Δ rows: first model minus "
        "second (positive: the first is better, except for latency)."
    )
    write_text(snakemake.output.table, html_table(table, "Test metrics per model", note))
    save_figure(plot_summary(summary), snakemake.output.figure)
