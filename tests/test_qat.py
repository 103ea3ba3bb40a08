"""QAT: the fake-quantized weights equal what the TFLite converter writes; training,
saving, resuming and validation work on the shared-variable twin."""

import math

import numpy as np
import pytest
import tensorflow as tf

try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:  # TensorFlow already initialised by another test module
    pass

import keras  # noqa: E402
import tflite  # noqa: E402

from n6qat import fake_quant, int8_twin, qat  # noqa: E402
from n6qat.errors import N6QATError  # noqa: E402

L = keras.layers
_OP_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


# ---------------------------------------------------------------- helpers


def _convert(model: keras.Model, per_channel: bool, input_shape) -> bytes:
    """Full-integer conversion with float32 I/O, as the workflow's convert stage does."""
    rng = np.random.default_rng(7)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        [rng.normal(size=(1, *input_shape)).astype(np.float32)] for _ in range(4)
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if not per_channel:
        converter._experimental_disable_per_channel = True
    return converter.convert()


def _weighted_ops(flatbuffer: bytes):
    """(op names, [(op, int8 weights, scales, zero points, quantized dim)]) in graph order."""
    model = tflite.Model.GetRootAsModel(flatbuffer, 0)
    graph = model.Subgraphs(0)
    names, weighted = [], []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = _OP_NAMES[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        names.append(name)
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            tensor = graph.Tensors(op.Inputs(1))
            params = tensor.Quantization()
            codes = model.Buffers(tensor.Buffer()).DataAsNumpy().view(np.int8)
            weighted.append(
                (
                    name,
                    codes.reshape(tensor.ShapeAsNumpy()),
                    params.ScaleAsNumpy().astype(np.float32),
                    params.ZeroPointAsNumpy(),
                    params.QuantizedDimension(),
                )
            )
    return names, weighted


def _to_keras_layout(op: str, codes: np.ndarray, kernel_shape) -> np.ndarray:
    """TFLite weight layout -> Keras kernel layout (output channels last)."""
    if op == "CONV_2D":  # OHWI -> HWIO
        return codes.transpose(1, 2, 3, 0)
    if op == "DEPTHWISE_CONV_2D":  # [1, H, W, C*M] -> (H, W, C, M)
        return codes[0].reshape(kernel_shape)
    return codes.T  # FULLY_CONNECTED [out, in] -> (in, out)


def _randomize_batch_norms(model: keras.Model, rng) -> None:
    """Non-trivial moving statistics, gamma with negative entries and one zero."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            gamma = rng.uniform(0.3, 2.0, n) * np.where(np.arange(n) % 3 == 1, -1.0, 1.0)
            gamma[-1] = 0.0
            layer.set_weights(
                [gamma, rng.normal(0, 0.5, n), rng.normal(0, 0.3, n), rng.uniform(0.2, 3.0, n)]
            )


def _bn_model(rng) -> keras.Model:
    """Conv2D, DepthwiseConv2D (M=1, M=2) and Dense, each followed by BatchNormalization."""
    inputs = keras.Input((8, 8, 6))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = L.ReLU()(L.BatchNormalization(name="bn_conv")(x))
    x = L.DepthwiseConv2D(3, padding="same", name="dw1")(x)
    x = L.ReLU()(L.BatchNormalization(name="bn_dw1")(x))
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw2")(x)
    x = L.ReLU()(L.BatchNormalization(name="bn_dw2")(x))
    x = L.GlobalAveragePooling2D()(x)
    x = L.ReLU()(L.BatchNormalization(name="bn_dense")(L.Dense(12, name="dense")(x)))
    outputs = L.Dense(3, activation="sigmoid", name="head")(x)
    model = keras.Model(inputs, outputs)
    _randomize_batch_norms(model, rng)
    kernel, bias = model.get_layer("conv").get_weights()
    kernel[..., 2] = 0.0  # an all-zero output channel: scale 0 must not give NaN
    model.get_layer("conv").set_weights([kernel, bias])
    return model


def _tiny_model() -> keras.Model:
    """A small sigmoid multi-label model with fixed layer names (checkpoints match by name)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="features")
    x = L.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = L.ReLU(6.0, name="r1")(L.BatchNormalization(name="b1")(x))
    x = L.DepthwiseConv2D(3, padding="same", name="d1")(x)
    x = L.BatchNormalization(name="b2")(x)
    x = L.ReLU(6.0, name="r2")(L.Add(name="add")([x, L.Conv2D(4, 1, name="skip")(inputs)]))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(3, activation="sigmoid", name="head")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    _randomize_batch_norms(model, np.random.default_rng(3))
    return model


