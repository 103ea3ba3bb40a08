"""The INT8 twin of a Keras model: the same variables, run on the converter's INT8 grids.

`build_qat_model` makes the twin with `keras.models.clone_model`, whose clone function
returns the original layer object for layers that need no change (so all variables are
shared) and the `n6qat.fake_quant` wrappers for the rest: Conv2D / DepthwiseConv2D /
Dense run on fake-quantized kernels, with a BatchNormalization folded in where the
converter folds it (`n6qat.folding`) and on its moving statistics elsewhere, and with
activation simulation every tensor the converter stores as int8 is fake-quantized on
ranges calibrated as the converter calibrates, and every bias is rounded to the int32
steps the converter stores it in (input scale x weight scale). Outside training (the
scoring and gating simulation), each conv / dense output is then computed as TFLite's
built-in int8 kernels compute it: int32 accumulator, fixed-point requantization with its
two roundings (`n6qat.fake_quant.requantize_fixed_point`); the train step keeps one
rounding of the float output, a difference of one step on a few values. Training the
twin trains the original model, which keeps its plain architecture and is what gets
saved and converted.

Not handled yet (run in float by the twin, though the converter quantizes them):
Conv2D etc. nested inside custom layers (e.g. a custom frontend layer),
SeparableConv2D, Conv1D, Conv2DTranspose. Simulated with one rounding, not the kernels'
fixed-point arithmetic: ADD, MEAN / AVERAGE_POOL_2D, LOGISTIC. The train step quantizes
a near-zero channel, whose weight scale the converter enlarges so that its bias fits
int32, on the scale before that (the simulation outside training uses the enlarged one).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from n6qat.errors import N6QATError
from n6qat.fake_quant import (
    ActivationRange,
    FoldedAway,
    InferenceBatchNorm,
    QuantizedInput,
    QuantizedLayer,
    QuantizedOutput,
)
from n6qat.folding import batch_norm_folds, is_weight_layer

_QUANTIZED_OUTPUT_LAYERS = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
    keras.layers.Add,
    keras.layers.Concatenate,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.MaxPooling2D,
)
"""Layers whose int8 output tensor is simulated when `simulate_activations` is on."""

_SAME_SCALE_LAYERS = (
    keras.layers.Permute,
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.Dropout,
    keras.layers.ZeroPadding2D,
    FoldedAway,
)
"""Layers whose int8 output has its input's scale (TRANSPOSE, RESHAPE, PAD; identities)."""


@dataclass
class _Plan:
    """What the twin does with each layer of the original model (keyed by id)."""

    folded_into: dict[int, keras.layers.BatchNormalization]
    folded_away: set[int]
    output_layers: set[int]
    fused_outputs: set[int] = field(default_factory=set)
    input_consumers: set[int] = field(default_factory=set)


def all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def _fuses_into_producer(layer, plan: _Plan) -> bool:
    """Whether the converter merges `layer` into the op before it (folded BN, ReLU/ReLU6)."""
    if id(layer) in plan.folded_away:
        return True
    if isinstance(layer, keras.layers.ReLU):
        return not layer.negative_slope and not layer.threshold and layer.max_value in (None, 6)
    if isinstance(layer, keras.layers.Activation):
        return layer.activation in (keras.activations.relu, keras.activations.relu6)
    return False


def _nodes(model: keras.Model) -> list:
    """Every node (layer call) of a functional model's graph."""
    return [node for depth in model._nodes_by_depth.values() for node in depth]


def _add_quantization_points(model: keras.Model, plan: _Plan) -> None:
    """Tensors the converter does not quantize (fused away) and layers reading model inputs."""
    if isinstance(model, keras.Sequential):
        pairs = zip(model.layers, model.layers[1:], strict=False)
        plan.fused_outputs |= {id(a) for a, b in pairs if _fuses_into_producer(b, plan)}
        plan.input_consumers |= {id(model.layers[0])} if model.layers else set()
        return
    nodes = _nodes(model)
    consumers: dict[int, list] = {}
    for node in nodes:
        for tensor in node.input_tensors:
            consumers.setdefault(id(tensor), []).append(node.operation)
    for node in nodes:
        users = [u for t in node.outputs for u in consumers.get(id(t), [])]
        if len(users) == 1 and _fuses_into_producer(users[0], plan):
            plan.fused_outputs.add(id(node.operation))
    for tensor in model.inputs:
        plan.input_consumers |= {id(user) for user in consumers.get(id(tensor), [])}


def _make_plan(model: keras.Model) -> _Plan:
    folded_into = batch_norm_folds(model)
    plan = _Plan(folded_into, {id(bn) for bn in folded_into.values()}, output_layers=set())
    _add_quantization_points(model, plan)
    plan.output_layers = {id(t._keras_history.operation) for t in model.outputs}
    return plan


