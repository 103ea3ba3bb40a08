"""Host-side STM32N6 check of a full-INT8 .tflite, for users with or without `stedgeai`.

It runs the operator rules of `n6qat.n6_ops` (NPU or CPU per op, the quantization scheme,
the shapes), estimates weight bytes and peak activation memory against the N6's on-chip
RAM, measures the INT8 model against the float model on the validation .npz with the
metrics of `stedgeai validate`, and writes the JSON and text reports. Errors stop the
workflow (unless npu.strict is false); warnings cost speed or memory but the model runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from n6qat.atomic import write_text
from n6qat.errors import N6QATError
from n6qat.litert import run_tflite
from n6qat.metrics import METRIC_NAMES, stedgeai_metrics
from n6qat.n6_ops import (
    Finding,
    OperatorPlacement,
    int8_findings,
    place_operators,
    placement_findings,
    quantization_findings,
    shape_findings,
)
from n6qat.tflite_inspect import ModelInfo, read_tflite
from n6qat.validation_npz import load_validation_npz

log = logging.getLogger(__name__)

# On-chip RAM for activations: the NPU's banks, then the CPU's cpuRAM2.
NPU_BANK_BYTES = 448 * 1024  # npuRAM3..6 (AXISRAM3-6), one bank each
NPU_BANKS = 4
CPURAM2_BYTES = 1024 * 1024
HOST_METRICS_ROW = "HOST int8 vs float"


@dataclass
class MemoryEstimate:
    """Flash for weights and the peak of live activations along the execution order."""

    weights_bytes: int
    peak_activation_bytes: int
    peak_op: int | None
    peak_opcode: str | None
    fits: str
    fits_one_npu_bank: bool
    fits_npu_banks: bool
    fits_on_chip: bool


@dataclass
class HostCheck:
    """Everything the host check found about one model."""

    source: str
    operators: list[OperatorPlacement]
    findings: list[Finding]
    memory: MemoryEstimate
    macc: int
    io: dict
    metrics: dict | None = None
    validation_samples: int | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def clean(self) -> bool:
        """True when nothing stops the model from running on the NPU (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            clean=self.clean, error_count=len(self.errors), warning_count=len(self.warnings)
        )
        return data


def check_model(
    model: str | Path | bytes, validation_npz: str | Path | None = None, num_threads: int = 1
) -> HostCheck:
    """Run the whole host check on a .tflite (path or bytes); N6QATError on unusable input."""
    info = read_tflite(model)
    placements = place_operators(info)
    memory = estimate_memory(info)
    findings = [
        *int8_findings(info),
        *placement_findings(info, placements),
        *quantization_findings(info),
        *shape_findings(info),
        *memory_findings(memory),
    ]
    check = HostCheck(
        source=info.source,
        operators=placements,
        findings=findings,
        memory=memory,
        macc=sum(p.macc for p in placements),
        io=_io_summary(info),
    )
    if validation_npz is not None:
        metrics, samples, problems = validation_metrics(info, model, validation_npz, num_threads)
        check.metrics, check.validation_samples = metrics, int(samples)
        check.findings += problems
    return check


# --- memory ------------------------------------------------------------------------------


def estimate_memory(info: ModelInfo) -> MemoryEstimate:
    """Weight bytes and the peak activation bytes, against the N6's on-chip pools."""
    weights = sum(t.size_bytes for t in info.tensors if t.is_constant)
    live = live_activation_bytes(info)
    peak_op = int(np.argmax(live)) if live else None
    peak = int(live[peak_op]) if live else 0
    return MemoryEstimate(
        weights_bytes=int(weights),
        peak_activation_bytes=peak,
        peak_op=peak_op,
        peak_opcode=info.operators[peak_op].opcode if peak_op is not None else None,
        fits=activation_fit(peak),
        fits_one_npu_bank=peak <= NPU_BANK_BYTES,
        fits_npu_banks=peak <= NPU_BANKS * NPU_BANK_BYTES,
        fits_on_chip=peak <= NPU_BANKS * NPU_BANK_BYTES + CPURAM2_BYTES,
    )


