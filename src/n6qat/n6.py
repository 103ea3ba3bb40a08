"""Host-side STM32N6 check of a full-INT8 .tflite, for users with or without `stedgeai`.

It marks every operator as NPU-capable or CPU fallback (per the Neural-ART facts in
/work/shared/N6_FACTS.md), audits the quantization scheme and the shapes against the
NPU's limits, estimates weight bytes, peak activation memory and MACC, and measures the
INT8 model against the float model with the metrics of `stedgeai validate`.
Errors are what stops the model running well on the NPU (a CPU op mid-graph, float,
Flex or FakeQuant ops, a broken quantization scheme, batch > 1); warnings cost speed
or memory but the model still runs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from n6qat.atomic import write_text
from n6qat.errors import N6QATError
from n6qat.tflite_inspect import ModelInfo, OperatorInfo, int8_problems, read_tflite

log = logging.getLogger(__name__)

NPU_BANK_BYTES = 448 * 1024  # npuRAM3..6 (AXISRAM3-6), one bank each
NPU_BANKS = 4
CPURAM2_BYTES = 1024 * 1024
NPU_LANES = 8  # channel counts in multiples of 8 fill the NPU's vectors
MAX_KERNEL_HEIGHT = 3
MAX_KERNEL_WIDTH = {1: 6, 2: 12}  # by horizontal stride: 1, and 2 or more
MAX_POOL_WINDOW = 3

# Operators the Neural-ART NPU runs (MEAN only as a global average pool, QUANTIZE only
# int8 -> int8). SQUEEZE/EXPAND_DIMS are a RESHAPE by another name.
NPU_OPS = frozenset(
    "CONV_2D DEPTHWISE_CONV_2D FULLY_CONNECTED RELU RELU6 RELU_N1_TO_1 RELU_0_TO_1 LOGISTIC "
    "TANH HARD_SWISH ADD SUB MUL CONCATENATION PAD RESHAPE SQUEEZE EXPAND_DIMS TRANSPOSE "
    "AVERAGE_POOL_2D MAX_POOL_2D".split()
)
# Software ops expected at the graph's edges of a model with float32 I/O.
BOUNDARY_CPU_OPS = frozenset({"QUANTIZE", "DEQUANTIZE", "SOFTMAX", "LOGISTIC"})
WEIGHT_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}
ELEMENTWISE_OPS = frozenset({"ADD", "SUB", "MUL"})
POOL_OPS = frozenset({"AVERAGE_POOL_2D", "MAX_POOL_2D"})
METRIC_NAMES = ("acc", "rmse", "mae", "l2r", "mean", "std", "nse", "cos")
HOST_METRICS_ROW = "HOST int8 vs float"
_FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}


@dataclass
class Finding:
    """One problem: `level` "error" or "warning", `check` the audit that found it."""

    level: str
    check: str
    message: str
    op: int | None = None


@dataclass
class OperatorPlacement:
    """Where one operator runs: `unit` "NPU" or "CPU"; `position` along the graph."""

    index: int
    opcode: str
    unit: str
    position: str  # "input boundary", "output boundary" or "mid-graph"
    reason: str
    output_shape: list[int]
    macc: int


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


# --- where operators run ---------------------------------------------------------------


def place_operators(info: ModelInfo) -> list[OperatorPlacement]:
    """Each operator in execution order with its unit, graph position and MACC."""
    positions = graph_positions(info)
    placements = []
    for op in info.operators:
        on_npu, reason = npu_capable(info, op)
        out_shape = list(info.tensors[op.outputs[0]].shape) if op.outputs else []
        placements.append(
            OperatorPlacement(
                index=op.index,
                opcode=op.opcode,
                unit="NPU" if on_npu else "CPU",
                position=positions[op.index],
                reason=reason,
                output_shape=out_shape,
                macc=operator_macc(info, op),
            )
        )
    return placements


def npu_capable(info: ModelInfo, op: OperatorInfo) -> tuple[bool, str]:
    """(runs on the NPU, why) for one operator."""
    if op.custom_code is not None:
        kind = "select-TF (Flex)" if op.opcode.startswith("FLEX_") else "custom"
        return False, f"{kind} op"
    if op.opcode == "FAKE_QUANT":
        return False, "FakeQuant remnant"
    if op.opcode == "DEQUANTIZE":
        return False, "int8 -> float conversion"
    if op.opcode == "QUANTIZE":
        if info.tensors[op.inputs[0]].dtype in _FLOAT_DTYPES:
            return False, "float -> int8 conversion"
        return True, "int8 requantization"
    if _runs_in_float(info, op):
        return False, "float op"
    if op.opcode == "MEAN":
        if _is_global_average_pool(info, op):
            return True, "global average pool"
        return False, "MEAN that is not a global average pool"
    if op.opcode in NPU_OPS:
        return True, "NPU operator"
    return False, "not an NPU operator"


def _runs_in_float(info: ModelInfo, op: OperatorInfo) -> bool:
    touched = [i for i in (*op.inputs, *op.outputs) if i >= 0]
    return any(info.tensors[i].dtype in _FLOAT_DTYPES for i in touched)


def _is_global_average_pool(info: ModelInfo, op: OperatorInfo) -> bool:
    """A MEAN over height and width of a 4-D tensor: [1, H, W, C] -> [1, C] or [1, 1, 1, C]."""
    shape_in = info.tensors[op.inputs[0]].shape
    shape_out = info.tensors[op.outputs[0]].shape
    if len(shape_in) != 4:
        return False
    return int(np.prod(shape_out)) == shape_in[0] * shape_in[3] and shape_out[-1] == shape_in[3]


def graph_positions(info: ModelInfo) -> list[str]:
    """For each op: "input boundary", "output boundary" or "mid-graph".

    An op is at the input boundary when it reads only graph inputs or what CPU ops at the
    input boundary made of them; at the output boundary when everything it writes is a
    graph output or read only by CPU ops at the output boundary.
    """
    cpu = [not npu_capable(info, op)[0] for op in info.operators]
    positions = ["mid-graph"] * len(info.operators)
    from_inputs = set(info.inputs)
    for op in info.operators:
        if _live_inputs(info, op) <= from_inputs:
            positions[op.index] = "input boundary"
            if cpu[op.index]:
                from_inputs.update(op.outputs)
    consumers = _consumers(info)
    outputs, cpu_at_output = set(info.outputs), set()
    for op in reversed(info.operators):
        if op.outputs and all(
            t in outputs or (consumers[t] and set(consumers[t]) <= cpu_at_output)
            for t in op.outputs
        ):
            if positions[op.index] == "mid-graph":
                positions[op.index] = "output boundary"
            if cpu[op.index]:
                cpu_at_output.add(op.index)
    return positions


def _live_inputs(info: ModelInfo, op: OperatorInfo) -> set[int]:
    return {i for i in op.inputs if i >= 0 and not info.tensors[i].is_constant}


def _consumers(info: ModelInfo) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {t.index: [] for t in info.tensors}
    for op in info.operators:
        for i in op.inputs:
            if i >= 0:
                found[i].append(op.index)
    return found


def int8_findings(info: ModelInfo) -> list[Finding]:
    """Float, Flex/select-TF, custom and FakeQuant ops and non-int8 tensors (errors)."""
    return [_error("int8", problem, _op_number(problem)) for problem in int8_problems(info)]


def _op_number(message: str) -> int | None:
    match = re.match(r"op (\d+) ", message)
    return int(match.group(1)) if match else None


def _error(check: str, message: str, op: int | None = None) -> Finding:
    return Finding("error", check, message, op)


def _warning(check: str, message: str, op: int | None = None) -> Finding:
    return Finding("warning", check, message, op)


def placement_findings(info: ModelInfo, placements: list[OperatorPlacement]) -> list[Finding]:
    """CPU ops mid-graph are errors, unexpected CPU ops at the edges warnings.

    Ops already flagged by the INT8 audit (float, Flex, FakeQuant) are not repeated.
    """
    already = {f.op for f in int8_findings(info)}
    findings = []
    for p in placements:
        if p.unit == "NPU" or p.index in already:
            continue
        label = f"op {p.index} {p.opcode} runs on the CPU"
        if p.position == "mid-graph":
            message = (
                f"{label} in mid-graph ({p.reason}): a software epoch between NPU epochs; "
                "replace the layer with one the NPU runs, or move it out of the model"
            )
            findings.append(_error("placement", message, p.index))
        elif p.opcode not in BOUNDARY_CPU_OPS:
            message = (
                f"{label} at the {p.position} ({p.reason}); "
                "consider doing it in the firmware's pre/post-processing"
            )
            findings.append(_warning("placement", message, p.index))
    return findings


# --- quantization ------------------------------------------------------------------------


def quantization_findings(info: ModelInfo) -> list[Finding]:
    """Weights int8 symmetric per-channel on the right axis, biases int32 with scale
    input scale x weight scale, activations int8 per-tensor."""
    findings = []
    for op in info.operators:
        if op.opcode in WEIGHT_AXIS and len(op.inputs) > 1:
            findings += weight_findings(info, op)
            findings += bias_findings(info, op)
    return findings + activation_findings(info)


def weight_findings(info: ModelInfo, op: OperatorInfo) -> list[Finding]:
    weights = info.tensors[op.inputs[1]]
    label = f"op {op.index} {op.opcode} weights '{weights.name}'"
    if weights.dtype in _FLOAT_DTYPES:
        return []  # reported by the INT8 audit
    if weights.dtype != "int8":
        return [_error("quantization", f"{label} are {weights.dtype}, not int8", op.index)]
    found = []
    if any(z != 0 for z in weights.zero_points):
        message = f"{label} have non-zero zero points; the NPU needs symmetric weights"
        found.append(_error("quantization", message, op.index))
    axis = WEIGHT_AXIS[op.opcode]
    channels = weights.shape[axis] if len(weights.shape) > axis else 0
    if len(weights.scales) == 1 and channels > 1:
        message = (
            f"{label} are quantized per-tensor; per-channel weights "
            "(convert.per_channel: true) keep more accuracy"
        )
        found.append(_warning("quantization", message, op.index))
    elif len(weights.scales) != channels:
        message = f"{label} have {len(weights.scales)} scales for {channels} output channels"
        found.append(_error("quantization", message, op.index))
    elif channels > 1 and weights.quantized_dimension != axis:
        message = f"{label} are per-channel on axis {weights.quantized_dimension}, not {axis}"
        found.append(_error("quantization", message, op.index))
    return found


def bias_findings(info: ModelInfo, op: OperatorInfo) -> list[Finding]:
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        return []
    bias = info.tensors[op.inputs[2]]
    source, weights = info.tensors[op.inputs[0]], info.tensors[op.inputs[1]]
    label = f"op {op.index} {op.opcode} bias '{bias.name}'"
    if bias.dtype in _FLOAT_DTYPES or weights.dtype != "int8":
        return []
    if bias.dtype != "int32":
        return [_error("quantization", f"{label} is {bias.dtype}, not int32", op.index)]
    if not bias.scales or not source.scales or not weights.scales:
        return [_error("quantization", f"{label} has no quantization scale", op.index)]
    expected = source.scales[0] * np.asarray(weights.scales, dtype=np.float64)
    actual = np.asarray(bias.scales, dtype=np.float64)
    if actual.size == 1 and expected.size > 1:
        actual = np.repeat(actual, expected.size)
    if actual.shape != expected.shape or not np.allclose(actual, expected, rtol=1e-4, atol=0):
        message = f"{label} has a scale other than input scale x weight scale"
        return [_error("quantization", message, op.index)]
    if any(z != 0 for z in bias.zero_points):
        return [_error("quantization", f"{label} has non-zero zero points", op.index)]
    return []


def activation_findings(info: ModelInfo) -> list[Finding]:
    findings = []
    for t in info.tensors:
        if t.is_constant or t.dtype != "int8" or len(t.scales) <= 1:
            continue  # scale-less int8 tensors are reported by the INT8 audit
        message = (
            f"activation {t.index} '{t.name}' is quantized per-channel ({len(t.scales)} "
            "scales); the NPU needs per-tensor activations"
        )
        findings.append(_error("quantization", message))
    return findings


# --- shapes ------------------------------------------------------------------------------


def shape_findings(info: ModelInfo) -> list[Finding]:
    """Batch 1, 4-D tensors, kernel and pooling windows, channel counts."""
    findings = batch_findings(info)
    for op in info.operators:
        findings += kernel_findings(info, op)
        findings += channel_findings(info, op)
    return findings


def batch_findings(info: ModelInfo) -> list[Finding]:
    found = []
    for t in (info.tensors[i] for i in info.inputs):
        if t.shape and t.shape[0] != 1:
            message = (
                f"input '{t.name}' has batch {t.shape[0]}; the NPU runs batch 1 "
                "(convert with batch size 1)"
            )
            found.append(_error("shape", message))
    for t in info.tensors:
        if len(t.shape) > 4 and not t.is_constant:
            message = f"tensor {t.index} '{t.name}' is {len(t.shape)}-D; the NPU handles 4-D"
            found.append(_warning("shape", message))
    return found


def kernel_findings(info: ModelInfo, op: OperatorInfo) -> list[Finding]:
    window = _kernel_window(info, op)
    if window is None:
        return []
    (height, width), stride = window, op.options.get("strides", [1, 1])[1]
    label = f"op {op.index} {op.opcode} has a {height}x{width}"
    if op.opcode in POOL_OPS:
        if max(height, width) <= MAX_POOL_WINDOW:
            return []
        limit = f"{MAX_POOL_WINDOW}x{MAX_POOL_WINDOW}"
        return [_warning("shape", f"{label} window; the NPU pools up to {limit}", op.index)]
    max_width = MAX_KERNEL_WIDTH[min(stride, 2)]
    if height <= MAX_KERNEL_HEIGHT and width <= max_width:
        return []
    message = (
        f"{label} kernel at stride {stride}; beyond the NPU's native "
        f"{MAX_KERNEL_HEIGHT}x{max_width} stedgeai splits it into smaller kernels (slower)"
    )
    return [_warning("shape", message, op.index)]


def _kernel_window(info: ModelInfo, op: OperatorInfo) -> tuple[int, int] | None:
    if op.opcode in POOL_OPS:
        return tuple(op.options.get("filter", [1, 1]))
    if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D") and len(op.inputs) > 1:
        shape = info.tensors[op.inputs[1]].shape  # OHWI or 1HWC
        return (shape[1], shape[2]) if len(shape) == 4 else None
    return None


def channel_findings(info: ModelInfo, op: OperatorInfo) -> list[Finding]:
    if op.opcode not in WEIGHT_AXIS or not op.outputs:
        return []
    shape = info.tensors[op.outputs[0]].shape
    channels = shape[-1] if shape else 0
    if channels % NPU_LANES == 0:
        return []
    message = (
        f"op {op.index} {op.opcode} has {channels} output channels, not a multiple of "
        f"{NPU_LANES}: some NPU lanes idle"
    )
    return [_warning("shape", message, op.index)]


# --- compute and memory -----------------------------------------------------------------


def operator_macc(info: ModelInfo, op: OperatorInfo) -> int:
    """Multiply-accumulates of one op from its shapes (elementwise ops: one per output)."""
    if not op.outputs:
        return 0
    out = info.tensors[op.outputs[0]].shape
    out_elements = int(np.prod(out)) if out else 0
    weights = info.tensors[op.inputs[1]].shape if len(op.inputs) > 1 else []
    if op.opcode == "CONV_2D" and len(weights) == 4:
        return out_elements * weights[1] * weights[2] * weights[3]
    if op.opcode == "DEPTHWISE_CONV_2D" and len(weights) == 4:
        return out_elements * weights[1] * weights[2]
    if op.opcode == "FULLY_CONNECTED" and len(weights) == 2:
        return out_elements * weights[1]
    if op.opcode in POOL_OPS:
        height, width = op.options.get("filter", [1, 1])
        return out_elements * height * width
    if op.opcode == "MEAN":
        return int(np.prod(info.tensors[op.inputs[0]].shape))
    if op.opcode in ELEMENTWISE_OPS:
        return out_elements
    return 0


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
    return [_warning("memory", message, memory.peak_op)]


def _io_summary(info: ModelInfo) -> dict:
    def describe(index: int) -> dict:
        t = info.tensors[index]
        return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}

    return {
        "inputs": [describe(i) for i in info.inputs],
        "outputs": [describe(i) for i in info.outputs],
    }


# --- numbers -----------------------------------------------------------------------------


def load_validation_npz(npz_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, the float model's outputs) from a validation .npz of the convert stage."""
    from n6qat.convert import VALIDATION_INPUT_KEY, VALIDATION_OUTPUT_KEY

    keys = (VALIDATION_INPUT_KEY, VALIDATION_OUTPUT_KEY)
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in keys if k in data}
    except (OSError, ValueError, AttributeError) as err:
        raise N6QATError(
            f"cannot read validation data {npz_path}: not a readable .npz of arrays ({err})"
        ) from err
    if len(arrays) != 2:
        raise N6QATError(
            f"validation data {npz_path} needs arrays '{keys[0]}' (inputs) and '{keys[1]}' "
            "(the float model's outputs), as the convert stage writes them"
        )
    return arrays[keys[0]], arrays[keys[1]].astype(np.float32)


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
    from n6qat.convert import run_tflite

    inputs, reference = load_validation_npz(npz_path)
    _check_validation_fits(info, inputs, reference)
    try:
        test = run_tflite(model, inputs, num_threads=num_threads)
    except N6QATError as err:
        return None, len(inputs), [_error("numerics", f"no numerical validation: {err}")]
    return {HOST_METRICS_ROW: stedgeai_metrics(reference, test)}, len(inputs), []


