"""Per-tensor fidelity of a full-INT8 .tflite against the float Keras model it came from.

Every int8 activation of the converted model is dequantized and compared with the float
activation of the Keras layer it stands for, on the same inputs, so that a plot along
the graph shows where the INT8 error enters instead of only the end result. LiteRT runs
its reference kernels (no XNNPACK delegate): they keep each intermediate tensor as the
op wrote it (XNNPACK's int8 kernels may round 1 LSB differently).

Tensors are matched to layers by name. The converter names an op's output after the TF
ops fused into it, joined with ';' (e.g. "dscnn_1/stem_relu_1/Relu6;dscnn_1/stem_conv_1/
convolution"); the second path component is the TF name scope of a Keras layer. TF makes
scopes unique ("re_lu" becomes "re_lu_1", and layer "re_lu_1" becomes "re_lu_1_2"), so
the scopes are read from a trace of the model, not guessed from the layer names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from n6qat.errors import N6QATError
from n6qat.metrics import cosine_similarity, sqnr_db
from n6qat.tflite_inspect import WEIGHT_OPS, ModelInfo, TensorInfo, dequantize, read_tflite

if TYPE_CHECKING:
    import keras

COLUMNS = [
    "order", "tensor", "op", "layer", "fused_layers", "compared_with", "shape", "scale",
    "zero_point", "cosine", "sqnr_db", "zero_level_share", "samples",
]  # fmt: skip
MODEL_INPUT = "model input"
LAYER_OUTPUT = "layer output"
PRE_ACTIVATION = "layer output before its activation"
_PREDICT_BATCH = 16


@dataclass
class _Row:
    """One int8 activation of the .tflite and what it is compared with."""

    order: int
    tensor: TensorInfo
    op: str
    layers: list = field(default_factory=list)  # Keras layers fused into the op, graph order
    target: object = None  # the Keras layer whose activation it stands for
    compared_with: str = ""


def layer_fidelity(
    model: keras.Model,
    tflite: bytes | str | Path,
    inputs: np.ndarray,
    max_samples: int = 64,
    num_threads: int = 1,
) -> pd.DataFrame:
    """Cosine and SQNR (dB) of every int8 activation of `tflite` against `model`'s float one.

    One row per int8 tensor an op writes, in execution order (columns: COLUMNS); metrics
    pool the first `max_samples` of `inputs`. A tensor with no float twin (no layer in its
    name, an intermediate of a layer, another shape) keeps its row with NaN metrics and
    the reason in `compared_with`.
    """
    info = read_tflite(tflite)
    x = _checked_inputs(model, info, inputs, max_samples)
    rows = _int8_rows(info)
    nodes = _single_call_nodes(model)
    _match_layers(model, nodes, info, rows)
    references = _float_references(model, nodes, rows, x)
    codes = _run_int8(tflite, info, x, [row.tensor.index for row in rows], num_threads)
    table = [_table_row(row, codes[row.tensor.index], references.get(row.order)) for row in rows]
    return pd.DataFrame(table, columns=COLUMNS)


def _checked_inputs(
    model: keras.Model, info: ModelInfo, inputs: np.ndarray, max_samples: int
) -> np.ndarray:
    if max_samples < 1:
        raise N6QATError(f"layer fidelity needs max_samples >= 1, got {max_samples}")
    if len(info.inputs) != 1 or len(getattr(model, "inputs", None) or []) != 1:
        raise N6QATError(
            f"layer fidelity handles models with one input; {info.source} has "
            f"{len(info.inputs)} and Keras model '{model.name}' has {len(model.inputs or [])}"
        )
    shape = info.tensors[info.inputs[0]].shape
    if not shape or shape[0] != 1:
        raise N6QATError(
            f"{info.source} has input shape {shape}; layer fidelity runs batch-1 models "
            "(convert with batch_size=1)"
        )
    sample = tuple(shape[1:])
    if tuple(model.inputs[0].shape[1:]) != sample:
        raise N6QATError(
            f"Keras model '{model.name}' takes inputs {tuple(model.inputs[0].shape[1:])} but "
            f"{info.source} takes {sample}; pass the .keras the .tflite was converted from"
        )
    x = np.asarray(inputs, dtype=np.float32)
    if x.ndim < 1 or len(x) == 0 or x.shape[1:] != sample:
        raise N6QATError(
            f"inputs of shape {x.shape} do not fit {info.source} "
            f"(expects (N, {', '.join(map(str, sample))}) with N >= 1)"
        )
    if not np.isfinite(x).all():
        raise N6QATError(f"the inputs for {info.source} hold NaN or infinite values")
    return x[:max_samples]


def _int8_rows(info: ModelInfo) -> list[_Row]:
    """int8 graph inputs (int8 I/O), then every int8 tensor an op writes, in op order."""
    rows = []
    for index in info.inputs:
        if info.tensors[index].dtype == "int8":
            rows.append(_Row(len(rows), info.tensors[index], "INPUT"))
    for op in info.operators:
        for index in op.outputs:
            tensor = info.tensors[index] if index >= 0 else None
            if tensor is not None and tensor.dtype == "int8" and not tensor.is_constant:
                rows.append(_Row(len(rows), tensor, op.opcode))
    return rows


def _match_layers(
    model: keras.Model, nodes: dict[int, object], info: ModelInfo, rows: list[_Row]
) -> None:
    """Set each row's layers, target and what it is compared with."""
    from n6qat.folding import batch_norm_folds

    position = {id(layer): k for k, layer in enumerate(model.layers)}
    scopes = _layer_scopes(model, nodes)
    folds = batch_norm_folds(model)
    output_layer = _output_layer(model, nodes) if len(info.outputs) == 1 else None
    input_layer = _input_layer(model)
    for row in rows:
        if _is_quantized_input(info, row):
            row.target, row.compared_with = input_layer, MODEL_INPUT
            row.layers = [input_layer] if input_layer is not None else []
            continue
        found = {}
        for part in row.tensor.name.split(";"):
            layer = scopes.get(_scope_of(part))
            if layer is not None:
                found[id(layer)] = layer
        for layer in list(found.values()):  # a folded BatchNormalization leaves no name
            if id(layer) in folds:
                found[id(folds[id(layer)])] = folds[id(layer)]
        row.layers = sorted(found.values(), key=lambda layer: position.get(id(layer), -1))
        if output_layer is not None and _is_quantized_output(info, row):
            row.target = output_layer
            row.layers = row.layers or [output_layer]
        elif row.layers:
            row.target = row.layers[-1]
    _mark_intermediates(rows)


