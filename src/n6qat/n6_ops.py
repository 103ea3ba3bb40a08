"""The STM32N6 NPU's operator rules (the Neural-ART facts in /work/shared/N6_FACTS.md): for
each operator of a .tflite, where it runs (NPU or CPU fallback, and where in the graph),
its MACC, and findings on its INT8 scheme, quantization and shapes.

Errors are what stops the model running well on the NPU (a CPU op mid-graph, float,
Flex or FakeQuant ops, a broken quantization scheme, batch > 1); warnings cost speed
but the model still runs. `n6qat.n6` runs these checks as part of the host check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from n6qat.tflite_inspect import ModelInfo, OperatorInfo, int8_problems

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


# --- compute ----------------------------------------------------------------------------


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
