"""Reading converted .tflite files: operators, options, tensors, I/O, bad files."""

import numpy as np
import pytest

from n6qat.convert import convert_int8
from n6qat.errors import N6QATError
from n6qat.tflite_inspect import (
    dequantize,
    int8_problems,
    io_details,
    op_histogram,
    read_tflite,
)

INPUT_SHAPE = (16, 12, 1)


@pytest.fixture(scope="module")
def tflite_bytes():
    """An untrained model with one op of each kind whose options matter to the NPU."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inp = keras.Input(INPUT_SHAPE)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu6")(inp)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="valid")(x)
    x = layers.AveragePooling2D(2)(x)
    x = layers.Flatten()(x)
    out = layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inp, out, name="inspect_me")
    calibration = np.random.default_rng(0).normal(size=(16, *INPUT_SHAPE)).astype(np.float32)
    return convert_int8(model, calibration)


@pytest.fixture(scope="module")
def info(tflite_bytes):
    return read_tflite(tflite_bytes)


def _float_tflite(fn, select_tf_ops: bool = False) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS] + (
        [tf.lite.OpsSet.SELECT_TF_OPS] if select_tf_ops else []
    )
    return converter.convert()


def test_operators_come_in_execution_order(info):
    assert [op.opcode for op in info.operators] == [
        "QUANTIZE",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "AVERAGE_POOL_2D",
        "RESHAPE",
        "FULLY_CONNECTED",
        "SOFTMAX",
        "DEQUANTIZE",
    ]
    for before, after in zip(info.operators, info.operators[1:], strict=False):
        assert after.inputs[0] == before.outputs[0]  # a chain: each op feeds the next
    assert info.operators[0].inputs == info.inputs
    assert info.operators[-1].outputs == info.outputs


def test_operator_options(info):
    conv, depthwise, pool = info.operators[1:4]
    assert conv.options["strides"] == [2, 2] and conv.options["padding"] == "SAME"
    assert conv.options["fused_activation"] == "RELU6"
    assert depthwise.options["depth_multiplier"] == 2 and depthwise.options["padding"] == "VALID"
    assert pool.options["filter"] == [2, 2] and pool.options["strides"] == [2, 2]
    assert all(op.custom_code is None for op in info.operators)


def test_histogram_counts_every_operator(info):
    histogram = op_histogram(info)
    assert sum(histogram.values()) == len(info.operators) == 8
    assert histogram["CONV_2D"] == 1 and histogram["SOFTMAX"] == 1


def test_tensors_and_sizes(info, tflite_bytes):
    conv = info.operators[1]
    weights, activation = info.tensors[conv.inputs[1]], info.tensors[conv.outputs[0]]
    assert weights.shape == [8, 3, 3, 1] and weights.dtype == "int8" and weights.is_constant
    assert weights.size_bytes == 8 * 3 * 3
    assert activation.shape == [1, 8, 6, 8] and not activation.is_constant
    assert activation.size_bytes == 8 * 6 * 8 and len(activation.scales) == 1
    assert info.tensors[info.inputs[0]].dtype == "float32"
    assert info.size_bytes == len(tflite_bytes) and info.subgraph_count == 1
    assert int8_problems(info) == []


def test_io_details(info):
    io = io_details(info)
    assert [(t["shape"], t["dtype"]) for t in io["inputs"]] == [([1, 16, 12, 1], "float32")]
    assert [(t["shape"], t["dtype"]) for t in io["outputs"]] == [([1, 3], "float32")]
    assert io["inputs"][0]["name"] == info.tensors[info.inputs[0]].name
    assert io["inputs"][0]["quantization"] == {"scales": [], "zero_points": []}
    softmax_out = info.tensors[info.operators[-2].outputs[0]]  # int8 before DEQUANTIZE
    assert softmax_out.scales == [pytest.approx(1 / 256)] and softmax_out.zero_points == [-128]


def test_a_path_reads_like_bytes(tmp_path, tflite_bytes, info):
    path = tmp_path / "model.tflite"
    path.write_bytes(tflite_bytes)
    from_path = read_tflite(path)
    assert from_path.operators == info.operators and from_path.tensors == info.tensors
    assert from_path.source == str(path)


def test_a_text_file_is_not_a_model(tmp_path):
    path = tmp_path / "notes.tflite"
    path.write_text("this is a text file, not a flatbuffer\n" * 4)
    with pytest.raises(N6QATError, match=r"notes\.tflite is not a TFLite model"):
        read_tflite(path)
    with pytest.raises(N6QATError, match="not a TFLite model"):
        read_tflite(b"")


def test_a_truncated_model_is_reported(tmp_path, tflite_bytes):
    path = tmp_path / "cut.tflite"
    path.write_bytes(tflite_bytes[:100])
    with pytest.raises(N6QATError, match=r"cut\.tflite is truncated"):
        read_tflite(path)


def test_a_missing_file_is_reported(tmp_path):
    with pytest.raises(N6QATError, match=r"cannot read TFLite model .*absent\.tflite"):
        read_tflite(tmp_path / "absent.tflite")


def test_flex_ops_are_named_and_flagged():
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def determinant(x):
        return tf.linalg.det(tf.reshape(x, [1, 2, 2]))

    info = read_tflite(_float_tflite(determinant, select_tf_ops=True))
    [flex] = [op for op in info.operators if op.custom_code is not None]
    assert flex.opcode == "FLEX_MatrixDeterminant" and flex.custom_code == "FlexMatrixDeterminant"
    assert any("FLEX_MatrixDeterminant is a select-TF (FLEX) op" in p for p in int8_problems(info))


def test_opcodes_past_127_use_the_extended_builtin_code():
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def gelu(x):
        return tf.nn.gelu(x)

    info = read_tflite(_float_tflite(gelu))
    assert op_histogram(info) == {"GELU": 1}  # builtin code 150, deprecated code 127
    assert int8_problems(info) == ["op 0 GELU runs in float (tensor 0 'x' is float32)"]


def test_dequantize_per_tensor_and_per_channel():
    codes = np.array([[1, 2], [3, 4]], dtype=np.int8)
    assert dequantize(codes, [0.5], [1]).tolist() == [[0.0, 0.5], [1.0, 1.5]]
    assert dequantize(codes, [0.5, 2.0], [0, 0], axis=0).tolist() == [[0.5, 1.0], [6.0, 8.0]]
    assert dequantize(codes, [0.5, 2.0], [], axis=1).tolist() == [[0.5, 4.0], [1.5, 8.0]]