def _mark_intermediates(rows: list[_Row]) -> None:
    """Only a layer's last tensor is its output; an earlier one is a pre-activation or inside."""
    last = {id(row.target): row.order for row in rows if row.target is not None}
    for row in rows:
        if row.compared_with:
            continue
        if row.target is None:
            row.compared_with = "nothing: no Keras layer's name scope in the tensor name"
        elif last[id(row.target)] == row.order:
            row.compared_with = LAYER_OUTPUT
        elif row.op in WEIGHT_OPS and _has_activation(row.target):
            row.compared_with = PRE_ACTIVATION
        else:
            row.compared_with = f"nothing: an intermediate of {row.target.name}, not its output"


def _scope_of(name: str) -> str | None:
    """The layer scope of a TF op or tensor name "model/layer/op[:k]" (None if no such)."""
    parts = name.split(":")[0].split("/")
    return parts[1] if len(parts) >= 3 else None


def _is_quantized_input(info: ModelInfo, row: _Row) -> bool:
    """The int8 graph input, or the QUANTIZE op's output of the float graph input."""
    if row.op == "INPUT":
        return True
    if row.op != "QUANTIZE":
        return False
    op = next(op for op in info.operators if row.tensor.index in op.outputs)
    return bool(op.inputs) and op.inputs[0] in info.inputs