def live_activation_bytes(info: ModelInfo) -> list[int]:
    """Bytes of activations alive while each op runs.

    A tensor lives from the op that writes it (graph inputs: from the start) to its last
    reader (graph outputs: to the end); constants are weights, not activations.
    """
    last = len(info.operators) - 1
    start = {i: 0 for i in info.inputs}
    end = {i: last for i in info.outputs}
    for op in info.operators:
        for t in op.outputs:
            start.setdefault(t, op.index)
        for t in op.inputs:
            if t >= 0:
                end[t] = max(end.get(t, op.index), op.index)
    spans = [
        (first, max(end.get(t, first), first), info.tensors[t].size_bytes)
        for t, first in start.items()
        if not info.tensors[t].is_constant
    ]
    return [sum(size for a, b, size in spans if a <= i <= b) for i in range(last + 1)]


def activation_fit(peak_bytes: int) -> str:
    """The smallest on-chip memory that holds `peak_bytes` of activations."""
    if peak_bytes <= NPU_BANK_BYTES:
        return "one npuRAM bank (448 KiB)"
    if peak_bytes <= NPU_BANKS * NPU_BANK_BYTES:
        return "four npuRAM banks (1792 KiB)"
    if peak_bytes <= NPU_BANKS * NPU_BANK_BYTES + CPURAM2_BYTES:
        return "npuRAM banks + cpuRAM2 (2816 KiB)"
    return "does not fit on-chip (external hyperRAM)"


def memory_findings(memory: MemoryEstimate) -> list[Finding]:
    if memory.fits_on_chip:
        return []
    message = (
        f"peak activations of {memory.peak_activation_bytes:,} B (at op {memory.peak_op} "
        f"{memory.peak_opcode}) exceed the on-chip 4 x 448 KiB npuRAM + 1 MiB cpuRAM2 and "
        "spill to external RAM (slow): shrink the input or the early layers"
    )
    return [Finding("warning", "memory", message, memory.peak_op)]


def _io_summary(info: ModelInfo) -> dict:
    def describe(index: int) -> dict:
        t = info.tensors[index]
        return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}

    return {
        "inputs": [describe(i) for i in info.inputs],
        "outputs": [describe(i) for i in info.outputs],
    }


# --- numbers -----------------------------------------------------------------------------


def _check_validation_fits(info: ModelInfo, inputs: np.ndarray, outputs: np.ndarray) -> None:
    expected_in = tuple(info.tensors[info.inputs[0]].shape[1:]) if info.inputs else ()
    expected_out = tuple(info.tensors[info.outputs[0]].shape[1:]) if info.outputs else ()
    if inputs.shape[1:] != expected_in or outputs.shape[1:] != expected_out:
        raise N6QATError(
            f"validation data of shapes {inputs.shape} -> {outputs.shape} does not fit "
            f"{info.source} ((N, {', '.join(map(str, expected_in))}) -> "
            f"(N, {', '.join(map(str, expected_out))})); it belongs to another model"
        )
    if len(inputs) != len(outputs) or len(inputs) == 0:
        raise N6QATError(
            f"validation data has {len(inputs)} inputs and {len(outputs)} outputs; "
            "it needs as many of each, at least one"
        )


def validation_metrics(
    info: ModelInfo, model: str | Path | bytes, npz_path: str | Path, num_threads: int = 1
) -> tuple[dict | None, int, list[Finding]]:
    """(metrics rows, samples, findings): the INT8 model run by LiteRT on the .npz inputs
    against the float outputs. A model LiteRT cannot run gives an error finding."""
    inputs, outputs = load_validation_npz(npz_path)
    reference = outputs.astype(np.float32)
    _check_validation_fits(info, inputs, reference)
    try:
        test = run_tflite(model, inputs, num_threads=num_threads)
    except N6QATError as err:
        problem = Finding("error", "numerics", f"no numerical validation: {err}")
        return None, len(inputs), [problem]
    return {HOST_METRICS_ROW: stedgeai_metrics(reference, test)}, len(inputs), []


# --- reports -----------------------------------------------------------------------------