def _examples(n: int, seed: int) -> tf.data.Dataset:
    """Unbatched (features, multi-hot target) pairs; a third are negatives (all zero)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    y = (rng.uniform(size=(n, 3)) < 0.4).astype(np.float32)
    y[::3] = 0.0
    return tf.data.Dataset.from_tensor_slices((x, y))


# ---------------------------------------------------------------- weight grid


def _near_ties(rng, n_in: int, n_out: int) -> np.ndarray:
    """Kernel whose values sit on or one float step off code + 0.5, at odd scales."""
    kernel = np.zeros((1, 1, n_in, n_out), np.float32)
    for c in range(n_out):
        max_abs = np.float32(rng.uniform(0.01, 3.0))
        scale = max_abs / np.float32(127)
        ties = ((rng.integers(-126, 126, n_in - 1) + 0.5) * scale).astype(np.float32)
        step = rng.choice([-1.0, 0.0, 1.0], n_in - 1).astype(np.float32)
        kernel[0, 0, :, c] = [max_abs, *np.nextafter(ties, ties + step * np.abs(ties))]
    return kernel


def test_rounding_matches_the_converter_on_and_near_ties():
    # Channels 0-1: scale exactly 1, so the codes are the values rounded half away from 0.
    # Channels 2-17: values within one float step of a tie at odd scales, where only the
    # converter's arithmetic (w * (1 / scale) in float32) gives its codes.
    exact = np.zeros((1, 1, 64, 2), np.float32)
    exact[0, 0, :8, 0] = [127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 0.49999997]
    exact[0, 0, :8, 1] = [-127, 4.5, 5.5, -4.5, -5.5, 100.5, -100.5, 6.5]
    kernel = np.concatenate([exact, _near_ties(np.random.default_rng(0), 64, 16)], axis=3)
    inputs = keras.Input((2, 2, 64))
    model = keras.Model(inputs, L.Conv2D(18, 1, name="c")(inputs))
    model.get_layer("c").set_weights([kernel, np.zeros(18, np.float32)])

    _, [(_, codes, scales, _, _)] = _weighted_ops(_convert(model, True, (2, 2, 64)))
    mine = fake_quant.fake_quantize_weights(kernel, channel_axis=3).numpy()[0, 0]

    expected = [[127, 1, 2, 3, -1, -3, 4, 0], [-127, 5, 6, -5, -6, 101, -101, 7]]
    np.testing.assert_array_equal(scales[:2], [1.0, 1.0])
    np.testing.assert_array_equal(codes[:2, 0, 0, :8], expected)
    np.testing.assert_array_equal(mine, codes[:, 0, 0, :].T.astype(np.float32) * scales)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_qat_kernels_equal_the_converters_int8_weights(per_channel, tmp_path):
    model = _bn_model(np.random.default_rng(1))
    twin = int8_twin.build_qat_model(model, per_channel=per_channel)
    kernels = int8_twin.quantized_kernels(twin)

    # Convert the saved original model, as the workflow does.
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    names, weighted = _weighted_ops(_convert(reloaded, per_channel, (8, 8, 6)))

    # TF 2.21 folds every BN here into the preceding op, Dense+BN included: no MUL/ADD left.
    assert names == [
        "QUANTIZE", "CONV_2D", "DEPTHWISE_CONV_2D", "DEPTHWISE_CONV_2D", "MEAN",
        "FULLY_CONNECTED", "FULLY_CONNECTED", "LOGISTIC", "DEQUANTIZE",
    ]  # fmt: skip
    layer_names = ["conv", "dw1", "dw2", "dense", "head"]
    expected_dims = [0, 3, 3, 0, 0]
    for name, dim, (op, codes, scales, zero_points, qdim) in zip(
        layer_names, expected_dims, weighted, strict=True
    ):
        kernel = kernels[name]
        assert np.all(zero_points == 0)
        assert codes.min() >= -127 and codes.max() <= 127
        axis = fake_quant.quantization_channel_axis(reloaded.get_layer(name))
        channels = kernel.shape[axis:] if per_channel else ()
        assert scales.size == int(np.prod(channels))
        assert qdim == (dim if per_channel else 0)
        scale = scales.reshape(channels)
        # Dequantized in float32, the precision the QAT step computes in.
        dequantized = _to_keras_layout(op, codes, kernel.shape).astype(np.float32) * scale
        error = np.abs(kernel - dequantized)
        assert np.all(error <= 1e-6 * scale), f"{name}: max error {error.max()}"
        assert np.isfinite(kernel).all()
    assert not np.any(kernels["conv"][..., 2])


def _int32_biases(flatbuffer: bytes) -> list[np.ndarray]:
    """The dequantized int32 bias of every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED."""
    model = tflite.Model.GetRootAsModel(flatbuffer, 0)
    graph = model.Subgraphs(0)
    biases = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = _OP_NAMES[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            if op.InputsLength() < 3 or op.Inputs(2) < 0:
                biases.append(None)
                continue
            tensor = graph.Tensors(op.Inputs(2))
            codes = model.Buffers(tensor.Buffer()).DataAsNumpy().view(np.int32)
            scales = tensor.Quantization().ScaleAsNumpy().astype(np.float64)
            biases.append(codes * scales)
    return biases


def test_simulated_biases_sit_on_the_converters_int32_grid(tmp_path):
    """With activations simulated, every bias (BN offsets folded in) is rounded to the
    converter's int32 steps (input scale x weight scale): a float bias can round an
    output the other way, for every value of a constant (silent) input at once."""
    keras.utils.set_random_seed(0)  # the kernels too: not the RNG state earlier tests leave
    model = _bn_model(np.random.default_rng(1))
    rng = np.random.default_rng(7)  # the samples _convert calibrates on
    calibration = np.concatenate([rng.normal(size=(1, 8, 8, 6)) for _ in range(4)])
    twin = int8_twin.build_qat_model(model, per_channel=True, simulate_activations=True)
    int8_twin.calibrate_activation_ranges(twin, [calibration.astype(np.float32)])
    model.save(tmp_path / "model.keras")
    converted = _int32_biases(_convert(keras.saving.load_model(tmp_path / "model.keras"),
                                       True, (8, 8, 6)))  # fmt: skip
    wrappers = [layer for layer in int8_twin.twin_layers(twin)
                if isinstance(layer, fake_quant.QuantizedLayer)]  # fmt: skip
    assert len(wrappers) == len(converted) == 5
    for wrapper, expected in zip(wrappers, converted, strict=True):
        _, bias = wrapper.quantized_kernel_and_bias()
        if expected is None:  # the converter leaves out an all-zero bias
            assert not np.any(bias.numpy()), wrapper.name
            continue
        np.testing.assert_allclose(bias.numpy(), expected, rtol=1e-6, atol=0,
                                   err_msg=wrapper.name)  # fmt: skip
    # Without activation simulation there is no input scale: the bias stays float.
    plain = int8_twin.build_qat_model(model, per_channel=True)
    float_bias = [w.quantized_kernel_and_bias()[1] for w in int8_twin.twin_layers(plain)
                  if isinstance(w, fake_quant.QuantizedLayer)]  # fmt: skip
    assert any(not np.allclose(b.numpy(), e, rtol=1e-6, atol=0)
               for b, e in zip(float_bias, converted, strict=True) if e is not None)  # fmt: skip


def _builtin_requantize(accumulator: int, multiplier: float) -> int:
    """TFLite's built-in kernels' MultiplyByQuantizedMultiplier, in Python integers."""
    mantissa, exponent = math.frexp(multiplier)
    fixed = math.floor(mantissa * 2**31 + 0.5)
    if fixed == 2**31:
        fixed, exponent = fixed // 2, exponent + 1
    if exponent < -31:
        return 0
    product = accumulator * 2 ** max(exponent, 0) * fixed
    nudge = 2**30 if product >= 0 else 1 - 2**30
    high = abs(product + nudge) // 2**31 * (1 if product + nudge >= 0 else -1)
    shift = max(-exponent, 0)
    return (high + (1 << shift - 1)) >> shift if shift else high  # ties up


def test_fixed_point_requantization_is_tflites_on_and_near_ties():
    rng = np.random.default_rng(5)
    multipliers = np.concatenate([np.exp(rng.uniform(np.log(1e-5), np.log(0.99), 14)),
                                  [0.5, 1.0, 1.7, 0.0163896]])  # fmt: skip
    rows = []
    for m in multipliers:
        ties = (rng.integers(-60, 60, 40) + 0.5) / m  # accumulators whose product is a tie
        near = np.concatenate([np.floor(ties), np.ceil(ties), rng.integers(-2**21, 2**21, 40)])
        rows.append(np.clip(near, -2**21, 2**21))
    accumulators = np.stack(rows, axis=1).astype(np.float32)  # (120, channels)
    out_scale = tf.constant(0.25, tf.float32)
    got = fake_quant.requantize_fixed_point(accumulators, multipliers, out_scale).numpy() / 0.25
    expected = [[_builtin_requantize(int(a), float(m)) for a, m in zip(row, multipliers,
                                                                       strict=True)]
                for row in accumulators]  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(expected, np.float32))
    # Not one plain rounding: the two roundings differ from it on some values.
    assert np.any(got != np.round(accumulators * multipliers.astype(np.float64)))


def _relu_model() -> keras.Model:
    """Conv2D -> ReLU (reading the model input), Conv2D + BN -> ReLU, a sigmoid head."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU(name="r1")(L.Conv2D(6, 1, name="c1")(inputs))
    x = L.ReLU(name="r2")(L.BatchNormalization(name="b2")(L.Conv2D(5, 3, name="c2")(x)))
    outputs = L.Dense(2, activation="sigmoid", name="head")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    _randomize_batch_norms(model, np.random.default_rng(4))
    c1 = model.get_layer("c1")
    c1.set_weights([c1.get_weights()[0], np.random.default_rng(6).normal(0, 0.3, 6)])
    c2 = model.get_layer("c2")  # channel 0 near zero: the converter enlarges its scale
    kernel, bias = c2.get_weights()
    kernel[..., 0] *= 1e-30
    c2.set_weights([kernel, bias])
    return model


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_simulated_conv_outputs_equal_the_builtin_int8_kernels(per_channel, tmp_path,
                                                               monkeypatch):  # fmt: skip
    """Outside training, every conv output the twin stores as int8 is the value TFLite's
    built-in kernels compute (fixed-point requantization, two roundings), constant
    (silent) inputs included; one plain rounding of the float output is not."""
    from n6qat.litert import load_interpreter

    model = _relu_model()
    rng = np.random.default_rng(7)  # the samples _convert calibrates on
    calibration = np.concatenate([rng.normal(size=(1, 8, 8, 3)) for _ in range(4)])
    twin = int8_twin.build_qat_model(model, per_channel, simulate_activations=True)
    int8_twin.calibrate_activation_ranges(twin, [calibration.astype(np.float32)])
    model.save(tmp_path / "model.keras")
    flatbuffer = _convert(keras.saving.load_model(tmp_path / "model.keras"), per_channel,
                          (8, 8, 3))
    interpreter = load_interpreter(flatbuffer, preserve_all_tensors=True)
    convs = [op["outputs"][0] for op in interpreter._get_ops_details()
             if op["op_name"] == "CONV_2D"]  # fmt: skip
    x = np.concatenate([np.random.default_rng(8).normal(size=(24, 8, 8, 3)),
                        np.zeros((1, 8, 8, 3)), np.full((1, 8, 8, 3), 0.7)]).astype(np.float32)

    def differing(twin) -> list[int]:
        seen = {}
        original = fake_quant.QuantizedOutput.call

        def recording(self, inputs, training=None, mask=None):
            seen[self.output_range.name] = out = original(self, inputs, training=training)
            return out

        counts = [0, 0]
        with monkeypatch.context() as patch:
            patch.setattr(fake_quant.QuantizedOutput, "call", recording)
            for sample in x:
                twin(sample[None], training=False)
                interpreter.set_tensor(interpreter.get_input_details()[0]["index"], sample[None])
                interpreter.invoke()
                for i, (name, index) in enumerate(zip(("r1_range", "r2_range"), convs,
                                                      strict=True)):  # fmt: skip
                    scale, zero_point = interpreter.get_tensor_details()[index]["quantization"]
                    tflite = interpreter.get_tensor(index).astype(np.float32) - zero_point
                    counts[i] += int(np.sum(np.round(seen[name].numpy() / scale) != tflite))
        return counts

    assert differing(twin) == [0, 0]
    with monkeypatch.context() as patch:  # the float output, rounded once
        patch.setattr(fake_quant.QuantizedLayer, "_integer_outputs",
                      lambda self, inputs, kernel, bias, *_: self._float_outputs(
                          inputs, kernel, bias))  # fmt: skip
        plain = int8_twin.build_qat_model(model, per_channel, simulate_activations=True)
        int8_twin.calibrate_activation_ranges(plain, [calibration.astype(np.float32)])
        assert sum(differing(plain)) > 0