def build_qat_model(
    model: keras.Model,
    per_channel: bool = True,
    simulate_activations: bool = False,
    frozen_layers: Iterable[str] = (),
) -> keras.Model:
    """A twin of `model` that runs on fake-quantized weights and shares all its variables.

    Layers named in `frozen_layers` are set non-trainable (on the shared layer objects).
    With `simulate_activations`, outputs of activation and Add layers (not the model's
    outputs) are fake-quantized to int8; call `calibrate_activation_ranges` before use.
    """
    if not isinstance(model, keras.Sequential | keras.Model) or not (
        isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")
    ):
        raise N6QATError(
            f"QAT needs a functional or Sequential Keras model; got {type(model).__name__}. "
            "Build the model with the functional API."
        )
    layers = {layer.name: layer for layer in all_layers(model)}
    unknown = sorted(set(frozen_layers) - set(layers))
    if unknown:
        raise N6QATError(
            f"qat.frozen_layers names layers the model does not have: {unknown}; "
            f"its layers are {sorted(layers)}."
        )
    for name in frozen_layers:
        layers[name].trainable = False
    plan = _make_plan(model)

    def quantizes_output(layer) -> bool:
        """The converter stores this layer's output as an int8 tensor of its own."""
        return (
            simulate_activations
            and id(layer) not in plan.output_layers
            and id(layer) not in plan.fused_outputs
        )

    def twin_layer(layer):
        if id(layer) in plan.folded_away:
            twin = FoldedAway(name=f"{layer.name}_folded")
            twin = QuantizedOutput(twin) if quantizes_output(layer) else twin
        elif is_weight_layer(layer):
            twin = QuantizedLayer(
                layer, plan.folded_into.get(id(layer)), per_channel, quantizes_output(layer),
                quantize_logits=simulate_activations,
            )
        elif isinstance(layer, keras.layers.BatchNormalization):
            twin = InferenceBatchNorm(layer)
            twin = QuantizedOutput(twin) if quantizes_output(layer) else twin
        elif isinstance(layer, _QUANTIZED_OUTPUT_LAYERS) and quantizes_output(layer):
            twin = QuantizedOutput(layer)
        else:
            twin = layer
        if simulate_activations and id(layer) in plan.input_consumers:
            twin = QuantizedInput(twin, layer.name)
        return twin

    twin = keras.models.clone_model(model, clone_function=twin_layer, recursive=True)
    if simulate_activations:
        _link_int8_grids(twin)
    return twin


def _producers(model: keras.Model) -> dict[int, keras.layers.Layer]:
    """id(layer) -> the layer whose output it reads, for layers called once on one input."""
    if isinstance(model, keras.Sequential):
        return {id(b): a for a, b in zip(model.layers, model.layers[1:], strict=False)}
    nodes = _nodes(model)
    calls: dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    return {
        id(node.operation): node.input_tensors[0]._keras_history.operation
        for node in nodes
        if len(node.input_tensors) == 1 and calls[id(node.operation)] == 1
    }


def _output_range(layer, producers: dict) -> ActivationRange | None:
    """The twin's range that sets the int8 scale of ``layer``'s output, if there is one."""
    while True:
        if isinstance(layer, QuantizedInput) and isinstance(layer.layer, _SAME_SCALE_LAYERS):
            return layer.input_range
        inner = layer.layer if isinstance(layer, QuantizedInput) else layer
        if isinstance(getattr(inner, "output_range", None), ActivationRange):
            return inner.output_range
        if not isinstance(layer, _SAME_SCALE_LAYERS) or id(layer) not in producers:
            return None
        layer = producers[id(layer)]


_FUSED_ACTIVATIONS = (keras.activations.linear, keras.activations.relu, keras.activations.relu6)
"""Activations of a weight layer that the converter fuses into its op."""


def _stored_range(weights: QuantizedLayer, layer, consumers: dict) -> ActivationRange | None:
    """The range of the int8 tensor the converter stores the output of ``weights`` (the
    graph's ``layer``, or inside it) in: its own, or that of the folded
    BatchNormalization / ReLU the converter fuses into its op."""
    if weights.layer.activation not in _FUSED_ACTIVATIONS:
        return None
    if weights.output_range is not None:
        return weights.output_range
    current = layer
    while len(consumers.get(id(current), ())) == 1:
        (current,) = consumers[id(current)]
        if isinstance(current, QuantizedOutput) and (
            isinstance(current.layer, FoldedAway) or current.relu_cap is not None
        ):
            return current.output_range
        if not isinstance(current, FoldedAway):
            return None
    return None


