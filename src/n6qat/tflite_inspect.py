"""Read a .tflite flatbuffer with the `tflite` schema package: its graph, whether it is full
INT8, and its int8 weights as float values.

Only the main subgraph (index 0) is described; the count of subgraphs is reported so
that control flow (WHILE/IF bodies) does not go unnoticed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tflite
from flatbuffers import number_types
from tflite.ActivationFunctionType import ActivationFunctionType
from tflite.BuiltinOperator import BuiltinOperator
from tflite.BuiltinOptions import BuiltinOptions
from tflite.Padding import Padding
from tflite.TensorType import TensorType

from n6qat.errors import N6QATError

_FILE_IDENTIFIER = b"TFL3"

_OPCODE_NAMES = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
_DTYPE_NAMES = {v: k.lower() for k, v in vars(TensorType).items() if not k.startswith("_")}
_PADDING_NAMES = {v: k for k, v in vars(Padding).items() if not k.startswith("_")}
_ACTIVATION_NAMES = {v: k for k, v in vars(ActivationFunctionType).items() if not k.startswith("_")}
_ITEM_BYTES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1,
    "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8,
    "bool": 1, "complex64": 8, "complex128": 16,
}  # fmt: skip
_FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
"""The operators whose second input is a weight tensor."""
# OperatorCode.builtin_code is field 3 (vtable slot 4 + 2 * 3); read it raw because the
# generated BuiltinCode() swaps in deprecated_builtin_code for values below 127.
_BUILTIN_CODE_VTABLE_OFFSET = 10


@dataclass
class TensorInfo:
    """One tensor of the main subgraph with its quantization parameters."""

    index: int
    name: str
    shape: list[int]
    dtype: str
    scales: list[float]
    zero_points: list[int]
    quantized_dimension: int
    is_constant: bool
    size_bytes: int


@dataclass
class OperatorInfo:
    """One operator; `opcode` is the builtin name, the custom name, or FLEX_<op>."""

    index: int
    opcode: str
    inputs: list[int]
    outputs: list[int]
    options: dict = field(default_factory=dict)
    custom_code: str | None = None


@dataclass
class ModelInfo:
    """What a .tflite holds: tensors, operators in execution order, graph inputs/outputs."""

    tensors: list[TensorInfo]
    operators: list[OperatorInfo]
    inputs: list[int]
    outputs: list[int]
    size_bytes: int
    subgraph_count: int
    source: str = "<bytes>"


def read_tflite(path_or_bytes: str | Path | bytes) -> ModelInfo:
    """Parse a .tflite file (or its bytes); N6QATError when it is not a readable model."""
    data, source = _load_bytes(path_or_bytes)
    if len(data) < 8 or not tflite.Model.ModelBufferHasIdentifier(data, 0):
        raise N6QATError(
            f"{source} is not a TFLite model (no 'TFL3' file identifier); "
            "pass the .tflite written by the convert stage"
        )
    try:
        return _parse(data, source)
    except N6QATError:
        raise
    except Exception as err:  # the generated reader raises whatever unpacking hits
        raise N6QATError(
            f"{source} is truncated or corrupt ({type(err).__name__}: {err}); "
            "re-run the convert stage to write it again"
        ) from err


def _load_bytes(path_or_bytes: str | Path | bytes) -> tuple[bytes, str]:
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return bytes(path_or_bytes), "<bytes>"
    path = Path(path_or_bytes)
    try:
        return path.read_bytes(), str(path)
    except OSError as err:
        raise N6QATError(f"cannot read TFLite model {path}: {err.strerror}") from err


def _parse(data: bytes, source: str) -> ModelInfo:
    model = tflite.Model.GetRootAs(data, 0)
    if model.SubgraphsLength() < 1:
        raise N6QATError(f"{source} holds no subgraph; it is not a usable TFLite model")
    _check_buffers_inside(model, len(data), source)
    graph = model.Subgraphs(0)
    opcodes = [_opcode_name(model.OperatorCodes(i)) for i in range(model.OperatorCodesLength())]
    tensors = [_tensor_info(model, graph.Tensors(i), i) for i in range(graph.TensorsLength())]
    operators = [
        _operator_info(graph.Operators(i), i, opcodes) for i in range(graph.OperatorsLength())
    ]
    return ModelInfo(
        tensors=tensors,
        operators=operators,
        **_inputs_outputs(graph),
        size_bytes=len(data),
        subgraph_count=model.SubgraphsLength(),
        source=source,
    )


def _ints(length: int, as_numpy) -> list[int]:
    """A flatbuffer vector of ints as a list; an empty vector reads as 0, not as an array."""
    return [int(i) for i in as_numpy()] if length else []


def _inputs_outputs(table: tflite.SubGraph | tflite.Operator) -> dict[str, list[int]]:
    """The tensor indices a graph or an operator reads and writes, as `inputs` and `outputs`."""
    return {
        "inputs": _ints(table.InputsLength(), table.InputsAsNumpy),
        "outputs": _ints(table.OutputsLength(), table.OutputsAsNumpy),
    }


def _check_buffers_inside(model: tflite.Model, size: int, source: str) -> None:
    """Tables are read lazily, so make sure every weight buffer ends inside the file."""
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        if buffer.DataLength():
            buffer.DataAsNumpy()  # numpy refuses a view that runs past the end
        elif buffer.Offset() and buffer.Offset() + buffer.Size() > size:
            raise N6QATError(
                f"{source} is truncated: buffer {i} ends at byte "
                f"{buffer.Offset() + buffer.Size()} of a {size}-byte file; re-run the convert stage"
            )


def _opcode_name(code: tflite.OperatorCode) -> tuple[str, str | None]:
    """(name, custom code) of an OperatorCode, builtin = max(builtin, deprecated) per schema."""
    tab = code._tab
    offset = tab.Offset(_BUILTIN_CODE_VTABLE_OFFSET)
    raw = tab.Get(number_types.Int32Flags, offset + tab.Pos) if offset else 0
    builtin = max(raw, code.DeprecatedBuiltinCode())
    if builtin != BuiltinOperator.CUSTOM:
        return _OPCODE_NAMES.get(builtin, f"BUILTIN_{builtin}"), None
    custom = (code.CustomCode() or b"").decode("utf-8", "replace")
    if custom.startswith("Flex"):
        return f"FLEX_{custom[len('Flex') :]}", custom
    return custom or "CUSTOM", custom


def _tensor_info(model: tflite.Model, tensor: tflite.Tensor, index: int) -> TensorInfo:
    shape = _ints(tensor.ShapeLength(), tensor.ShapeAsNumpy)
    dtype = _DTYPE_NAMES.get(tensor.Type(), f"type{tensor.Type()}")
    quant = tensor.Quantization()
    scales, zero_points, qdim = [], [], 0
    if quant is not None:
        if quant.ScaleLength():
            scales = [float(s) for s in quant.ScaleAsNumpy()]
        if quant.ZeroPointLength():
            zero_points = [int(z) for z in quant.ZeroPointAsNumpy()]
        qdim = quant.QuantizedDimension()
    buffer_bytes = 0
    if 0 < tensor.Buffer() < model.BuffersLength():
        buffer = model.Buffers(tensor.Buffer())
        buffer_bytes = buffer.DataLength() or int(buffer.Size())
    size = buffer_bytes or int(np.prod([max(d, 1) for d in shape])) * _ITEM_BYTES.get(dtype, 0)
    return TensorInfo(
        index=index,
        name=(tensor.Name() or b"").decode("utf-8", "replace"),
        shape=shape,
        dtype=dtype,
        scales=scales,
        zero_points=zero_points,
        quantized_dimension=int(qdim),
        is_constant=buffer_bytes > 0,
        size_bytes=size,
    )


def _operator_info(op: tflite.Operator, index: int, opcodes: list) -> OperatorInfo:
    name, custom = opcodes[op.OpcodeIndex()]
    return OperatorInfo(
        index=index,
        opcode=name,
        **_inputs_outputs(op),
        options=_options(op),
        custom_code=custom,
    )


def _options(op: tflite.Operator) -> dict:
    """The options that matter for NPU mapping: strides, padding, activation, filter size."""
    kind = op.BuiltinOptionsType()
    table = op.BuiltinOptions()
    readers = {
        BuiltinOptions.Conv2DOptions: tflite.Conv2DOptions,
        BuiltinOptions.DepthwiseConv2DOptions: tflite.DepthwiseConv2DOptions,
        BuiltinOptions.Pool2DOptions: tflite.Pool2DOptions,
        BuiltinOptions.FullyConnectedOptions: tflite.FullyConnectedOptions,
        BuiltinOptions.AddOptions: tflite.AddOptions,
        BuiltinOptions.MulOptions: tflite.MulOptions,
        BuiltinOptions.SubOptions: tflite.SubOptions,
        BuiltinOptions.ConcatenationOptions: tflite.ConcatenationOptions,
        BuiltinOptions.ReducerOptions: tflite.ReducerOptions,
    }
    if table is None or kind not in readers:
        return {}
    opts = readers[kind]()
    opts.Init(table.Bytes, table.Pos)
    found: dict = {}
    if hasattr(opts, "StrideH"):
        found["strides"] = [opts.StrideH(), opts.StrideW()]
    if hasattr(opts, "Padding"):
        found["padding"] = _PADDING_NAMES.get(opts.Padding(), str(opts.Padding()))
    if hasattr(opts, "DilationHFactor"):
        found["dilation"] = [opts.DilationHFactor(), opts.DilationWFactor()]
    if hasattr(opts, "FilterHeight"):
        found["filter"] = [opts.FilterHeight(), opts.FilterWidth()]
    if hasattr(opts, "DepthMultiplier"):
        found["depth_multiplier"] = opts.DepthMultiplier()
    if hasattr(opts, "FusedActivationFunction"):
        act = opts.FusedActivationFunction()
        found["fused_activation"] = _ACTIVATION_NAMES.get(act, str(act))
    if hasattr(opts, "Axis"):
        found["axis"] = opts.Axis()
    if hasattr(opts, "KeepDims"):
        found["keep_dims"] = bool(opts.KeepDims())
    return found


def op_histogram(info: ModelInfo) -> dict[str, int]:
    """Count of each operator name, most frequent first."""
    return dict(Counter(op.opcode for op in info.operators).most_common())


def int8_problems(info: ModelInfo) -> list[str]:
    """Why the model is not full INT8 (empty when it is).

    Allowed: float tensors at the graph's inputs/outputs, a QUANTIZE reading a graph
    input, a DEQUANTIZE writing a graph output, int32 constants (biases, shapes, axes).
    Flagged: custom and FLEX ops, FAKE_QUANT, any other op touching a float tensor,
    internal tensors that are not int8 (or int32 constants), int8 tensors without scales.
    """
    boundary = set(info.inputs) | set(info.outputs)
    problems = []
    if info.subgraph_count > 1:
        problems.append(
            f"{info.subgraph_count} subgraphs (control flow); only the main graph was checked"
        )
    for op in info.operators:
        problems.extend(_operator_problems(info, op))
    for t in info.tensors:
        if t.index in boundary or t.dtype in _FLOAT_DTYPES:
            continue  # float internal tensors are reported with the op that touches them
        if t.dtype == "int8" and not t.scales:
            problems.append(f"tensor {t.index} '{t.name}' is int8 without quantization scales")
        elif t.dtype not in {"int8", "int32"} or (t.dtype == "int32" and not t.is_constant):
            kind = "constant" if t.is_constant else "activation"
            problems.append(f"tensor {t.index} '{t.name}' is a {t.dtype} {kind}")
    return problems


def _operator_problems(info: ModelInfo, op: OperatorInfo) -> list[str]:
    label = f"op {op.index} {op.opcode}"
    if op.custom_code is not None:
        kind = "select-TF (FLEX)" if op.opcode.startswith("FLEX_") else "custom"
        return [f"{label} is a {kind} op; the NPU and the stedgeai importer cannot run it"]
    if op.opcode == "FAKE_QUANT":
        return [f"{label} is a FAKE_QUANT remnant of QAT; it should have been folded away"]
    if op.opcode == "QUANTIZE" and op.inputs and op.inputs[0] in info.inputs:
        return []
    if op.opcode == "DEQUANTIZE" and op.outputs and all(o in info.outputs for o in op.outputs):
        if not info.tensors[op.inputs[0]].is_constant:
            return []
    floats = [
        info.tensors[i] for i in (*op.inputs, *op.outputs)
        if i >= 0 and info.tensors[i].dtype in _FLOAT_DTYPES
    ]  # fmt: skip
    if floats:
        t = floats[0]
        return [f"{label} runs in float (tensor {t.index} '{t.name}' is {t.dtype})"]
    return []


def io_details(info: ModelInfo) -> dict:
    """Name, shape, dtype and quantization of the graph's inputs and outputs."""

    def describe(index: int) -> dict:
        t = info.tensors[index]
        return {
            "name": t.name,
            "shape": list(t.shape),
            "dtype": t.dtype,
            "quantization": {"scales": list(t.scales), "zero_points": list(t.zero_points)},
        }

    return {
        "inputs": [describe(i) for i in info.inputs],
        "outputs": [describe(i) for i in info.outputs],
    }


