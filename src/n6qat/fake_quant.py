"""Fake quantization on the TFLite converter's exact full-INT8 grids, as Keras layers.

The weight grid is the one the TF 2.21 converter writes (checked against converted
models in tests/test_qat.py): int8 in [-127, 127], zero point 0,
scale = max|w| / 127 per output channel (or per tensor), code = round(w * (1 / scale))
in float32 with ties rounded away from zero. A BatchNormalization the converter folds
(`n6qat.folding`) is folded into the kernel before quantizing, which matches
per-channel and per-tensor weights alike. Activations are per-tensor asymmetric int8
on calibrated ranges. The layers here wrap the original layers (sharing their
variables); `n6qat.int8_twin` puts them in place, and they are never serialized.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import keras
import tensorflow as tf
from keras import ops

from n6qat.errors import N6QATError
from n6qat.folding import batch_norm_factor_and_offset

WEIGHT_QMAX = 127
"""Narrow-range int8 weights: codes in [-127, 127], zero point 0."""

RANGE_MOMENTUM = 0.99
"""Moving-average momentum of the activation ranges tracked during QAT."""

_SEPARATE_ACTIVATIONS = (keras.activations.sigmoid, keras.activations.softmax)

_planning = [False]  # set by `planned_branches` while an inference function is traced


@contextmanager
def planned_branches() -> Iterator[None]:
    """Inference traced inside this context takes, in Python, the branch each layer's
    ``tf.cond`` would take on the current ranges (`branch_plan`), instead of tracing both
    branches and a cond. The values are the same; the trace is about 2 s shorter for the
    demo model. Only for a function cached per `branch_plan` (`n6qat.model.predict`): the
    ranges move at every recalibration, and a function traced on other ranges would keep
    their branches.
    """
    before = _planning[0]
    _planning[0] = True
    try:
        yield
    finally:
        _planning[0] = before


def _planned(condition) -> bool | None:
    """``condition()`` evaluated now on the variables' current values (lifted out of the
    trace), while `planned_branches` is on; otherwise None (trace a ``tf.cond``)."""
    if not _planning[0]:
        return None
    with tf.init_scope():
        return bool(condition())


def branch_plan(model: keras.Model) -> tuple[bool, ...]:
    """The branch every planned ``tf.cond`` of ``model`` takes in inference on its current
    ranges (empty for a model without fake quantization)."""
    conditions = (
        layer.integer_condition() if isinstance(layer, QuantizedLayer)
        else layer.fused_condition() if isinstance(layer, QuantizedOutput)
        else None
        for layer in model._flatten_layers(include_self=False)
    )  # fmt: skip
    return tuple(bool(condition) for condition in conditions if condition is not None)


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


def weight_scales(kernel, channel_axis: int | None):
    """The converter's symmetric int8 weight scales (max |w| / 127), kept as broadcastable
    dims: per index of `channel_axis` and all later ones, or one for the tensor (None)."""
    kernel = ops.convert_to_tensor(kernel)
    rank = len(kernel.shape)
    reduce_axes = tuple(range(rank if channel_axis is None else channel_axis % rank))
    max_abs = ops.max(ops.abs(kernel), axis=reduce_axes, keepdims=True)
    return max_abs / float(WEIGHT_QMAX)


def fake_quantize_weights(kernel, channel_axis: int | None, scale=None):
    """The kernel on the converter's int8 grid, with a straight-through gradient.

    `channel_axis`: scales per index of this axis and all later ones (see
    `quantization_channel_axis`); None for one scale per tensor. All-zero channels
    stay zero. `scale`: `weight_scales` of this kernel, when already computed.
    """
    kernel = ops.convert_to_tensor(kernel)
    scale = weight_scales(kernel, channel_axis) if scale is None else scale
    inverse_scale = 1.0 / ops.where(scale > 0, scale, ops.ones_like(scale))
    codes = ops.clip(_round_half_away_from_zero(kernel * inverse_scale), -WEIGHT_QMAX, WEIGHT_QMAX)
    quantized = ops.stop_gradient(codes * scale)
    # kernel - stop_gradient(kernel) is exactly 0: forward value is bit-exact, gradient 1.
    return quantized + (kernel - ops.stop_gradient(kernel))


def _nudged_range(range_min, range_max):
    """The range TF's FakeQuantWithMinMaxVars quantizes on: 0 made exactly representable
    (8 bits, wide range), as TFLite's asymmetric int8 does."""
    scale = (range_max - range_min) / 255.0
    zero_point = ops.clip(_round_half_away_from_zero(0.0 - range_min / scale), 0.0, 255.0)
    return (0.0 - zero_point) * scale, (255.0 - zero_point) * scale


