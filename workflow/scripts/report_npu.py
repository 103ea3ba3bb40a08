"""The N6 check per INT8 model: NPU vs CPU ops, memory against the pools, stedgeai's numbers."""

from n6qat.atomic import write_text
from n6qat.npu_summary import read_by_model
from n6qat.report import html_table
from n6qat.report_figures import plot_npu, save_figure
from n6qat.report_tables import npu_table
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    models = snakemake.params.models
    host = read_by_model(models, snakemake.input.host)
    tool = read_by_model(models, snakemake.input.stedgeai)
    save_figure(plot_npu(host, tool), snakemake.output.figure)
    note = (
        "Host check: n6qat's own analysis of the .tflite (always runs). stedgeai rows appear "
        "when ST Edge AI Core was found."
    )
    write_text(snakemake.output.table, html_table(npu_table(host, tool), "STM32N6 check", note))