# --- weights ---------------------------------------------------------------------------------


def dequantize(codes: np.ndarray, scales, zero_points, axis: int = 0) -> np.ndarray:
    """Float values of an int8 tensor: one scale, or one per index of `axis`."""
    codes = np.asarray(codes, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    zero_points = np.asarray(zero_points if len(zero_points) else [0], dtype=np.float64)
    if scales.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = scales.size
        zero_points = np.broadcast_to(zero_points, scales.shape).reshape(shape)
        scales = scales.reshape(shape)
    return (codes - zero_points) * scales


def tflite_weights(model_bytes: bytes) -> list[dict]:
    """The int8 weights of every CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED, dequantized.

    One dict per op, in execution order: op, opcode, tensor (name), shape, per_channel,
    values (float64).
    """
    info = read_tflite(model_bytes)
    model = tflite.Model.GetRootAs(model_bytes, 0)
    weights = []
    for op in info.operators:
        tensor = info.tensors[op.inputs[1]] if len(op.inputs) > 1 else None
        if op.opcode not in WEIGHT_OPS or tensor is None or tensor.dtype != "int8":
            continue
        if not (tensor.is_constant and tensor.scales):
            continue
        raw = _buffer_bytes(model, model_bytes, tensor.index)
        codes = np.frombuffer(raw, dtype=np.int8).reshape(tensor.shape)
        values = dequantize(codes, tensor.scales, tensor.zero_points, tensor.quantized_dimension)
        weights.append(
            {
                "op": op.index,
                "opcode": op.opcode,
                "tensor": tensor.name,
                "shape": tuple(tensor.shape),
                "per_channel": len(tensor.scales) > 1,
                "values": values,
            }
        )
    return weights


def _buffer_bytes(model, data: bytes, tensor_index: int) -> bytes:
    buffer = model.Buffers(model.Subgraphs(0).Tensors(tensor_index).Buffer())
    if buffer.DataLength():
        return buffer.DataAsNumpy().tobytes()
    return data[buffer.Offset() : buffer.Offset() + buffer.Size()]  # models over 2 GB
