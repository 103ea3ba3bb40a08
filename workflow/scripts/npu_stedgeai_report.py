"""Parse one model's stedgeai step folders into results/npu/<model>_stedgeai.json; without
the tool, say on the console that only the host check ran."""

import json
import os
from pathlib import Path

from n6qat.atomic import write_text
from n6qat.npu_summary import collect_report
from n6qat.rulelog import rule_logging

console = os.fdopen(os.dup(2), "w")  # rule_logging sends fd 2 to the log from here on
with rule_logging(snakemake.log[0]) as log:
    model = snakemake.wildcards.model
    folders = {Path(folder).name: Path(folder) for folder in snakemake.input}  # by step
    report = collect_report(model, folders)
    write_text(snakemake.output[0], json.dumps(report, indent=2) + "\n")
    if not report["available"]:
        note = f"{model}: {report['message']} (looked in {'; '.join(report['looked_in'])})"
        log.warning("%s", note)
        console.write(f"\nn6qat: {note}\n")
        console.flush()
