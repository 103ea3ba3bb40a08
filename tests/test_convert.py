"""Full-INT8 conversion of a small trained model, calibration choice, agreement metrics."""

import numpy as np
import pytest

from n6qat.convert import convert_int8, select_representative
from n6qat.errors import N6QATError
from n6qat.litert import run_tflite
from n6qat.metrics import agreement
from n6qat.tflite_inspect import int8_problems, io_details, op_histogram, read_tflite
from n6qat.validation_npz import save_validation_npz

INPUT_SHAPE = (32, 24, 1)
N_CLASSES = 4


def _texture_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise over a texture that is the class: row stripes, column stripes, checks, offset."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n)
    rows, cols = np.indices(INPUT_SHAPE[:2])
    textures = np.stack(
        [(-1.0) ** rows, (-1.0) ** cols, (-1.0) ** (rows + cols), np.ones_like(rows, float)]
    )
    x = rng.normal(0.0, 0.3, size=(n, *INPUT_SHAPE)) + textures[labels][..., None]
    return x.astype(np.float32), labels


def _tiny_model():
    import keras
    from keras import layers

    inp = keras.Input(INPUT_SHAPE, name="features")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(16, 1)(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(N_CLASSES, activation="sigmoid")(x)
    return keras.Model(inp, out, name="tiny_texture")


@pytest.fixture(scope="module")
def trained():
    import keras

    keras.utils.set_random_seed(0)
    x, labels = _texture_task(512, seed=0)
    model = _tiny_model()
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    model.fit(x, np.eye(N_CLASSES, dtype=np.float32)[labels], epochs=6, batch_size=32, verbose=0)
    x_test, labels_test = _texture_task(96, seed=1)
    return model, x[:64], x_test, labels_test, model.predict(x_test, verbose=0)


@pytest.fixture(scope="module")
def converted(trained):
    model, calibration, *_ = trained
    tflite_bytes = convert_int8(model, calibration)
    return tflite_bytes, read_tflite(tflite_bytes)


def _weight_and_bias(info, opcode):
    ops = [op for op in info.operators if op.opcode == opcode]
    return [(info.tensors[op.inputs[1]], op) for op in ops]


def test_the_task_is_learned(trained):
    *_, labels_test, keras_out = trained
    assert np.mean(np.argmax(keras_out, axis=-1) == labels_test) > 0.9


def test_float32_io_and_batch_one(converted):
    _, info = converted
    io = io_details(info)
    assert [(t["dtype"], t["shape"]) for t in io["inputs"]] == [("float32", [1, 32, 24, 1])]
    assert [(t["dtype"], t["shape"]) for t in io["outputs"]] == [("float32", [1, N_CLASSES])]


def test_internals_are_int8(converted):
    _, info = converted
    assert int8_problems(info) == []
    # BatchNormalization is folded into the convolutions: no MUL/ADD left over.
    assert op_histogram(info) == {
        "CONV_2D": 2,
        "QUANTIZE": 1,
        "DEPTHWISE_CONV_2D": 1,
        "MEAN": 1,
        "FULLY_CONNECTED": 1,
        "LOGISTIC": 1,
        "DEQUANTIZE": 1,
    }


def test_conv_weights_are_per_channel_symmetric(converted):
    _, info = converted
    convs = _weight_and_bias(info, "CONV_2D")
    assert sorted(w.shape[0] for w, _ in convs) == [8, 16]
    for weights, op in convs:
        assert weights.dtype == "int8" and weights.is_constant
        assert len(weights.scales) == weights.shape[0]  # OHWI: output channels first
        assert weights.zero_points == [0] * weights.shape[0]
        assert weights.quantized_dimension == 0
        source, bias = info.tensors[op.inputs[0]], info.tensors[op.inputs[2]]
        assert bias.dtype == "int32"
        np.testing.assert_allclose(
            bias.scales, np.array(weights.scales) * source.scales[0], rtol=1e-5
        )
    [(depthwise, _)] = _weight_and_bias(info, "DEPTHWISE_CONV_2D")
    assert len(depthwise.scales) == depthwise.shape[3] == 8
    assert depthwise.quantized_dimension == 3
    assert depthwise.zero_points == [0] * 8


def test_int8_outputs_follow_keras(trained, converted):
    *_, x_test, _, keras_out = trained
    metrics = agreement(keras_out, run_tflite(converted[0], x_test))
    assert metrics["cosine"] > 0.99
    assert metrics["top1_agreement"] >= 0.95
    assert metrics["max_abs_error"] < 0.1


def test_run_tflite_reads_a_path_like_bytes(tmp_path, trained, converted):
    *_, x_test, _, _ = trained
    path = tmp_path / "m.tflite"
    path.write_bytes(converted[0])
    np.testing.assert_array_equal(
        run_tflite(path, x_test[:5]), run_tflite(converted[0], x_test[:5])
    )
    with pytest.raises(N6QATError, match=r"do not fit TFLite model .*m\.tflite"):
        run_tflite(path, x_test[:, :16])


def test_run_tflite_kernel_sets(trained, converted):
    """The built-in kernels (every score's) follow the reference kernels; XNNPACK is there."""
    *_, x_test, _, _ = trained
    builtin = run_tflite(converted[0], x_test)
    assert agreement(run_tflite(converted[0], x_test, kernels="reference"), builtin)[
        "cosine"
    ] > 0.999
    assert run_tflite(converted[0], x_test[:3], kernels="xnnpack").shape == builtin[:3].shape
    with pytest.raises(N6QATError, match="unknown TFLite kernels 'gpu'"):
        run_tflite(converted[0], x_test[:3], kernels="gpu")


def test_per_tensor_option_gives_one_scale(trained):
    model, calibration, *_ = trained
    info = read_tflite(convert_int8(model, calibration[:16], per_channel=False))
    for weights, _ in _weight_and_bias(info, "CONV_2D") + _weight_and_bias(
        info, "DEPTHWISE_CONV_2D"
    ):
        assert len(weights.scales) == 1 and weights.zero_points == [0]
    assert int8_problems(info) == []


def test_int8_io_option(trained):
    model, calibration, x_test, _, keras_out = trained
    tflite_bytes = convert_int8(model, calibration[:16], io_dtype="int8")
    info = read_tflite(tflite_bytes)
    io = io_details(info)
    assert io["inputs"][0]["dtype"] == "int8" and io["outputs"][0]["dtype"] == "int8"
    assert len(io["inputs"][0]["quantization"]["scales"]) == 1
    assert "QUANTIZE" not in op_histogram(info) and "DEQUANTIZE" not in op_histogram(info)
    assert int8_problems(info) == []
    assert agreement(keras_out, run_tflite(tflite_bytes, x_test))["cosine"] > 0.99


def _int8_content(tflite_bytes: bytes) -> list:
    """Ops, tensors (quantization and constant data) of a .tflite, without tensor names."""
    import tflite

    from n6qat.tflite_inspect import _buffer_bytes

    model = tflite.Model.GetRootAs(tflite_bytes, 0)
    info = read_tflite(tflite_bytes)
    content = [(op.opcode, op.inputs, op.outputs, op.options) for op in info.operators]
    for t in info.tensors:
        content.append((t.shape, t.dtype, t.scales, t.zero_points, t.quantized_dimension,
                        _buffer_bytes(model, tflite_bytes, t.index)))  # fmt: skip
    return content


@pytest.mark.parametrize(
    "per_channel, io_dtype", [(True, "float32"), (False, "float32"), (True, "int8")]
)
def test_converting_without_signature_gives_the_same_int8_model(trained, per_channel, io_dtype):
    """QAT scores its epochs on the faster unsigned conversion: it must be the deliverable's
    INT8 model, tensor for tensor, with the same outputs; only names and signature differ."""
    from ai_edge_litert.interpreter import Interpreter

    model, calibration, x_test, *_ = trained
    signed = convert_int8(model, calibration, per_channel, io_dtype)
    unsigned = convert_int8(model, calibration, per_channel, io_dtype, signature=False)
    assert _int8_content(unsigned) == _int8_content(signed)
    assert np.array_equal(run_tflite(unsigned, x_test), run_tflite(signed, x_test))
    assert list(Interpreter(model_content=signed).get_signature_list()) == ["serving_default"]
    # The traced function is kept on the model: new weights must be read at every conversion.
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    first = convert_int8(copy, calibration, per_channel, io_dtype, signature=False)
    for weight in copy.trainable_weights:
        weight.assign(weight.numpy() * 1.01)
    changed = convert_int8(copy, calibration, per_channel, io_dtype, signature=False)
    assert _int8_content(first) == _int8_content(unsigned)
    assert _int8_content(changed) == _int8_content(convert_int8(copy, calibration, per_channel,
                                                                io_dtype))  # fmt: skip
    assert _int8_content(changed) != _int8_content(unsigned)


def test_bad_arguments_name_the_model(trained):
    model, calibration, *_ = trained
    with pytest.raises(N6QATError, match="io_dtype"):
        convert_int8(model, calibration, io_dtype="uint8")
    with pytest.raises(N6QATError, match="tiny_texture"):
        convert_int8(model, calibration[:, :16])
    bad = calibration[:4].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(N6QATError, match="NaN"):
        convert_int8(model, bad)


def test_a_layer_without_int8_kernel_is_a_clear_error():
    import keras

    class Erfinv(keras.layers.Layer):
        def call(self, x):
            return keras.ops.erfinv(keras.ops.tanh(x) * 0.5)

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(Erfinv()(inp)), name="has_erfinv")
    calibration = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    with pytest.raises(N6QATError, match=r"has_erfinv.*Erfinv"):
        convert_int8(model, calibration)