def _is_quantized_output(info: ModelInfo, row: _Row) -> bool:
    """The int8 graph output, or the tensor a DEQUANTIZE turns into the float graph output."""
    if row.tensor.index in info.outputs:
        return True
    return any(
        op.opcode == "DEQUANTIZE" and op.inputs[:1] == [row.tensor.index]
        and all(out in info.outputs for out in op.outputs)
        for op in info.operators
    )  # fmt: skip


def _has_activation(layer) -> bool:
    import keras

    activation = getattr(layer, "activation", None)
    return activation is not None and activation is not keras.activations.linear


def _single_call_nodes(model: keras.Model) -> dict[int, object]:
    """id(layer) -> its node in `model`'s graph, for layers called once with one output."""
    import keras

    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    if not hasattr(graph, "_nodes_by_depth"):
        raise N6QATError(
            f"Keras model '{model.name}' is not a functional or Sequential model; layer "
            "fidelity needs its layer graph"
        )
    nodes = [node for depth in graph._nodes_by_depth.values() for node in depth]
    calls: dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    return {
        id(node.operation): node
        for node in nodes
        if calls[id(node.operation)] == 1
        and len(node.outputs) == 1
        and not isinstance(node.operation, keras.layers.InputLayer)
    }


def _input_layer(model: keras.Model):
    import keras

    graph = getattr(model, "_functional", model)  # a Sequential keeps its InputLayer there
    return next((lay for lay in graph.layers if isinstance(lay, keras.layers.InputLayer)), None)


def _output_layer(model: keras.Model, nodes: dict[int, object]):
    output = model.outputs[0] if len(model.outputs) == 1 else None
    return next((node.operation for node in nodes.values() if node.outputs[0] is output), None)


def _layer_scopes(model: keras.Model, nodes: dict[int, object]) -> dict[str, object]:
    """TF name scope -> Keras layer, from tracing the model as `model.export` does.

    A layer that adds no op (Dropout at inference) hands on its input's name; the scope
    stays with the first layer, the one that made the tensor.
    """
    import keras
    import tensorflow as tf

    layers = [layer for layer in model.layers if id(layer) in nodes]
    if not layers:
        return {}
    tracer = keras.Model(
        model.inputs, [nodes[id(lay)].outputs[0] for lay in layers], name=model.name
    )
    names: list[str] = []

    def trace(x):
        outputs = tracer(x, training=False)
        names.extend(t.name for t in tf.nest.flatten(outputs))
        return outputs

    spec = tf.TensorSpec((1, *model.inputs[0].shape[1:]), tf.float32)
    tf.function(trace).get_concrete_function(spec)
    scopes: dict[str, object] = {}
    for layer, name in zip(layers, names, strict=True):
        scope = _scope_of(name)
        if scope is not None:
            scopes.setdefault(scope, layer)
    return scopes


def _float_references(
    model: keras.Model, nodes: dict[int, object], rows: list[_Row], x: np.ndarray
) -> dict[int, np.ndarray]:
    """Row order -> the float activation (N, ...) it is compared with, where shapes agree."""
    import keras

    wanted = {}
    for row in rows:
        if row.compared_with == MODEL_INPUT:
            tensor = model.inputs[0]
        elif row.compared_with not in (LAYER_OUTPUT, PRE_ACTIVATION):
            continue
        elif id(row.target) not in nodes:
            row.compared_with = f"nothing: {row.target.name} is called more than once"
            continue
        else:
            tensor = nodes[id(row.target)].outputs[0]
        float_shape, int8_shape = tuple(tensor.shape[1:]), tuple(row.tensor.shape)
        if int8_shape[:1] != (1,) or int8_shape[1:] != float_shape:
            row.compared_with = f"nothing: the float activation has shape (N, {_dims(float_shape)})"
            continue
        wanted[row.order] = tensor
    probes = {id(t): t for row in rows if row.order in wanted for t in _probes(row, nodes, wanted)}
    values = {}
    if probes:
        probe = keras.Model(model.inputs, list(probes.values()))
        predicted = probe.predict(x, batch_size=_PREDICT_BATCH, verbose=0)
        predicted = [predicted] if isinstance(predicted, np.ndarray) else predicted
        values = dict(zip(probes, predicted, strict=True))
    references = {}
    for row in rows:
        if row.order not in wanted:
            continue
        if row.compared_with == MODEL_INPUT:
            references[row.order] = x
        elif row.compared_with == PRE_ACTIVATION:
            node = nodes[id(row.target)]
            before = values[id(node.input_tensors[0])]
            references[row.order] = _without_activation(row.target, before)
        else:
            references[row.order] = values[id(wanted[row.order])]
    return references


