"""The INT8 gate: judge one converted model, publish it if it passes (adapter over n6qat.gate)."""

from pathlib import Path

from n6qat.gate import gate_candidate
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    ptq_report = snakemake.input.get("ptq_report")
    gate_candidate(
        Path(snakemake.input.tflite),
        Path(snakemake.input.report),
        snakemake.params.convert,
        out_tflite=Path(snakemake.output.tflite),
        out_report=Path(snakemake.output.report),
        ptq_report=Path(ptq_report) if ptq_report else None,
    )