_compiled_nudged_range = tf.function(_nudged_range)


def fake_quantize_activations(inputs, range_min, range_max, grid):
    """``inputs`` on the per-tensor asymmetric int8 grid of [range_min, range_max].

    Forward: TF's ``fake_quant_with_min_max_vars`` (bit-exact, range nudged so 0 is a
    level). Backward: its gradient for the inputs (straight through inside the nudged
    range, 0 outside) without the gradients for the range, which TF's op always computes
    (two full-tensor reductions per quantizer) and QAT never uses: the ranges are not
    trained, they are calibrated or tracked. ``grid``: the nudged range (low, high), as
    ``ActivationRange._grid`` gives it.
    """
    nudged_low, nudged_high = (ops.convert_to_tensor(bound) for bound in grid)

    def inside_range(x, upstream):
        inside = ops.logical_and(x >= nudged_low, x <= nudged_high)
        return upstream * ops.cast(inside, upstream.dtype)

    return _fake_quantize(inputs, range_min, range_max, inside_range)


def _fake_quantize_from_zero(inputs, range_min, range_max, nudged_high):
    """``fake_quantize_activations`` on a grid whose nudged range is [0, nudged_high],
    with the gradient of a ReLU before it: straight through on 0 < x < nudged_high, in
    one fused pass (ReLU6's gradient kernel on x rescaled so that nudged_high is 6)."""

    def relu_chain(x, upstream):
        return tf.raw_ops.Relu6Grad(gradients=upstream, features=x * (6.0 / nudged_high))

    return _fake_quantize(inputs, range_min, range_max, relu_chain)


def _fake_quantize(inputs, range_min, range_max, input_gradient):
    """TF's fake-quant forward with ``input_gradient(x, upstream)`` as its
    only gradient (the range enters as tensors, so no variable is captured)."""

    @tf.custom_gradient
    def quantize(x, low, high):
        y = tf.quantization.fake_quant_with_min_max_vars(
            x, low, high, num_bits=8, narrow_range=False
        )

        def grad(upstream):
            dx = input_gradient(x, upstream)
            return dx, ops.zeros_like(low), ops.zeros_like(high)

        return y, grad

    return quantize(inputs, ops.convert_to_tensor(range_min), ops.convert_to_tensor(range_max))


