"""The INT8 gate of every converted model as one table: what was measured, against what."""

import json
from pathlib import Path

from n6qat.atomic import write_text
from n6qat.gate import gate_table
from n6qat.report import html_table
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]) as log:
    reports = {
        name: json.loads(Path(path).read_text())
        for name, path in zip(snakemake.params.models, snakemake.input.reports, strict=True)
    }
    table = gate_table(reports)
    log.info("INT8 gate:\n%s", table.to_string())
    note = (
        "Validation split. Simulation fidelity: the TFLite against the model's INT8 "
        "simulation. Losses in points (percentage points; cmAP x 100); positive: the INT8 "
        "model is worse. The output cosine against the float model is a diagnostic only."
    )
    write_text(snakemake.output.table, html_table(table, "INT8 gate per model", note))