def _convert_with_float_fallback(model, tmp_path, dynamic_range: bool) -> bytes:
    import tensorflow as tf

    spec = tf.TensorSpec((1, *INPUT_SHAPE), tf.float32)
    model.export(tmp_path, format="tf_saved_model", input_signature=[spec], verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path))
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    if dynamic_range:  # int8 weights, float activations
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


@pytest.mark.parametrize("dynamic_range", [False, True], ids=["float", "dynamic_range"])
def test_float_fallback_models_are_flagged(trained, tmp_path, dynamic_range):
    info = read_tflite(_convert_with_float_fallback(trained[0], tmp_path, dynamic_range))
    problems = int8_problems(info)
    assert any("CONV_2D runs in float" in p for p in problems)
    assert any("FULLY_CONNECTED runs in float" in p for p in problems)


def test_select_representative_is_deterministic_and_skips_silence():
    rng = np.random.default_rng(3)
    labels = rng.integers(-1, 4, 400)
    energies = rng.uniform(0.0, 1.0, 400)
    first = select_representative(labels, energies, 60, 0.2, seed=7)
    again = select_representative(labels, energies, 60, 0.2, seed=7)
    other = select_representative(labels, energies, 60, 0.2, seed=8)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len(first) == 60 and len(np.unique(first)) == 60
    assert np.all(energies[first] >= 0.2)


