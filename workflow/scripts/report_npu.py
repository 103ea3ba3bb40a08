"""The N6 check per INT8 model: NPU vs CPU ops, memory against the pools, stedgeai's numbers."""

import json
from pathlib import Path

from n6qat.atomic import write_text
from n6qat.report import html_table, npu_table, plot_npu, save_figure
from n6qat.rulelog import rule_logging


def read_by_model(paths):
    return {
        m: json.loads(Path(p).read_text())
        for m, p in zip(snakemake.params.models, paths, strict=True)
    }


with rule_logging(snakemake.log[0]):
    host, tool = read_by_model(snakemake.input.host), read_by_model(snakemake.input.stedgeai)
    save_figure(plot_npu(host, tool), snakemake.output.figure)
    note = (
        "Host check: n6qat's own analysis of the .tflite (always runs). stedgeai rows appear "
        "when ST Edge AI Core was found."
    )
    write_text(snakemake.output.table, html_table(npu_table(host, tool), "STM32N6 check", note))