def test_a_layer_reading_a_range_calibration_never_moved_runs_in_float():
    """A ReLU that is 0 on every calibration sample has no int8 grid (scale 0): the
    layer after it keeps the float arithmetic instead of dividing by that scale."""
    inputs = keras.Input((4, 4, 2))
    dead = L.ReLU(name="dead")(L.Conv2D(2, 1, kernel_initializer="zeros",
                                        bias_initializer=keras.initializers.Constant(-1.0),
                                        name="c0")(inputs))  # fmt: skip
    x = L.ReLU(name="r")(L.Conv2D(3, 1, bias_initializer="ones", name="c")(dead))
    model = keras.Model(inputs, L.Dense(1, activation="sigmoid")(L.Flatten()(x)))
    twin = int8_twin.build_qat_model(model, per_channel=True, simulate_activations=True)
    x = np.random.default_rng(0).normal(size=(8, 4, 4, 2)).astype(np.float32)
    int8_twin.calibrate_activation_ranges(twin, [x])
    assert np.isfinite(twin(x, training=False).numpy()).all()


def test_planned_branches_give_the_cond_graphs_values_and_follow_the_ranges():
    """`n6qat.model.predict` traces an INT8 twin with the branches its current ranges
    take (no tf.cond): the same values as the cond graph, and a new trace once a
    recalibration flips a branch (here: a ReLU that was always 0 gets a grid)."""
    from n6qat.model import predict

    inputs = keras.Input((4, 4, 2))
    c0 = L.Conv2D(2, 1, kernel_initializer="zeros",
                  bias_initializer=keras.initializers.Constant(-1.0), name="c0")  # fmt: skip
    x = L.ReLU(name="r")(L.Conv2D(3, 1, bias_initializer="ones", name="c")(L.ReLU()(c0(inputs))))
    x = L.ReLU(max_value=6.0, name="after_add")(L.Add()([x, L.Conv2D(3, 1, name="d")(inputs)]))
    model = keras.Model(inputs, L.Dense(2, activation="sigmoid")(L.Flatten()(x)))
    x = np.random.default_rng(0).normal(size=(40, 4, 4, 2)).astype(np.float32)
    twin = int8_twin.simulated_int8(model, x, per_channel=True, batch_size=16)
    with_cond = tf.function(lambda batch: twin(batch, training=False))

    first = fake_quant.branch_plan(twin)
    assert False in first and True in first  # "c" reads the dead ReLU: float arithmetic
    np.testing.assert_array_equal(predict(twin, x), with_cond(x).numpy())
    c0.kernel.assign(np.random.default_rng(1).normal(size=(1, 1, 2, 2)))
    c0.bias.assign([0.1, 0.0])
    int8_twin.recalibrate(twin)
    assert fake_quant.branch_plan(twin) != first
    np.testing.assert_array_equal(predict(twin, x), with_cond(x).numpy())
    assert len(twin.__dict__["_n6qat_predict_functions"]) == 2