class ActivationRange(keras.layers.Layer):
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
        # The nudged range, stored by `store_grid` when calibration sets the range. Steps
        # on a calibrated range (tracking off) read it instead of deriving it again: some
        # 20 scalar ops per quantizer and step, a visible share of a small model's step.
        self.grid_low = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="grid_low"
        )
        self.grid_high = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="grid_high"
        )
        self.built = True

    def store_grid(self) -> None:
        """Store the nudged range of the current range (after every calibration).

        Derived in a compiled function, as the step derived it: eager float32 ops can
        differ in the last bits from the graph's (Grappler rewrites the arithmetic).
        """
        low, high = _compiled_nudged_range(
            ops.convert_to_tensor(self.range_min), ops.convert_to_tensor(self.range_max)
        )
        self.grid_low.assign(low)
        self.grid_high.assign(high)

    def _grid(self):
        """The nudged range: the stored one where only calibration sets the range."""
        if self.tracking:
            return _nudged_range(self.range_min, self.range_max)
        # Copies, not the variable reads themselves: a tf.cond branch that captures a bare
        # read fails to build its gradient (cond_v2 resolves the read to the eager handle).
        return tf.identity(self.grid_low.value), tf.identity(self.grid_high.value)

    def call(self, inputs, training=None):
        if self.calibrating or (training and self.tracking):
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
        quantized = fake_quantize_activations(inputs, self.range_min, self.range_max, self._grid())
        if training:
            return quantized
        return ops.where(self.initialized > 0, quantized, inputs)

    def after_relu(self, inputs, relu, cap: float, training=None):
        """``self(relu(inputs))`` where ``relu`` clamps to [0, cap], without running it when
        the int8 grid's own clamp does its work (its nudged range is [0, <= cap]).

        The forward values are bit-identical: the grid clamps to the same interval. The
        gradient is the ReLU-then-grid chain's (straight through on 0 < x < the grid's
        top), except at inputs exactly on the grid's top. Saves a full-tensor pass forward
        and backward for every conv + ReLU the converter fuses.
        """
        if self.calibrating or (training and self.tracking):
            return self(relu(inputs), training=training)
        low, high = self._grid()

        def fused():
            return _fake_quantize_from_zero(inputs, self.range_min, self.range_max, high)

        def unfused():
            return self(relu(inputs), training=training)

        # A batch-tracked grid is derived in the graph, whose last bits eager ops may not
        # reproduce: only a stored (calibrated) grid is planned.
        planned = None if training or self.tracking else _planned(lambda: self.fuses(cap))
        if planned is not None:
            return fused() if planned else unfused()
        return ops.cond(self._fuses(low, high, cap), fused, unfused)

    def fuses(self, cap: float):
        """Whether `after_relu` skips the ReLU (its grid is [0, <= cap]), as a tensor."""
        return self._fuses(*self._grid(), cap)

    def _fuses(self, low, high, cap: float):
        return ops.logical_and(
            ops.logical_and(ops.equal(low, 0.0), high <= cap), self.initialized > 0
        )

    def scale(self):
        """The int8 step of this tensor: (range_max - range_min) / 255, as TFLite's."""
        return (self.range_max - self.range_min) / 255.0

    def has_grid(self):
        """Whether calibration set a range wider than zero (a tensor always 0 has none)."""
        return ops.logical_and(self.initialized > 0, self.scale() > 0)

    def quantized_bias(self, bias, weight_scale):
        """``bias`` of a layer that reads this tensor, on the converter's int32 grid: steps
        of (this tensor's scale) x (the layer's weight scale, per output channel), rounded
        half away from zero; straight-through gradient. Unchanged before the range is set.

        A bias the converter rounds differently from the float one shifts every output of
        its channel alike: on a constant input (silence) a whole tensor can land one step
        off, and the layers after it magnify that.
        """
        step = self.scale() * ops.reshape(weight_scale, (-1,))
        valid = ops.logical_and(step > 0, self.initialized > 0)
        safe = ops.where(valid, step, ops.ones_like(step))
        quantized = ops.where(valid, _round_half_away_from_zero(bias / safe) * safe, bias)
        return ops.stop_gradient(quantized) + (bias - ops.stop_gradient(bias))

    def _track(self, bound, batch_value) -> None:
        moving = RANGE_MOMENTUM * bound + (1.0 - RANGE_MOMENTUM) * batch_value
        bound.assign(ops.where(self.initialized > 0, moving, batch_value))


def requantize_fixed_point(accumulator, multiplier, output_scale):
    """TFLite's requantization of an int32 accumulator (integer-valued float) by the real
    ``multiplier`` (input scale x weight scale / output scale; per output channel, the
    last axis): the int8 steps from the output's zero point, times ``output_scale``.

    TFLite's built-in kernels (the ones `n6qat.litert` runs) do it in fixed point: a
    rounding doubling high multiply by the multiplier's 31-bit mantissa (ties away from
    zero), then a right shift by its exponent rounding ties up (the reference kernels
    round those away from zero: they differ on negative ties only). The two roundings
    put a value within 2^-(shift + 1) steps of a half-way point on the other side of it
    from one plain rounding: one step off, on some 2^-shift of the values, and on every
    value of a constant (silent) input whose accumulator sits there. Computed in
    float64: exact for accumulators below 2^22.
    """
    f64 = tf.float64
    two = tf.constant(2.0, f64)
    multiplier = tf.cast(multiplier, f64)
    safe = tf.where(multiplier > 0, multiplier, tf.ones_like(multiplier))
    # frexp: multiplier = mantissa x 2^exponent, mantissa in [0.5, 1), as a 31-bit integer.
    exponent = tf.floor(tf.math.log(safe) / tf.math.log(two)) + 1.0
    exponent += tf.cast(safe / two**exponent >= 1.0, f64)
    exponent -= tf.cast(safe / two**exponent < 0.5, f64)
    mantissa = _round_half_away_from_zero(safe / two**exponent * 2.0**31)
    overflow = mantissa >= 2.0**31
    mantissa = tf.where(overflow, mantissa / 2.0, mantissa)
    exponent = tf.where(overflow, exponent + 1.0, exponent)
    tiny = tf.logical_or(exponent < -31.0, multiplier <= 0)  # TFLite: multiplier 0
    mantissa = tf.where(tiny, tf.zeros_like(mantissa), mantissa)
    exponent = tf.where(tiny, tf.zeros_like(exponent), exponent)
    # The high multiply's nudge rounds ties up (away from zero above 0, towards it below),
    # so both roundings are floor(v + 1/2); scaling by powers of two is exact.
    factor = mantissa * two ** (tf.maximum(exponent, 0.0) - 31.0)
    high = tf.floor(tf.cast(accumulator, f64) * factor + 0.5)
    steps = tf.floor(high * two ** tf.minimum(exponent, 0.0) + 0.5)
    return tf.cast(steps, tf.float32) * output_scale