def _link_int8_grids(twin: keras.Model) -> None:
    """Give every weight layer the ranges of its input and of its stored output, so that
    its bias is simulated on the converter's int32 grid
    (`n6qat.fake_quant.ActivationRange.quantized_bias`) and, outside training, its
    output requantized as TFLite's kernels do (`n6qat.fake_quant.requantize_fixed_point`)."""
    models = [twin, *(layer for layer in all_layers(twin) if isinstance(layer, keras.Model))]
    for model in models:
        producers = _producers(model)
        consumers: dict[int, list] = {}
        for layer in model.layers:
            if id(layer) in producers:
                consumers.setdefault(id(producers[id(layer)]), []).append(layer)
        for layer in model.layers:
            weights = layer.layer if isinstance(layer, QuantizedInput) else layer
            if not isinstance(weights, QuantizedLayer):
                continue
            if weights is not layer:
                weights.reads_range(layer.input_range)
            elif id(layer) in producers:
                input_range = _output_range(producers[id(layer)], producers)
                if input_range is not None:
                    layer.reads_range(input_range)
            stored = _stored_range(weights, layer, consumers)
            if stored is not None:
                weights.writes_range(stored)


def twin_layers(qat_model: keras.Model):
    """Every layer of the twin, wrappers' inner layers and range quantizers included."""
    for layer in all_layers(qat_model):
        yield from _wrapped(layer)


def _wrapped(layer):
    yield layer
    for attr in ("layer", "output_range", "input_range", "logit_range"):
        inner = getattr(layer, attr, None)
        if isinstance(inner, keras.layers.Layer) and inner is not layer:
            yield from _wrapped(inner)


def calibrate_activation_ranges(qat_model: keras.Model, batches: Iterable[np.ndarray]) -> None:
    """Set every activation range of the twin to the min/max seen on float activations.

    The calibration pass runs as one compiled function per twin (traced once, in
    calibration mode), so recalibrating every epoch costs a forward pass, not an eager one.
    """
    ranges = [layer for layer in twin_layers(qat_model) if isinstance(layer, ActivationRange)]
    if not ranges:
        return
    for quantizer in ranges:
        quantizer.range_min.assign(0.0)
        quantizer.range_max.assign(0.0)
    seen = 0
    for batch in batches:
        _calibration_pass(qat_model, ranges)(tf.convert_to_tensor(batch, tf.float32))
        seen += 1
    if seen == 0:
        raise N6QATError("Activation calibration got no batches: the training data is empty.")
    for quantizer in ranges:
        quantizer.initialized.assign(1.0)
        quantizer.store_grid()


def _calibration_pass(qat_model: keras.Model, ranges: list):
    """The twin's forward pass with every range widening to what it sees, compiled once.

    It runs on float weights and float activations, as the converter's calibration does,
    so the ranges are the ones the converter will measure.
    """
    compiled = getattr(qat_model, "_n6qat_calibration_pass", None)
    if compiled is not None:
        return compiled

    weights = [layer for layer in twin_layers(qat_model) if isinstance(layer, QuantizedLayer)]

    def forward(x):
        # As the converter calibrates: float weights (BN folded), float activations.
        for layer in [*ranges, *weights]:
            layer.calibrating = layer.float_weights = True
        try:
            return qat_model(x, training=False)
        finally:
            for layer in [*ranges, *weights]:
                layer.calibrating = layer.float_weights = False

    shape = (None, *qat_model.inputs[0].shape[1:])
    compiled = tf.function(forward, input_signature=[tf.TensorSpec(shape, tf.float32)])
    qat_model._n6qat_calibration_pass = compiled
    return compiled


def quantized_kernels(qat_model: keras.Model) -> dict[str, np.ndarray]:
    """Original layer name -> the fake-quantized kernel the QAT step uses (Keras layout).

    For a layer with a BatchNormalization folded in, this is the folded kernel, i.e.
    what the converter writes as int8 weights, dequantized.
    """
    return {
        layer.layer.name: ops.convert_to_numpy(layer.quantized_kernel_and_bias()[0])
        for layer in twin_layers(qat_model)
        if isinstance(layer, QuantizedLayer)
    }


def simulated_int8(model: keras.Model, calibration: np.ndarray, per_channel: bool = True,
                   batch_size: int = 64) -> keras.Model:
    """The twin in full simulation (weights and every int8 tensor), ranges from ``calibration``.

    This is what the converter will deploy for the model's current weights; it shares
    the model's variables, so call ``recalibrate`` on it after the weights change.
    """
    twin = build_qat_model(model, per_channel, simulate_activations=True)
    for quantizer in twin_layers(twin):
        if isinstance(quantizer, ActivationRange):
            quantizer.tracking = False  # only `recalibrate` sets its ranges
    twin.calibration_batches = in_batches(calibration, batch_size)
    calibrate_activation_ranges(twin, twin.calibration_batches)
    return twin


def in_batches(array: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [array[i : i + batch_size] for i in range(0, len(array), batch_size)]


def recalibrate(twin: keras.Model) -> None:
    """Re-derive a ``simulated_int8`` twin's ranges from its calibration set."""
    calibrate_activation_ranges(twin, twin.calibration_batches)