def test_fake_quantization_is_bit_identical_in_graph_and_passes_gradients():
    kernel = tf.Variable(np.random.default_rng(2).normal(size=(3, 3, 4, 5)).astype(np.float32))
    eager = fake_quant.fake_quantize_weights(kernel, 3)
    graph = tf.function(lambda: fake_quant.fake_quantize_weights(kernel, 3))()
    np.testing.assert_array_equal(eager.numpy(), graph.numpy())

    scale = np.abs(kernel.numpy()).max(axis=(0, 1, 2)) / 127
    codes = eager.numpy() / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert np.abs(codes).max() == pytest.approx(127, abs=1e-4)

    weights = tf.constant(np.arange(180, dtype=np.float32).reshape(kernel.shape))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fake_quant.fake_quantize_weights(kernel, None) * weights)
    np.testing.assert_array_equal(tape.gradient(loss, kernel).numpy(), weights.numpy())


def test_quantization_channel_axis():
    assert fake_quant.quantization_channel_axis(L.Conv2D(2, 3)) == 3
    assert fake_quant.quantization_channel_axis(L.DepthwiseConv2D(3)) == 2
    assert fake_quant.quantization_channel_axis(L.Dense(2)) == 1
    with pytest.raises(N6QATError, match="no quantized kernel"):
        fake_quant.quantization_channel_axis(L.ReLU())