def _probes(row: _Row, nodes: dict[int, object], wanted: dict) -> list:
    """The Keras tensors a row's reference needs: the layer's output, or its input."""
    if row.compared_with == MODEL_INPUT:
        return []
    if row.compared_with == PRE_ACTIVATION:
        return [nodes[id(row.target)].input_tensors[0]]
    return [wanted[row.order]]


def _without_activation(layer, inputs: np.ndarray) -> np.ndarray:
    """`layer` applied to `inputs` with a linear activation: what the weight op computes."""
    import keras

    config = {**layer.get_config(), "activation": "linear", "name": f"{layer.name}_linear"}
    twin = type(layer).from_config(config)
    twin.build(inputs.shape)
    twin.set_weights(layer.get_weights())
    chunks = [
        keras.ops.convert_to_numpy(twin(inputs[start : start + _PREDICT_BATCH]))
        for start in range(0, len(inputs), _PREDICT_BATCH)
    ]
    return np.concatenate(chunks)


def _run_int8(
    tflite: bytes | str | Path, info: ModelInfo, x: np.ndarray, indices: list[int],
    num_threads: int,
) -> dict[int, np.ndarray]:  # fmt: skip
    """Tensor index -> its int8 values for every sample, stacked: (N, *tensor shape)."""
    from n6qat.litert import load_interpreter, to_tensor  # run_tflite's kernels and rounding

    interpreter = load_interpreter(tflite, num_threads, preserve_all_tensors=True)
    detail = interpreter.get_input_details()[0]
    collected: dict[int, list[np.ndarray]] = {index: [] for index in indices}
    for sample in x:
        interpreter.set_tensor(detail["index"], to_tensor(sample[None], detail))
        interpreter.invoke()
        for index in indices:
            collected[index].append(interpreter.get_tensor(index).copy())
    return {index: np.stack(values) for index, values in collected.items()}


def _table_row(row: _Row, codes: np.ndarray, reference: np.ndarray | None) -> dict:
    tensor = row.tensor
    zero_point = tensor.zero_points[0] if tensor.zero_points else 0
    scale = tensor.scales[0] if len(tensor.scales) == 1 else math.nan
    cosine = sqnr = math.nan
    compared_with = row.compared_with
    if reference is not None and not tensor.scales:
        compared_with = "nothing: the tensor has no quantization scale"
    elif reference is not None:
        axis = tensor.quantized_dimension + 1  # after the samples axis
        values = dequantize(codes, tensor.scales, tensor.zero_points, axis)[:, 0]
        cosine, sqnr = cosine_similarity(reference, values), sqnr_db(reference, values)
    return {
        "order": row.order,
        "tensor": tensor.name,
        "op": row.op,
        "layer": getattr(row.target, "name", ""),
        "fused_layers": "+".join(layer.name for layer in row.layers),
        "compared_with": compared_with,
        "shape": "x".join(map(str, tensor.shape)),
        "scale": scale,
        "zero_point": zero_point,
        "cosine": cosine,
        "sqnr_db": sqnr,
        "zero_level_share": float(np.mean(codes == zero_point)),
        "samples": len(codes),
    }


def _dims(shape: tuple) -> str:
    return ", ".join(str(d) for d in shape)