def test_select_representative_takes_an_equal_share_of_each_class():
    labels = np.repeat([-1, 0, 1, 2], [100, 100, 100, 5])
    energies = np.ones(len(labels))
    chosen = select_representative(labels, energies, 40, 0.5, seed=0)
    counts = {int(c): int(np.sum(labels[chosen] == c)) for c in (-1, 0, 1, 2)}
    assert counts[2] == 5  # the small class gives all it has, the others share 35
    assert sorted(counts[c] for c in (-1, 0, 1)) == [11, 12, 12]


def test_select_representative_takes_all_when_few_are_loud():
    labels = np.array([0, 1, 0, 1, -1])
    energies = np.array([0.0, 0.5, 0.9, 0.01, 0.7])
    np.testing.assert_array_equal(select_representative(labels, energies, 10, 0.1, 0), [1, 2, 4])
    with pytest.raises(N6QATError, match=r"convert\.calibration_energy_threshold"):
        select_representative(labels, energies, 10, 1.5, 0)


def test_agreement_matches_hand_computed_values():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    test = np.array([[1.0, 0.0], [1.0, 0.0]])
    m = agreement(ref, test)
    assert m["cosine"] == pytest.approx(0.5)  # dot 1 over norms sqrt(2) * sqrt(2)
    assert m["cosine_per_sample_mean"] == pytest.approx(0.5)  # samples: 1 and 0
    assert m["rmse"] == pytest.approx(np.sqrt(0.5))  # squared errors 0, 0, 1, 1
    assert m["mae"] == pytest.approx(0.5)
    assert m["max_abs_error"] == pytest.approx(1.0)
    assert m["l2r"] == pytest.approx(1.0)  # sqrt(2) / sqrt(2)
    assert m["pearson_r"] == pytest.approx(0.0)  # centred [.5,-.5,-.5,.5] . [.5,-.5,.5,-.5]
    assert m["top1_agreement"] == pytest.approx(0.5)


def test_agreement_of_a_scaled_copy_and_of_single_unit_outputs():
    ref = np.array([[0.2, 0.6, 0.1], [0.9, 0.3, 0.4]])
    m = agreement(ref, 2 * ref)
    assert m["cosine"] == pytest.approx(1.0) and m["pearson_r"] == pytest.approx(1.0)
    assert m["l2r"] == pytest.approx(1.0) and m["top1_agreement"] == 1.0
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean(ref**2)))
    binary = agreement(np.array([[0.4], [0.7], [0.9]]), np.array([[0.6], [0.8], [0.1]]))
    assert binary["top1_agreement"] == pytest.approx(1 / 3)
    with pytest.raises(N6QATError, match="shapes"):
        agreement(ref, ref[:1])


def test_save_validation_npz_writes_stedgeai_keys_atomically(tmp_path):
    inputs = np.random.default_rng(0).normal(size=(3, *INPUT_SHAPE))  # float64 on purpose
    outputs = np.full((3, N_CLASSES), 0.25, dtype=np.float32)
    path = tmp_path / "sub" / "network_val.npz"
    save_validation_npz(path, inputs, outputs)
    with np.load(path) as data:
        assert sorted(data.files) == ["m_inputs_1", "m_outputs_1"]
        assert data["m_inputs_1"].dtype == np.float32 and data["m_inputs_1"].shape == inputs.shape
        np.testing.assert_allclose(data["m_inputs_1"], inputs, rtol=1e-6)
        np.testing.assert_array_equal(data["m_outputs_1"], outputs)
    assert [p.name for p in path.parent.iterdir()] == ["network_val.npz"]
    with pytest.raises(N6QATError, match="network_val.npz"):
        save_validation_npz(path, inputs, outputs[:2])