def format_host_check(check: HostCheck) -> str:
    """The readable report: verdict, operators, findings, memory and the metrics table."""
    verdict = "N6-clean" if check.clean else "NOT N6-clean"
    lines = [
        f"STM32N6 host check: {check.source}",
        f"verdict: {verdict} ({_counted(check.errors, 'error')}, "
        f"{_counted(check.warnings, 'warning')})",
        "",
        *_operator_table(check.operators),
        "",
        "Findings" + ("" if check.findings else ": none"),
        *(_finding_line(f) for f in check.findings),
        "",
        *_memory_lines(check),
    ]
    if check.metrics:
        lines += ["", *format_metrics_table(check.metrics, check.validation_samples)]
    return "\n".join(lines) + "\n"


def _counted(items: list, noun: str) -> str:
    """How many items, with the noun in the right number: "3 errors", "1 warning"."""
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _operator_table(placements: list[OperatorPlacement]) -> list[str]:
    header = f"{'#':>4}  {'operator':<20} {'unit':<4}  {'position':<16} {'output':<16} {'MACC':>12}"
    rows = [
        f"{p.index:>4}  {p.opcode:<20} {p.unit:<4}  {p.position:<16} "
        f"{'x'.join(map(str, p.output_shape)):<16} {p.macc:>12,}"
        for p in placements
    ]
    return ["Operators in execution order", header, *rows]


def _finding_line(finding: Finding) -> str:
    return f"  {finding.level:<7} [{finding.check}] {finding.message}"


def _memory_lines(check: HostCheck) -> list[str]:
    m = check.memory
    where = f" at op {m.peak_op} {m.peak_opcode}" if m.peak_op is not None else ""
    return [
        "Memory and compute",
        f"  weights (flash)      : {m.weights_bytes:,} B",
        f"  peak activations     : {m.peak_activation_bytes:,} B{where}",
        f"  activations fit in   : {m.fits}",
        f"  MACC                 : {check.macc:,}",
    ]


def format_metrics_table(rows: dict[str, dict], samples: int | None = None) -> list[str]:
    """Metric rows in the column layout of stedgeai's evaluation report."""
    title = "Evaluation report (INT8 model vs float model" + (
        f", {samples} samples)" if samples is not None else ")"
    )
    lines = [title, _table_line("Output", METRIC_NAMES)]
    for name, metrics in rows.items():
        lines.append(_table_line(name, [_metric_cell(k, metrics.get(k)) for k in METRIC_NAMES]))
    return lines


def _table_line(first: str, cells) -> str:
    return (f"{first:<22}" + "".join(f"{cell:<14}" for cell in cells)).rstrip()


def _metric_cell(name: str, value: float | None) -> str:
    if value is None:
        return "n.a."
    return f"{value:.2f}%" if name == "acc" else f"{value:.9f}"


def write_host_check(
    check: HostCheck, json_path: str | Path, txt_path: str | Path | None = None
) -> None:
    """Write the JSON (and, when given, the text) report, creating their folders."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(json_path, json.dumps(check.to_dict(), indent=2) + "\n")
    if txt_path is not None:
        Path(txt_path).parent.mkdir(parents=True, exist_ok=True)
        write_text(txt_path, format_host_check(check))


def check_and_report(
    model: str | Path,
    validation_npz: str | Path | None,
    json_path: str | Path,
    txt_path: str | Path,
    strict: bool = True,
    num_threads: int = 1,
) -> HostCheck:
    """The workflow's host check: write both reports, log them, then fail on errors when
    `strict` (npu.strict), else let the errors pass as warnings."""
    check = check_model(model, validation_npz, num_threads)
    write_host_check(check, json_path, txt_path)
    log.info("host check of %s:\n%s", model, format_host_check(check))
    if check.errors and strict:
        raise N6QATError(
            f"{model} is not N6-clean:\n  "
            + "\n  ".join(f.message for f in check.errors)
            + "\n(set npu.strict: false to report these as warnings and go on)"
        )
    for finding in check.errors:
        log.warning("npu.strict is false, so this error does not stop the run: %s", finding.message)
    return check