# ---------------------------------------------------------------- the twin


def test_twin_shares_variables_and_runs_batch_norm_on_moving_statistics():
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(4, 3, activation="relu", name="c")(inputs)  # activation: BN not foldable
    x = L.BatchNormalization(name="bn")(x)
    outputs = L.Dense(2, activation="sigmoid", name="head")(L.Flatten()(x))
    model = keras.Model(inputs, outputs)
    _randomize_batch_norms(model, np.random.default_rng(4))
    twin = int8_twin.build_qat_model(model, frozen_layers=("head",))
    assert isinstance(twin.get_layer("bn_qat"), fake_quant.InferenceBatchNorm)

    model_variables = {id(v) for v in model.weights}
    assert {id(v) for v in twin.weights} == model_variables
    assert not model.get_layer("head").trainable
    assert "head" not in {v.path.split("/")[0] for v in twin.trainable_weights}

    x = np.random.default_rng(5).normal(size=(16, 8, 8, 2)).astype(np.float32)
    np.testing.assert_array_equal(twin(x, training=True), twin(x, training=False))
    assert np.abs(twin(x).numpy() - model(x).numpy()).max() > 1e-5


def test_sequential_model_folds_batch_norm_like_a_functional_one():
    rng = np.random.default_rng(8)
    sequential = keras.Sequential(
        [keras.Input((6, 6, 2)), L.Conv2D(4, 3, name="c"), L.BatchNormalization(name="bn"),
         L.ReLU(), L.Flatten(), L.Dense(1, activation="sigmoid", name="head")]
    )  # fmt: skip
    _randomize_batch_norms(sequential, rng)
    functional = keras.Model(sequential.inputs, sequential.outputs)  # same layers

    twins = [int8_twin.build_qat_model(m, per_channel=False) for m in (sequential, functional)]
    for twin in twins:
        names = [
            type(layer).__name__ for layer in twin.layers if type(layer).__name__ != "InputLayer"
        ]
        assert names[:2] == ["QuantizedLayer", "FoldedAway"]
    x = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
    np.testing.assert_array_equal(twins[0](x), twins[1](x))
    assert np.abs(twins[0](x) - sequential(x)).max() > 0


def test_unknown_frozen_layer_and_bad_settings_are_user_errors():
    with pytest.raises(N6QATError, match="nope"):
        int8_twin.build_qat_model(_tiny_model(), frozen_layers=("nope",))
    with pytest.raises(N6QATError, match="optimizer"):
        qat.QATSettings(optimizer="rmsprop")
    with pytest.raises(N6QATError, match="epochs"):
        qat.QATSettings(epochs=0)