class QuantizedLayer(keras.layers.Layer):
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
            ActivationRange(name=f"{layer.name}_range") if quantize_output else None
        )
        # The converter stores the pre-activation output of a sigmoid/softmax layer as int8
        # too (FULLY_CONNECTED, then LOGISTIC): quantize the logits as well.
        self.logit_range = (
            ActivationRange(name=f"{layer.name}_logit_range")
            if quantize_logits and layer.activation in _SEPARATE_ACTIVATIONS
            else None
        )

    def reads_range(self, input_range: ActivationRange) -> None:
        """Quantize the bias on the int32 grid of this input range (`quantized_bias`)."""
        # In __dict__: an attribute set the usual way would make Keras track the range as
        # a sublayer of this one too.
        self.__dict__["_input_range"] = input_range

    def writes_range(self, output_range: ActivationRange) -> None:
        """The int8 tensor the converter stores this layer's output in (the layer's own
        range, or that of the ReLU / folded BatchNormalization fused into it): outside
        training, the output is requantized onto it as TFLite's kernels do
        (`requantize_fixed_point`)."""
        self.__dict__["_stored_range"] = output_range

    def quantized_kernel_and_bias(self):
        kernel, bias, _ = self._quantized_kernel_bias_scale()
        return kernel, bias

    def _quantized_kernel_bias_scale(self):
        """The fake-quantized kernel and bias, and the weight scales (None in float)."""
        kernel = self.layer.kernel
        bias = self.layer.bias if self.layer.use_bias else None
        if self.batch_norm is not None:
            factor, offset = batch_norm_factor_and_offset(self.batch_norm)
            kernel = kernel * ops.reshape(factor, kernel.shape[self.out_axis :])
            bias = offset if bias is None else bias * factor + offset
        if self.float_weights:
            return kernel, bias, None
        scale = weight_scales(kernel, self.channel_axis)
        input_range = self.__dict__.get("_input_range")
        if bias is not None and input_range is not None:
            bias = input_range.quantized_bias(bias, scale)
        return fake_quantize_weights(kernel, self.channel_axis, scale), bias, scale

    def call(self, inputs, training=None):
        kernel, bias, scale = self._quantized_kernel_bias_scale()
        input_range = self.__dict__.get("_input_range")
        stored_range = (self.__dict__.get("_stored_range") if self.logit_range is None
                        else self.logit_range)  # fmt: skip
        if training or scale is None or input_range is None or stored_range is None:
            outputs = self._float_outputs(inputs, kernel, bias)
        else:  # the int8 kernels' arithmetic, once both grids are set

            def integer():
                return self._integer_outputs(
                    inputs, kernel, bias, scale, input_range, stored_range
                )

            def floating():
                return self._float_outputs(inputs, kernel, bias)

            planned = _planned(self.integer_condition)
            if planned is not None:
                outputs = integer() if planned else floating()
            else:
                outputs = tf.cond(self.integer_condition(), integer, floating)
        if self.logit_range is not None:
            outputs = self.logit_range(outputs, training=training)
        outputs = self.layer.activation(outputs)
        if self.logit_range is not None and not self.float_weights:
            # LOGISTIC / SOFTMAX write int8 with scale 1/256, zero point -128: [0, 255/256].
            outputs = tf.quantization.fake_quant_with_min_max_args(
                outputs, min=0.0, max=255.0 / 256.0, num_bits=8, narrow_range=False
            )
        if self.output_range is not None:
            outputs = self.output_range(outputs, training=training)
        return outputs

    def integer_condition(self):
        """Whether inference computes the output as the int8 kernels do (both grids set),
        as a tensor; None if this layer never does (float weights, no int8 grids)."""
        input_range = self.__dict__.get("_input_range")
        stored_range = (self.__dict__.get("_stored_range") if self.logit_range is None
                        else self.logit_range)  # fmt: skip
        if self.float_weights or input_range is None or stored_range is None:
            return None
        return tf.logical_and(input_range.has_grid(), stored_range.has_grid())

    def _op(self, inputs, kernel):
        layer = self.layer
        if isinstance(layer, keras.layers.Dense):
            return ops.matmul(inputs, kernel)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            return ops.depthwise_conv(
                inputs, kernel, strides=layer.strides, padding=layer.padding,
                dilation_rate=layer.dilation_rate, data_format=layer.data_format,
            )  # fmt: skip
        return layer.convolution_op(inputs, kernel)

    def _float_outputs(self, inputs, kernel, bias):
        outputs = self._op(inputs, kernel)
        return outputs if bias is None else ops.add(outputs, bias)

    def _integer_outputs(self, inputs, kernel, bias, scale, input_range, stored_range):
        """The output as TFLite's int8 kernels compute it: the int32 accumulator of int8
        codes (exact in float32 below 2^24) requantized in fixed point
        (`requantize_fixed_point`) onto ``stored_range``; no gradient.

        With per-channel weights, a bias over 2^30 int32 steps (an all-zero or near-zero
        channel: weight scale 0 or tiny) is what the converter makes of it: it enlarges
        the channel's weight scale to |bias| / (input scale x 2^30), so the bias is
        +-2^30 steps, and re-rounds the weights on it.
        """
        input_scale, out_scale = input_range.scale(), stored_range.scale()
        weight_scale = ops.reshape(scale, (-1,))
        wide = None
        if bias is not None and self.channel_axis is not None:  # per channel
            wide = ops.abs(bias) > input_scale * weight_scale * 2.0**30
            fitted = ops.abs(bias) / (input_scale * 2.0**30)
            weight_scale = ops.where(wide, fitted, weight_scale)
        scale_shaped = ops.reshape(weight_scale, scale.shape)
        safe = ops.where(scale_shaped > 0, scale_shaped, ops.ones_like(scale_shaped))
        codes = ops.clip(ops.round(kernel / safe), -WEIGHT_QMAX, WEIGHT_QMAX)
        accumulator = self._op(ops.round(inputs / input_scale), codes)
        if bias is not None:
            step = input_scale * weight_scale  # the int32 bias's scale
            steps = ops.round(bias / ops.where(step > 0, step, ops.ones_like(step)))
            accumulator += steps if wide is None else ops.where(wide, ops.sign(bias) * 2.0**30,
                                                                steps)  # fmt: skip
        multiplier = tf.cast(input_scale, tf.float64) * tf.cast(weight_scale, tf.float64)
        outputs = requantize_fixed_point(
            accumulator, multiplier / tf.cast(out_scale, tf.float64), out_scale
        )
        return tf.stop_gradient(outputs)


