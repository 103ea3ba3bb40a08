"""Quantization-aware fine-tuning on the TFLite converter's exact full-INT8 weight grid.

`build_qat_model` makes a twin of a Keras model with `keras.models.clone_model`, whose
clone function returns the original layer object for layers that need no change (so
all variables are shared) and thin wrappers holding the original Conv2D /
DepthwiseConv2D / Dense / BatchNormalization for the rest. Wrappers run the op with
the fake-quantized kernel inside the compiled train step; BatchNormalization runs on
its moving statistics, folded into the preceding layer where the converter folds it.
Training the twin trains the original model, which keeps its plain architecture and
is what gets saved and converted. The wrappers are never serialized.

The weight grid is the one the TF 2.21 converter writes (checked against converted
models in tests/test_qat.py): int8 in [-127, 127], zero point 0,
scale = max|w| / 127 per output channel (or per tensor), code = round(w * (1 / scale))
in float32 with ties rounded away from zero. A BatchNormalization after a linear
Conv2D / DepthwiseConv2D / Dense (Dense too) is folded into its kernel,
w * gamma * rsqrt(var + eps), before quantizing; the twin quantizes that same folded
kernel, which matches per-channel and per-tensor weights alike.

Not handled yet (run in float by the twin, though the converter quantizes them):
Conv2D etc. nested inside custom layers (e.g. a custom frontend layer),
SeparableConv2D, Conv1D, Conv2DTranspose.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import ops

from n6qat.errors import N6QATError

WEIGHT_QMAX = 127
"""Narrow-range int8 weights: codes in [-127, 127], zero point 0."""

RANGE_MOMENTUM = 0.99
"""Moving-average momentum of the activation ranges tracked during QAT."""

CALIBRATION_BATCHES = 8
"""Training batches used to initialise activation ranges before QAT."""

OPTIMIZERS = ("adam", "adamw", "sgd")

SELECTIONS = ("int8_file_top1", "int8_file_cmap", "last")
"""How QAT picks the epoch it keeps: the INT8 simulation's validation file top-1 or
cmAP (each breaking the other's ties; epoch 0, the starting weights, competes too), or
simply the last epoch."""

SELECT_WITH = ("tflite", "simulation")
"""What scores an epoch for the selection: its converted full-INT8 TFLite (what is
deployed: the PTQ baseline is then exactly epoch 0) or the twin's INT8 simulation."""

_SEPARATE_ACTIVATIONS = (keras.activations.sigmoid, keras.activations.softmax)

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


@dataclass(frozen=True)
class QATSettings:
    """What a user chooses for quantization-aware fine-tuning."""

    epochs: int = 10
    learning_rate: float = 1e-4
    batch_size: int = 32
    optimizer: str = "adam"
    weight_decay: float = 0.0
    clipnorm: float | None = 1.0
    per_channel: bool = True
    simulate_activations: bool = True
    frozen_layers: tuple[str, ...] = ()
    seed: int = 0
    selection: str = "int8_file_top1"
    select_with: str = "tflite"
    distillation: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen_layers", tuple(self.frozen_layers))
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clipnorm is not None and not self.clipnorm > 0:
            problems.append(f"clipnorm must be > 0 or null, got {self.clipnorm}")
        if not self.distillation >= 0:
            problems.append(f"distillation must be >= 0, got {self.distillation}")
        if self.select_with not in SELECT_WITH:
            problems.append(f"select_with must be one of {SELECT_WITH}, got {self.select_with!r}")
        if self.selection not in SELECTIONS:
            problems.append(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if problems:
            raise N6QATError("Invalid QAT settings (config key qat): " + "; ".join(problems))


def quantization_channel_axis(layer: keras.layers.Layer) -> int:
    """First kernel axis that indexes output channels; it and all later axes do.

    Conv2D (kh, kw, in, out): 3. DepthwiseConv2D (kh, kw, C, M): 2, the C*M output
    channels. Dense (in, out): 1.
    """
    if isinstance(layer, keras.layers.DepthwiseConv2D | keras.layers.Conv2D):
        if layer.data_format != "channels_last":
            raise N6QATError(
                f"Layer {layer.name!r} uses data_format={layer.data_format!r}; QAT supports "
                "channels_last models only (as the TFLite converter expects). Rebuild the "
                "model with channels_last."
            )
        return 2 if isinstance(layer, keras.layers.DepthwiseConv2D) else 3
    if isinstance(layer, keras.layers.Dense):
        return 1
    raise N6QATError(
        f"Layer {layer.name!r} ({type(layer).__name__}) has no quantized kernel; only "
        "Conv2D, DepthwiseConv2D and Dense do."
    )


def _round_half_away_from_zero(x):
    magnitude = ops.abs(x)
    whole = ops.floor(magnitude)
    rounded = whole + ops.cast(magnitude - whole >= 0.5, x.dtype)
    return ops.sign(x) * rounded


def fake_quantize_weights(kernel, channel_axis: int | None):
    """The kernel on the converter's int8 grid, with a straight-through gradient.

    `channel_axis`: scales per index of this axis and all later ones (see
    `quantization_channel_axis`); None for one scale per tensor. All-zero channels
    stay zero.
    """
    kernel = ops.convert_to_tensor(kernel)
    rank = len(kernel.shape)
    reduce_axes = tuple(range(rank if channel_axis is None else channel_axis % rank))
    max_abs = ops.max(ops.abs(kernel), axis=reduce_axes, keepdims=True)
    scale = max_abs / float(WEIGHT_QMAX)
    inverse_scale = 1.0 / ops.where(scale > 0, scale, ops.ones_like(scale))
    codes = ops.clip(_round_half_away_from_zero(kernel * inverse_scale), -WEIGHT_QMAX, WEIGHT_QMAX)
    quantized = ops.stop_gradient(codes * scale)
    # kernel - stop_gradient(kernel) is exactly 0: forward value is bit-exact, gradient 1.
    return quantized + (kernel - ops.stop_gradient(kernel))


def _batch_norm_factor_and_offset(batch_norm: keras.layers.BatchNormalization):
    """Inference BN as y = x * factor + offset, computed as tf.nn.batch_normalization does."""
    factor = ops.rsqrt(batch_norm.moving_variance + batch_norm.epsilon)
    if batch_norm.scale:
        factor = factor * batch_norm.gamma
    offset = -batch_norm.moving_mean * factor
    if batch_norm.center:
        offset = batch_norm.beta + offset
    return factor, offset


class _ActivationRange(keras.layers.Layer):
    """Fake-quantizes a tensor to per-tensor asymmetric int8 on a tracked range.

    The range is set by calibration, then follows an exponential moving average of
    each training batch's min/max (always including 0, as TFLite ranges do).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calibrating = False
        self.tracking = True  # moving-average ranges in the train step; False: calibrated only
        self.range_min = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="range_min"
        )
        self.range_max = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="range_max"
        )
        self.initialized = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="initialized"
        )
        self.built = True

    def call(self, inputs, training=None):
        batch_min = ops.minimum(ops.min(inputs), 0.0)
        batch_max = ops.maximum(ops.max(inputs), 0.0)
        if self.calibrating:
            self.range_min.assign(ops.minimum(self.range_min, batch_min))
            self.range_max.assign(ops.maximum(self.range_max, batch_max))
            return inputs
        if training and self.tracking:
            self._track(self.range_min, batch_min)
            self._track(self.range_max, batch_max)
            self.initialized.assign(1.0)
        # Nudges the range so that 0 is exactly representable, as TFLite's int8 does.
        quantized = tf.quantization.fake_quant_with_min_max_vars(
            inputs, self.range_min, self.range_max, num_bits=8, narrow_range=False
        )
        if training:
            return quantized
        return ops.where(self.initialized > 0, quantized, inputs)

    def _track(self, bound, batch_value) -> None:
        moving = RANGE_MOMENTUM * bound + (1.0 - RANGE_MOMENTUM) * batch_value
        bound.assign(ops.where(self.initialized > 0, moving, batch_value))


class _QuantizedLayer(keras.layers.Layer):
    """Runs a Conv2D / DepthwiseConv2D / Dense with its fake-quantized kernel.

    With `batch_norm`, the following BatchNormalization is folded in (moving
    statistics, gamma and beta trainable) and the folded kernel is quantized, as the
    converter does; the BN itself is then replaced by an identity in the twin.
    """

    def __init__(
        self, layer, batch_norm=None, per_channel=True, quantize_output=False,
        quantize_logits=False,
    ):
        super().__init__(name=f"{layer.name}_qat")
        self.layer = layer
        self.batch_norm = batch_norm
        self.out_axis = quantization_channel_axis(layer)
        self.channel_axis = self.out_axis if per_channel else None
        self.float_weights = False  # calibration: the converter measures ranges in float
        self.output_range = (
            _ActivationRange(name=f"{layer.name}_range") if quantize_output else None
        )
        # The converter stores the pre-activation output of a sigmoid/softmax layer as int8
        # too (FULLY_CONNECTED, then LOGISTIC): quantize the logits as well.
        self.logit_range = (
            _ActivationRange(name=f"{layer.name}_logit_range")
            if quantize_logits and layer.activation in _SEPARATE_ACTIVATIONS
            else None
        )

    def quantized_kernel_and_bias(self):
        kernel = self.layer.kernel
        bias = self.layer.bias if self.layer.use_bias else None
        if self.batch_norm is not None:
            factor, offset = _batch_norm_factor_and_offset(self.batch_norm)
            kernel = kernel * ops.reshape(factor, kernel.shape[self.out_axis :])
            bias = offset if bias is None else bias * factor + offset
        if self.float_weights:
            return kernel, bias
        return fake_quantize_weights(kernel, self.channel_axis), bias

    def call(self, inputs, training=None):
        kernel, bias = self.quantized_kernel_and_bias()
        layer = self.layer
        if isinstance(layer, keras.layers.Dense):
            outputs = ops.matmul(inputs, kernel)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            outputs = ops.depthwise_conv(
                inputs,
                kernel,
                strides=layer.strides,
                padding=layer.padding,
                dilation_rate=layer.dilation_rate,
                data_format=layer.data_format,
            )
        else:
            outputs = layer.convolution_op(inputs, kernel)
        if bias is not None:
            outputs = ops.add(outputs, bias)
        if self.logit_range is not None:
            outputs = self.logit_range(outputs, training=training)
        outputs = layer.activation(outputs)
        if self.logit_range is not None and not self.float_weights:
            # LOGISTIC / SOFTMAX write int8 with scale 1/256, zero point -128: [0, 255/256].
            outputs = tf.quantization.fake_quant_with_min_max_args(
                outputs, min=0.0, max=255.0 / 256.0, num_bits=8, narrow_range=False
            )
        if self.output_range is not None:
            outputs = self.output_range(outputs, training=training)
        return outputs


class _InferenceBatchNorm(keras.layers.Layer):
    """A BatchNormalization not folded into a conv: always on its moving statistics."""

    def __init__(self, batch_norm):
        super().__init__(name=f"{batch_norm.name}_qat")
        self.batch_norm = batch_norm

    def call(self, inputs, mask=None):
        return self.batch_norm(inputs, training=False, mask=mask)


class _FoldedAway(keras.layers.Layer):
    """Stands in for a BatchNormalization that the preceding layer's wrapper folded in."""

    def call(self, inputs, mask=None):
        return inputs


class _QuantizedInput(keras.layers.Layer):
    """Fake-quantizes the model input (the converter's input QUANTIZE), then runs the layer."""

    def __init__(self, layer, name: str):
        super().__init__(name=f"{name}_in_qat")
        self.layer = layer
        self.input_range = _ActivationRange(name=f"{name}_input_range")

    def call(self, inputs, training=None, mask=None):
        return self.layer(self.input_range(inputs, training=training))


class _QuantizedOutput(keras.layers.Layer):
    """Runs an activation / Add layer, then fake-quantizes its output to int8."""

    def __init__(self, layer):
        super().__init__(name=f"{layer.name}_qat")
        self.layer = layer
        self.output_range = _ActivationRange(name=f"{layer.name}_range")

    def call(self, inputs, training=None, mask=None):
        return self.output_range(self.layer(inputs), training=training)


@dataclass
class _Plan:
    """What the twin does with each layer of the original model (keyed by id)."""

    folded_into: dict[int, keras.layers.BatchNormalization]
    folded_away: set[int]
    output_layers: set[int]
    fused_outputs: set[int] = field(default_factory=set)
    input_consumers: set[int] = field(default_factory=set)


def _is_weight_layer(layer) -> bool:
    return isinstance(
        layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D | keras.layers.Dense
    )


def _can_fold(layer, batch_norm, rank: int) -> bool:
    """Whether the converter folds `batch_norm` into `layer`: linear output, BN on channels."""
    return (
        _is_weight_layer(layer)
        and isinstance(batch_norm, keras.layers.BatchNormalization)
        and layer.activation is keras.activations.linear
        and batch_norm.axis in (-1, rank - 1)
    )


def _add_folds(model: keras.Model, plan: _Plan) -> None:
    """Find conv/dense -> BN pairs whose conv output feeds only that BN."""
    if isinstance(model, keras.Sequential):
        for layer, following in zip(model.layers, model.layers[1:], strict=False):
            nodes = layer._inbound_nodes  # the first is the Sequential model's own call
            if nodes and _can_fold(layer, following, len(nodes[0].outputs[0].shape)):
                plan.folded_into[id(layer)] = following
                plan.folded_away.add(id(following))
        return
    nodes = [node for depth in model._nodes_by_depth.values() for node in depth]
    consumers: dict[int, list] = {}
    calls: dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            consumers.setdefault(id(tensor), []).append(node)
    model_outputs = {id(t) for t in model.outputs}
    for node in nodes:
        layer = node.operation
        if not _is_weight_layer(layer) or calls[id(layer)] != 1 or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        users = consumers.get(id(out), [])
        if id(out) in model_outputs or len(users) != 1:
            continue
        batch_norm = users[0].operation
        if calls.get(id(batch_norm)) == 1 and _can_fold(layer, batch_norm, len(out.shape)):
            plan.folded_into[id(layer)] = batch_norm
            plan.folded_away.add(id(batch_norm))


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _fuses_into_producer(layer, plan: _Plan) -> bool:
    """Whether the converter merges `layer` into the op before it (folded BN, ReLU/ReLU6)."""
    if id(layer) in plan.folded_away:
        return True
    if isinstance(layer, keras.layers.ReLU):
        return not layer.negative_slope and not layer.threshold and layer.max_value in (None, 6)
    if isinstance(layer, keras.layers.Activation):
        return layer.activation in (keras.activations.relu, keras.activations.relu6)
    return False


def _add_quantization_points(model: keras.Model, plan: _Plan) -> None:
    """Tensors the converter does not quantize (fused away) and layers reading model inputs."""
    if isinstance(model, keras.Sequential):
        pairs = zip(model.layers, model.layers[1:], strict=False)
        plan.fused_outputs |= {id(a) for a, b in pairs if _fuses_into_producer(b, plan)}
        plan.input_consumers |= {id(model.layers[0])} if model.layers else set()
        return
    nodes = [node for depth in model._nodes_by_depth.values() for node in depth]
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
    plan = _Plan(folded_into={}, folded_away=set(), output_layers=set())
    for sub in [model, *(m for m in _all_layers(model) if isinstance(m, keras.Model))]:
        _add_folds(sub, plan)
    _add_quantization_points(model, plan)
    plan.output_layers = {id(t._keras_history.operation) for t in model.outputs}
    return plan


def batch_norm_folds(model: keras.Model) -> dict[int, keras.layers.BatchNormalization]:
    """id(conv/dense layer) -> the BatchNormalization the converter folds into it."""
    return _make_plan(model).folded_into


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
    layers = {layer.name: layer for layer in _all_layers(model)}
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
            twin = _FoldedAway(name=f"{layer.name}_folded")
            twin = _QuantizedOutput(twin) if quantizes_output(layer) else twin
        elif _is_weight_layer(layer):
            twin = _QuantizedLayer(
                layer, plan.folded_into.get(id(layer)), per_channel, quantizes_output(layer),
                quantize_logits=simulate_activations,
            )
        elif isinstance(layer, keras.layers.BatchNormalization):
            twin = _InferenceBatchNorm(layer)
            twin = _QuantizedOutput(twin) if quantizes_output(layer) else twin
        elif isinstance(layer, _QUANTIZED_OUTPUT_LAYERS) and quantizes_output(layer):
            twin = _QuantizedOutput(layer)
        else:
            twin = layer
        if simulate_activations and id(layer) in plan.input_consumers:
            twin = _QuantizedInput(twin, layer.name)
        return twin

    return keras.models.clone_model(model, clone_function=twin_layer, recursive=True)


def _twin_layers(qat_model: keras.Model):
    """Every layer of the twin, wrappers' inner layers and range quantizers included."""
    for layer in _all_layers(qat_model):
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
    ranges = [layer for layer in _twin_layers(qat_model) if isinstance(layer, _ActivationRange)]
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


def _calibration_pass(qat_model: keras.Model, ranges: list):
    """The twin's forward pass with every range widening to what it sees, compiled once.

    It runs on float weights and float activations, as the converter's calibration does,
    so the ranges are the ones the converter will measure.
    """
    compiled = getattr(qat_model, "_n6qat_calibration_pass", None)
    if compiled is not None:
        return compiled

    weights = [layer for layer in _twin_layers(qat_model) if isinstance(layer, _QuantizedLayer)]

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
        for layer in _twin_layers(qat_model)
        if isinstance(layer, _QuantizedLayer)
    }


def _optimizer(settings: QATSettings) -> keras.optimizers.Optimizer:
    common = {"learning_rate": settings.learning_rate, "clipnorm": settings.clipnorm}
    if settings.optimizer == "adamw":
        return keras.optimizers.AdamW(weight_decay=settings.weight_decay, **common)
    weight_decay = settings.weight_decay or None
    if settings.optimizer == "sgd":
        return keras.optimizers.SGD(momentum=0.9, weight_decay=weight_decay, **common)
    return keras.optimizers.Adam(weight_decay=weight_decay, **common)


def _batched(dataset: tf.data.Dataset, model: keras.Model, batch_size: int, name: str):
    """Batch a dataset of single examples; one that yields batches is used as it is."""
    spec = dataset.element_spec
    rank = len(model.inputs[0].shape)
    if not (isinstance(spec, tuple) and len(spec) == 2 and len(spec[0].shape) in (rank - 1, rank)):
        raise N6QATError(
            f"{name} must yield (features, target) pairs with features shaped like the "
            f"model input {tuple(model.inputs[0].shape)} (batched or not); got {spec}."
        )
    if len(spec[0].shape) == rank:
        return dataset
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


@dataclass(frozen=True)
class ValidationFiles:
    """Validation chunks with their files, for choosing the epoch by file-level INT8 metrics."""

    features: np.ndarray
    chunks: pd.DataFrame
    labels: list[str]
    pooling: str = "mean"
    threshold: float = 0.5
    io_dtype: str = "float32"


def simulated_int8(model: keras.Model, calibration: np.ndarray, per_channel: bool = True,
                   batch_size: int = 64) -> keras.Model:
    """The twin in full simulation (weights and every int8 tensor), ranges from ``calibration``.

    This is what the converter will deploy for the model's current weights; it shares
    the model's variables, so call ``recalibrate`` on it after the weights change.
    """
    twin = build_qat_model(model, per_channel, simulate_activations=True)
    twin.calibration_batches = _in_batches(calibration, batch_size)
    calibrate_activation_ranges(twin, twin.calibration_batches)
    return twin


def _in_batches(array: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [array[i : i + batch_size] for i in range(0, len(array), batch_size)]


def recalibrate(twin: keras.Model) -> None:
    """Re-derive a ``simulated_int8`` twin's ranges from its calibration set."""
    calibrate_activation_ranges(twin, twin.calibration_batches)


def _int8_scorer(model, settings: QATSettings, calibration, files: ValidationFiles):
    """Validation metrics of the model's current weights in INT8: the simulation's
    (``val_sim_*``) and, selecting with the TFLite, the converted model's (``val_int8_*``)."""
    from n6qat.convert import convert_int8, run_tflite
    from n6qat.evaluate import validation_metrics

    twin = simulated_int8(model, calibration, settings.per_channel, settings.batch_size)
    x = np.asarray(files.features, dtype=np.float32)

    def metrics(scores, prefix: str) -> dict[str, float]:
        found = validation_metrics(scores, files.chunks, files.labels, files.pooling,
                                   files.threshold)
        return {f"{prefix}{key}": value for key, value in found.items()}

    def score() -> dict[str, float]:
        recalibrate(twin)
        logs = metrics(twin.predict(x, batch_size=256, verbose=0), "val_sim_")
        if settings.select_with == "tflite":
            tflite = convert_int8(model, calibration, settings.per_channel, files.io_dtype)
            logs.update(metrics(run_tflite(tflite, x), "val_int8_"))
        return logs

    return score


def _selection(settings: QATSettings, scored: bool, validated: bool):
    from n6qat.fit import Selection

    if settings.selection == "last" or not (scored or validated):
        return Selection("epoch", "max")
    if not scored:
        return Selection("val_loss", "min")
    source = "int8" if settings.select_with == "tflite" else "sim"
    first, second = (f"val_{source}_file_top1", f"val_{source}_file_cmap")
    if settings.selection == "int8_file_cmap":
        first, second = second, first
    return Selection(first, "max", tie_break=second, guard=(first, second))


def distilled(batches, teacher: keras.Model, weight: float):
    """The batches with targets (labels + weight * teacher scores) / (1 + weight).

    Binary cross-entropy is linear in its target, so training on these targets is
    training on (task loss + weight * BCE against the frozen FP32 teacher) / (1 + weight);
    against the teacher's sigmoid outputs, BCE is their KL divergence plus a constant. The
    teacher is the model before QAT: it pulls the quantized model back to the FP32
    function instead of fitting the labels further.
    """
    scores = teacher.predict(batches.x, batch_size=256, verbose=0).astype(np.float32)
    return batches.with_targets((batches.y.numpy() + weight * scores) / (1.0 + weight))


def run_qat(
    model: keras.Model,
    train_ds,
    val_ds: tf.data.Dataset | None,
    settings: QATSettings,
    checkpoint_dir: Path,
    loss="binary_crossentropy",
    callbacks: Iterable[keras.callbacks.Callback] = (),
    calibration: np.ndarray | None = None,
    selection_files: ValidationFiles | None = None,
):
    """Fine-tune `model` in place on the INT8 simulation; return the ``n6qat.fit.FitResult``.

    ``train_ds``: an ``n6qat.fit.EpochBatches`` (resumable bit-exactly) or a tf.data
    dataset of examples (batched here with `settings.batch_size`) or of batches.
    Validation runs on the quantized twin. A backup of weights, optimizer state, history
    and the best epoch is written to `checkpoint_dir` after every epoch; rerunning with
    the same directory continues after the last finished epoch.

    With activation simulation and a `calibration` set (the chunks the converter will
    calibrate on), ranges come from that set, re-derived at every epoch start, instead
    of moving averages of batch ranges. With ``selection_files`` (and a calibration set)
    every epoch, and the starting weights as epoch 0, is scored in INT8 (the converted
    TFLite or the simulation, ``settings.select_with``) by file-level validation
    metrics; the best epoch (``settings.selection``) that loses neither top-1 nor cmAP
    against epoch 0 is kept, so QAT never keeps weights that quantize worse than the
    starting ones. Otherwise the lowest simulated validation loss is kept, or the last
    epoch without validation data.
    """
    from n6qat.fit import EpochBatches, fit_epochs

    checkpoint_dir = Path(checkpoint_dir)
    keras.utils.set_random_seed(settings.seed)
    if not isinstance(train_ds, EpochBatches):
        train_ds = _batched(train_ds, model, settings.batch_size, "train_ds")
    elif settings.distillation > 0:
        train_ds = distilled(train_ds, model, settings.distillation)
    val = None if val_ds is None else _batched(val_ds, model, settings.batch_size, "val_ds")
    trainable = {id(layer): (layer, layer.trainable) for layer in _all_layers(model)}
    try:
        twin = build_qat_model(
            model, settings.per_channel, settings.simulate_activations, settings.frozen_layers
        )
        epoch_begin = None
        if settings.simulate_activations and calibration is not None:
            for quantizer in _twin_layers(twin):
                if isinstance(quantizer, _ActivationRange):
                    quantizer.tracking = False
            batches = _in_batches(calibration, settings.batch_size)
            calibrate_activation_ranges(twin, batches)

            def epoch_begin(epoch: int) -> None:
                calibrate_activation_ranges(twin, batches)
        elif settings.simulate_activations:
            first = train_ds.dataset(0) if isinstance(train_ds, EpochBatches) else train_ds
            calibrate_activation_ranges(twin, (x for x, _ in first.take(CALIBRATION_BATCHES)))
        score = None
        if selection_files is not None and calibration is not None:
            score = _int8_scorer(model, settings, calibration, selection_files)
        twin.compile(
            optimizer=_optimizer(settings),
            loss=loss,
            metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="acc")],
        )
        result = fit_epochs(
            twin, model, train_ds, val, settings.epochs, checkpoint_dir,
            _selection(settings, score is not None, val is not None), settings.seed,
            score=score, score_initial=True, epoch_begin=epoch_begin, callbacks=callbacks,
        )
    finally:
        for layer, flag in trainable.values():
            layer.trainable = flag
    return result