def test_calibrated_ranges_store_their_grid_and_train_bit_identically(monkeypatch):
    """Calibration stores each quantizer's nudged range; a step on calibrated ranges reads
    it instead of deriving it: the same values, outputs and gradients, bit for bit."""
    model = _tiny_model()
    x = tf.constant(np.random.default_rng(7).normal(size=(16, 8, 8, 1)).astype(np.float32))
    y = tf.constant((np.random.default_rng(8).uniform(size=(16, 3)) < 0.4).astype(np.float32))
    twin = int8_twin.build_qat_model(model, simulate_activations=True)
    ranges = [q for q in int8_twin.twin_layers(twin) if isinstance(q, fake_quant.ActivationRange)]
    for q in ranges:
        q.tracking = False
    int8_twin.calibrate_activation_ranges(twin, [x])

    @tf.function
    def derived(q):
        return fake_quant._nudged_range(q.range_min, q.range_max)

    for q in ranges:
        low, high = derived(q)
        assert (float(q.grid_low), float(q.grid_high)) == (float(low), float(high))

    def step():
        with tf.GradientTape() as tape:
            out = twin(x, training=True)
            loss = keras.losses.binary_crossentropy(y, out)
        return [out, *tape.gradient(loss, model.trainable_variables)]

    stored = tf.function(step)()
    monkeypatch.setattr(
        fake_quant.ActivationRange, "_grid",
        lambda self: fake_quant._nudged_range(self.range_min, self.range_max),
    )  # fmt: skip
    for a, b in zip(stored, tf.function(step)(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_activation_ranges_calibrate_then_track_in_the_train_step():
    model = _tiny_model()
    twin = int8_twin.build_qat_model(model, simulate_activations=True)
    ranges = {
        layer.name: layer
        for layer in int8_twin.twin_layers(twin)
        if isinstance(layer, fake_quant.ActivationRange)
    }
    # Every tensor the converter stores as int8: the input (read by c1 and skip), ReLU6
    # outputs (conv+BN+ReLU6 and ADD+ReLU6 are fused ops), the BN-folded depthwise output
    # and the skip conv output feeding ADD, the pooled vector, the head's logits (its
    # FULLY_CONNECTED output, before LOGISTIC); not the sigmoid output itself.
    assert set(ranges) == {
        "c1_input_range", "skip_input_range", "r1_range", "b2_folded_range", "skip_range",
        "r2_range", "pool_range", "head_logit_range",
    }
    x = np.random.default_rng(6).normal(size=(32, 8, 8, 1)).astype(np.float32)
    plain = int8_twin.build_qat_model(model)(x).numpy()

    int8_twin.calibrate_activation_ranges(twin, [x[:16], x[16:]])
    r1 = ranges["r1_range"]
    assert float(r1.range_min) == 0.0 and 0.0 < float(r1.range_max) <= 6.0
    assert np.abs(twin(x).numpy() - plain).max() > 1e-5

    before = float(r1.range_max)
    twin.compile(optimizer="adam", loss="binary_crossentropy")
    twin.train_on_batch(x * 3, np.zeros((32, 3), np.float32))
    assert float(r1.range_max) != before


# ---------------------------------------------------------------- run_qat


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One QAT run on the tiny model, per-tensor with an outlier weight so that
    quantization visibly changes the outputs."""
    tmp = tmp_path_factory.mktemp("qat")
    model = _tiny_model()
    kernel, bias = model.get_layer("c1").get_weights()
    kernel[0, 0, 0, 0] = 8 * np.abs(kernel).max()
    model.get_layer("c1").set_weights([kernel, bias])
    before = [w.copy() for w in model.get_weights()]
    skip_before = model.get_layer("skip").get_weights()[0].copy()
    settings = qat.QATSettings(
        epochs=2, learning_rate=1e-2, batch_size=16, per_channel=False, frozen_layers=("skip",),
        simulate_activations=False,
    )
    history = qat.run_qat(model, _examples(64, 0), _examples(32, 1), settings, tmp / "ckpt")
    model.save(tmp / "qat.keras")
    return model, before, history, settings, tmp, skip_before


def test_run_qat_trains_the_original_which_saves_and_loads_as_plain_keras(trained):
    model, before, history, _, tmp, skip_before = trained
    loaded = keras.saving.load_model(tmp / "qat.keras")  # no custom_objects

    assert all(type(layer).__module__.startswith("keras.") for layer in loaded.layers)
    assert [type(layer).__name__ for layer in loaded.layers] == [
        type(layer).__name__ for layer in _tiny_model().layers
    ]
    for saved, trained_w in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(saved, trained_w)
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)]
    assert any(changed)
    skip = model.get_layer("skip")
    np.testing.assert_array_equal(skip.get_weights()[0], skip_before)  # frozen: unchanged
    assert skip.trainable  # flag restored after QAT
    assert [entry["epoch"] for entry in history.history] == [1, 2]
    assert all("loss" in entry and "val_loss" in entry for entry in history.history)


def test_validation_runs_on_the_quantized_simulation(trained):
    model, _, history, settings, *_ = trained
    val = _examples(32, 1).batch(settings.batch_size)
    twin = int8_twin.build_qat_model(model, per_channel=False)
    twin.compile(loss="binary_crossentropy")
    model.compile(loss="binary_crossentropy")

    quantized_loss = twin.evaluate(val, verbose=0)
    float_loss = model.evaluate(val, verbose=0)
    x = np.concatenate([features for features, _ in val.as_numpy_iterator()])
    assert np.abs(twin.predict(x, verbose=0) - model.predict(x, verbose=0)).max() > 1e-4
    # The kept epoch's val_loss is the twin's to float precision; the float model's is not.
    kept = next(e for e in history.history if e["epoch"] == history.best_epoch)
    assert kept["val_loss"] == min(e["val_loss"] for e in history.history)
    assert kept["val_loss"] == pytest.approx(quantized_loss, abs=1e-6)
    assert abs(float_loss - quantized_loss) > 5e-5


class _Killed(Exception):
    pass


class _KillInSecondEpoch(keras.callbacks.Callback):
    """Raises a few batches into the second epoch, as if the job were killed there."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == 1:
            raise _Killed()


class _Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.iterations = [], []

    def on_train_begin(self, logs=None):
        self.iterations.append(int(self.model.optimizer.iterations))

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_train_end(self, logs=None):
        self.iterations.append(int(self.model.optimizer.iterations))


def test_killed_run_resumes_after_the_last_finished_epoch(tmp_path):
    initial = _tiny_model().get_weights()
    settings = qat.QATSettings(epochs=2, learning_rate=1e-2, batch_size=16)
    steps = 64 // 16

    def fresh_model():  # a restarted job reloads the float model
        model = _tiny_model()
        model.set_weights(initial)
        return model

    with pytest.raises(_Killed):
        qat.run_qat(
            fresh_model(), _examples(64, 0), None, settings, tmp_path / "ckpt",
            callbacks=[_KillInSecondEpoch()],
        )  # fmt: skip
    record = _Record()
    resumed = fresh_model()
    batches = _examples(64, 0).batch(16)  # batched datasets are taken as they come
    history = qat.run_qat(resumed, batches, None, settings, tmp_path / "ckpt", callbacks=[record])
    assert record.epochs == [1]
    assert record.iterations == [steps, 2 * steps]
    assert len(history.history) == 2

    # A rerun after the last epoch trains no more and returns the whole history.
    again = _Record()
    rerun = qat.run_qat(
        fresh_model(), batches, None, settings, tmp_path / "ckpt", callbacks=[again]
    )
    assert again.epochs == [] and again.iterations == []
    assert rerun.history == history.history

    uninterrupted = fresh_model()
    reference = qat.run_qat(uninterrupted, _examples(64, 0), None, settings, tmp_path / "ref")
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical across the interruption
    assert [e["loss"] for e in history.history] == [e["loss"] for e in reference.history]


def test_ranges_follow_the_calibration_set_not_batches(tmp_path):
    """With a calibration set, ranges are its min/max, fixed within each epoch."""

    class RangeProbe(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_end(self, batch, logs=None):
            ranges = [layer for layer in int8_twin.twin_layers(self.model)
                      if isinstance(layer, fake_quant.ActivationRange)]
            self.seen.append({r.name: float(r.range_max) for r in ranges})

    model = _tiny_model()
    calibration = 3 * np.random.default_rng(9).normal(size=(48, 8, 8, 1)).astype(np.float32)
    settings = qat.QATSettings(epochs=1, batch_size=16, simulate_activations=True)
    probe = RangeProbe()
    qat.run_qat(model, _examples(64, 0), None, settings, tmp_path / "ck",
                callbacks=[probe], calibration=calibration)
    assert len(probe.seen) == 4 and all(seen == probe.seen[0] for seen in probe.seen)
    assert probe.seen[0]["c1_input_range"] == pytest.approx(float(calibration.max()))


class _KillInThirdEpoch(_KillInSecondEpoch):
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 2 and batch == 1:
            raise _Killed()


def test_a_backup_torn_by_a_kill_is_never_read(tmp_path):
    """A job killed while writing its epoch backup (SLURM preemption) still resumes:
    the torn write is a temporary file that the state file never names."""
    settings = qat.QATSettings(epochs=3, learning_rate=1e-2, batch_size=16)
    with pytest.raises(_Killed):
        qat.run_qat(_tiny_model(), _examples(64, 0), None, settings, tmp_path / "ckpt",
                    callbacks=[_KillInThirdEpoch()])
    finished = sorted(p.name for p in (tmp_path / "ckpt").glob("*.npz"))
    (tmp_path / "ckpt" / ".epoch-3.partial.npz").write_bytes(b"PK\x03\x04torn")
    record = _Record()
    history = qat.run_qat(_tiny_model(), _examples(64, 0), None, settings, tmp_path / "ckpt",
                          callbacks=[record])
    assert finished == ["best-2.npz", "epoch-2.npz"]
    assert record.epochs == [2]  # resumed after the last finished epoch
    assert len(history.history) == 3


def _selection_data():
    import pandas as pd

    rng = np.random.default_rng(4)
    x_val = rng.normal(size=(24, 8, 8, 1)).astype(np.float32)
    chunks = pd.DataFrame({
        "source": "val", "path": [f"f{i // 2}.wav" for i in range(24)],
        "label_index": np.repeat(np.arange(12) % 3, 2), "row": np.arange(24),
    })
    calibration = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
    return qat.ValidationFiles(x_val, chunks, ["a", "b", "c"]), calibration


def test_a_scored_run_resumes_bit_identically_on_recalibrated_ranges(tmp_path):
    """The training twin also scores the epochs (and recalibrates for them); a run killed
    mid-epoch resumes on ranges of the restored weights: same weights and history."""
    files, calibration = _selection_data()
    settings = qat.QATSettings(epochs=3, learning_rate=3e-2, batch_size=16,
                               select_with="simulation", selection="last")
    initial = _tiny_model().get_weights()

    def run(folder, callbacks=()):
        model = _tiny_model()
        model.set_weights(initial)
        result = qat.run_qat(model, _examples(64, 0), None, settings, tmp_path / folder,
                             calibration=calibration, selection_files=files,
                             callbacks=callbacks)  # fmt: skip
        return model, result

    with pytest.raises(_Killed):
        run("ckpt", [_KillInSecondEpoch()])
    resumed, history = run("ckpt")
    reference, expected = run("ref")
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert history.history == expected.history


def test_scoring_in_the_background_gives_the_same_history_and_weights(tmp_path):
    """The worker process converts and runs each epoch's TFLite as the training process
    would: the same metrics, so the same kept epoch and weights."""
    files, calibration = _selection_data()
    settings = qat.QATSettings(epochs=3, learning_rate=3e-2, batch_size=16)
    runs = []
    for background in (True, False):
        model = _tiny_model()
        result = qat.run_qat(
            model, _examples(64, 0), None, settings, tmp_path / str(background),
            calibration=calibration, selection_files=files, background_scoring=background,
        )
        runs.append((model.get_weights(), result))
    (weights, result), (expected_weights, expected) = runs
    assert "val_int8_file_top1" in result.history[0]
    assert result.history == expected.history and result.best_epoch == expected.best_epoch
    for a, b in zip(weights, expected_weights, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("select_with", ["tflite", "simulation"])
def test_qat_keeps_the_best_int8_epoch_that_loses_nothing_to_epoch_0(tmp_path, select_with):
    """Epochs (the starting weights as epoch 0 too) are scored in INT8 by file-level
    validation metrics; the best one that loses neither top-1 nor cmAP to epoch 0 and
    strictly beats its top-1 is kept (else epoch 0), and its INT8 model scores exactly
    what the history says."""
    from n6qat.convert import convert_int8
    from n6qat.evaluate import validation_metrics
    from n6qat.litert import run_tflite

    model = _tiny_model()
    files, calibration = _selection_data()
    x_val, chunks, labels = files.features, files.chunks, files.labels
    settings = qat.QATSettings(epochs=3, learning_rate=3e-2, batch_size=16,
                               select_with=select_with)
    result = qat.run_qat(
        model, _examples(64, 0), None, settings, tmp_path / "ck", calibration=calibration,
        selection_files=files,
    )
    source = "int8" if select_with == "tflite" else "sim"
    top1, cmap = f"val_{source}_file_top1", f"val_{source}_file_cmap"
    assert [e["epoch"] for e in result.history] == [0, 1, 2, 3]
    start = result.history[0]
    admitted = [start] + [
        e for e in result.history[1:] if e[top1] > start[top1] and e[cmap] >= start[cmap]
    ]
    best = max(admitted, key=lambda e: (e[top1], e[cmap]))
    assert result.best_epoch == best["epoch"]
    if select_with == "tflite":
        scores = run_tflite(convert_int8(model, calibration), x_val)
    else:
        scores = int8_twin.simulated_int8(model, calibration).predict(x_val, verbose=0)
    metrics = validation_metrics(scores, chunks, labels)
    assert metrics["file_top1"] == best[top1]
    assert metrics["file_cmap"] == pytest.approx(best[cmap], abs=1e-6)


@pytest.mark.parametrize("max_loss", [0.0, 100.0])
def test_qat_with_the_gate_prefers_epochs_that_pass_it_against_the_fp32_reference(
    tmp_path, max_loss
):
    """With the INT8 gate's limits, the FP32 reference's validation metrics are measured
    as the gate measures them, and the kept epoch is the gated selection's on the history."""
    from n6qat import fit
    from n6qat.evaluate import validation_metrics
    from n6qat.gate import GateSettings

    model = _tiny_model()
    files, calibration = _selection_data()
    expected_fp32 = validation_metrics(
        model.predict(files.features, batch_size=256, verbose=0), files.chunks, files.labels
    )
    assert qat.reference_metrics(model, files) == expected_fp32
    gate = GateSettings(min_simulation_cosine=0.99, max_loss_vs_fp32=max_loss,
                        max_loss_vs_ptq=max_loss, metrics=("file_top1",))  # fmt: skip
    settings = qat.QATSettings(epochs=3, learning_rate=3e-2, batch_size=16,
                               select_with="simulation")  # fmt: skip
    result = qat.run_qat(
        model, _examples(64, 0), None, settings, tmp_path / "ck", calibration=calibration,
        selection_files=files, gate=gate,
    )
    rule = qat._selection(settings, True, False, gate, expected_fp32)
    assert rule.gate == (fit.GateLimit("val_sim_file_top1", expected_fp32["file_top1"],
                                       max_loss, max_loss),)  # fmt: skip
    assert fit.replay(result.history, rule, 3) == (result.best_epoch, 3)
    plain = qat._selection(settings, True, False)
    if max_loss == 100.0:  # every epoch passes: the guard alone decides
        assert fit.replay(result.history, plain, 3)[0] == result.best_epoch


def test_fused_relu_quantizer_is_bit_identical_forward_and_the_relu_chain_backward():
    """Where a ReLU6's output grid starts at 0 the twin skips the ReLU (the grid clamps
    the same): outputs bit-identical to ReLU then fake-quant, in training and inference,
    and gradients equal to the chain's (which differ only at inputs exactly on the
    grid's top)."""
    model = _tiny_model()
    x = tf.constant(np.random.default_rng(5).normal(size=(16, 8, 8, 1)).astype(np.float32))
    y = tf.constant((np.random.default_rng(6).uniform(size=(16, 3)) < 0.4).astype(np.float32))
    twins = []
    for fused in (True, False):
        twin = int8_twin.build_qat_model(model, simulate_activations=True)
        int8_twin.calibrate_activation_ranges(twin, [x])
        outputs = [
            q for q in int8_twin.twin_layers(twin) if isinstance(q, fake_quant.QuantizedOutput)
        ]
        assert any(q.relu_cap == 6.0 for q in outputs)
        if not fused:
            for q in outputs:
                q.relu_cap = None
        for q in int8_twin.twin_layers(twin):
            if isinstance(q, fake_quant.ActivationRange):
                q.tracking = False
        twins.append(twin)

    def step(twin):
        with tf.GradientTape() as tape:
            out = twin(x, training=True)
            loss = keras.losses.binary_crossentropy(y, out)
        return out, tape.gradient(loss, model.trainable_variables)

    (out_a, grads_a), (out_b, grads_b) = step(twins[0]), step(twins[1])
    np.testing.assert_array_equal(out_a.numpy(), out_b.numpy())
    np.testing.assert_array_equal(twins[0](x).numpy(), twins[1](x).numpy())
    for a, b in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_distillation_blends_teacher_scores_and_drops_metrics_of_soft_targets(tmp_path):
    """QAT+distill trains on (labels + weight * teacher) / (1 + weight); the history keeps
    validation accuracy and AUC (on labels) but not training ones (on soft targets)."""
    from n6qat.fit import EpochBatches

    model = _tiny_model()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(48, 8, 8, 1)).astype(np.float32)
    y = (rng.uniform(size=(48, 3)) < 0.4).astype(np.float32)
    batches = EpochBatches(x, y, np.arange(48), batch_size=16, seed=0)
    teacher = model.predict(x, verbose=0)
    blended = qat.distilled(batches, model, 0.5)
    np.testing.assert_allclose(blended.y.numpy(), (y + 0.5 * teacher) / 1.5, rtol=1e-6)

    val = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(16)
    for weight, train_metrics in ((1.0, False), (0.0, True)):
        settings = qat.QATSettings(epochs=1, batch_size=16, distillation=weight)
        result = qat.run_qat(_tiny_model(), EpochBatches(x, y, np.arange(48), 16, 0), val,
                             settings, tmp_path / f"ck{weight}")
        logs = result.history[-1]
        assert {"loss", "val_acc", "val_auc"} <= set(logs)
        assert ({"acc", "auc"} <= set(logs)) is train_metrics