def stedgeai_metrics(reference: np.ndarray, test: np.ndarray) -> dict[str, float | None]:
    """The columns of `stedgeai validate`'s table, with error = test - reference.

    acc: share (percent) of samples whose argmax on the last axis agrees, None with one
    output unit; rmse, mae; l2r = ||error|| / ||reference||; mean and std of the error;
    nse = 1 - sum(error^2) / sum((reference - mean(reference))^2); cos over the flattened
    arrays. Undefined values (a zero reference) are None.
    """
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape or ref.size == 0:
        raise N6QATError(f"cannot compare outputs of shapes {ref.shape} and {out.shape}")
    err = out - ref
    spread = float(np.sum((ref - ref.mean()) ** 2))
    norm_ref, norm_out = float(np.linalg.norm(ref)), float(np.linalg.norm(out))
    acc = None
    if ref.ndim > 1 and ref.shape[-1] > 1:
        acc = 100.0 * float(np.mean(np.argmax(ref, axis=-1) == np.argmax(out, axis=-1)))
    return {
        "acc": acc,
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "l2r": float(np.linalg.norm(err)) / norm_ref if norm_ref > 0 else None,
        "mean": float(np.mean(err)),
        "std": float(np.std(err)),
        "nse": 1.0 - float(np.sum(err**2)) / spread if spread > 0 else None,
        "cos": float(np.dot(ref.ravel(), out.ravel())) / (norm_ref * norm_out)
        if norm_ref > 0 and norm_out > 0
        else None,
    }


# --- reports -----------------------------------------------------------------------------


def format_host_check(check: HostCheck) -> str:
    """The readable report: verdict, operators, findings, memory and the metrics table."""
    verdict = "N6-clean" if check.clean else "NOT N6-clean"
    lines = [
        f"STM32N6 host check: {check.source}",
        f"verdict: {verdict} ({_count(check.errors, 'error')}, "
        f"{_count(check.warnings, 'warning')})",
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


def _count(items: list, noun: str) -> str:
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