class InferenceBatchNorm(keras.layers.Layer):
    """A BatchNormalization not folded into a conv: always on its moving statistics."""

    def __init__(self, batch_norm):
        super().__init__(name=f"{batch_norm.name}_qat")
        self.batch_norm = batch_norm

    def call(self, inputs, mask=None):
        return self.batch_norm(inputs, training=False, mask=mask)


class FoldedAway(keras.layers.Layer):
    """Stands in for a BatchNormalization that the preceding layer's wrapper folded in."""

    def call(self, inputs, mask=None):
        return inputs


class QuantizedInput(keras.layers.Layer):
    """Fake-quantizes the model input (the converter's input QUANTIZE), then runs the layer."""

    def __init__(self, layer, name: str):
        super().__init__(name=f"{name}_in_qat")
        self.layer = layer
        self.input_range = ActivationRange(name=f"{name}_input_range")

    def call(self, inputs, training=None, mask=None):
        return self.layer(self.input_range(inputs, training=training))


class QuantizedOutput(keras.layers.Layer):
    """Runs an activation / Add layer, then fake-quantizes its output to int8."""

    def __init__(self, layer):
        super().__init__(name=f"{layer.name}_qat")
        self.layer = layer
        self.output_range = ActivationRange(name=f"{layer.name}_range")
        self.relu_cap = _relu_cap(layer)

    def call(self, inputs, training=None, mask=None):
        if self.relu_cap is not None:
            return self.output_range.after_relu(inputs, self.layer, self.relu_cap, training)
        return self.output_range(self.layer(inputs), training=training)

    def fused_condition(self):
        """Whether inference skips the ReLU (`ActivationRange.after_relu`), as a tensor;
        None where that is not planned (no ReLU, or a batch-tracked range)."""
        if self.relu_cap is None or self.output_range.tracking:
            return None
        return self.output_range.fuses(self.relu_cap)


def _relu_cap(layer) -> float | None:
    """The upper clamp of a plain ReLU / ReLU6 layer (inf for ReLU), else None."""
    if isinstance(layer, keras.layers.ReLU):
        if layer.negative_slope or layer.threshold:
            return None
        return float("inf") if layer.max_value is None else float(layer.max_value)
    if isinstance(layer, keras.layers.Activation):
        if layer.activation is keras.activations.relu6:
            return 6.0
        if layer.activation is keras.activations.relu:
            return float("inf")
    return None
