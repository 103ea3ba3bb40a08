"""The host-side STM32N6 check on real converted models (the project's DS-CNN and
deliberately bad ones) and on hand-made graphs for what the converter never writes."""

import json
import logging
import math
import tempfile
from dataclasses import replace

import numpy as np
import pytest

from n6qat.convert import convert_int8
from n6qat.errors import N6QATError
from n6qat.features import FeatureSettings
from n6qat.litert import run_tflite
from n6qat.metrics import METRIC_NAMES, agreement, stedgeai_metrics
from n6qat.n6 import (
    HOST_METRICS_ROW,
    activation_fit,
    check_and_report,
    check_model,
    format_host_check,
    live_activation_bytes,
    write_host_check,
)
from n6qat.n6_ops import (
    graph_positions,
    place_operators,
    placement_findings,
    quantization_findings,
    shape_findings,
)
from n6qat.tflite_inspect import ModelInfo, OperatorInfo, TensorInfo
from n6qat.validation_npz import save_validation_npz

SMALL = FeatureSettings(sample_rate=8000, chunk_duration=1.0, n_fft=128, spec_width=32, n_mels=16)
RNG = np.random.default_rng(0)


# --- real models, converted once per module ---------------------------------------------------


@pytest.fixture(scope="module")
def dscnn(tmp_path_factory):
    """The project's DS-CNN, converted to full INT8, with its validation .npz."""
    from n6qat.model import build_dscnn

    model = build_dscnn(SMALL, n_classes=3, width=0.5, depth=2)
    x = RNG.random((12, *SMALL.input_shape), dtype=np.float32)
    folder = tmp_path_factory.mktemp("dscnn")
    path, npz = folder / "dscnn_int8.tflite", folder / "dscnn_validation.npz"
    path.write_bytes(convert_int8(model, x[:8]))
    save_validation_npz(npz, x, model.predict(x, verbose=0))
    return path, npz


def _small_model(body, input_shape=(8, 8, 3), classes=4):
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input(input_shape)
    x = layers.GlobalAveragePooling2D()(body(inputs))
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x))


def _calibration(model, n=8):
    return RNG.normal(size=(n, *model.input_shape[1:])).astype(np.float32)


def _convert_allowing_float(model) -> bytes:
    """INT8 where a kernel exists, float elsewhere: the converter's float fallback."""
    import tensorflow as tf

    calibration = _calibration(model)
    with tempfile.TemporaryDirectory() as folder:
        spec = tf.TensorSpec((1, *model.input_shape[1:]), tf.float32)
        model.export(folder, format="tf_saved_model", input_signature=[spec], verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None]] for x in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return converter.convert()


@pytest.fixture(scope="module")
def float_fallback():
    import keras
    from keras import layers

    def body(x):
        x = layers.Conv2D(8, 3, padding="same")(x)
        x = layers.Lambda(lambda v: keras.ops.sin(v))(x)  # SIN has no int8 kernel
        return layers.Conv2D(8, 3)(x)

    return check_model(_convert_allowing_float(_small_model(body)))


@pytest.fixture(scope="module")
def resize_bytes():
    from keras import layers

    def body(x):
        x = layers.Conv2D(8, 3, padding="same")(x)
        x = layers.UpSampling2D(interpolation="bilinear")(x)
        return layers.Conv2D(8, 3)(x)

    model = _small_model(body)
    return convert_int8(model, _calibration(model))


@pytest.fixture(scope="module")
def resize_mid_graph(resize_bytes):
    return check_model(resize_bytes)


@pytest.fixture(scope="module")
def kernel_7x7():
    from keras import layers

    model = _small_model(lambda x: layers.Conv2D(8, 7, padding="same")(x), (16, 16, 3))
    return check_model(convert_int8(model, _calibration(model)))


@pytest.fixture(scope="module")
def huge_activations():
    from keras import layers

    model = _small_model(lambda x: layers.Conv2D(192, 1)(x), (128, 128, 4), classes=8)
    return check_model(convert_int8(model, _calibration(model, 4)))


def test_the_dscnn_is_n6_clean(dscnn):
    check = check_model(dscnn[0])
    assert check.clean and check.errors == []
    opcodes = [p.opcode for p in check.operators]
    assert opcodes[:2] == ["QUANTIZE", "TRANSPOSE"] and opcodes[-2:] == ["LOGISTIC", "DEQUANTIZE"]
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED"} <= set(opcodes)
    cpu = [(p.opcode, p.position) for p in check.operators if p.unit == "CPU"]
    assert cpu == [("QUANTIZE", "input boundary"), ("DEQUANTIZE", "output boundary")]
    [mean] = [p for p in check.operators if p.opcode == "MEAN"]
    assert mean.reason == "global average pool"
    # only the front end's 4- and 1-channel convs and the 3-class head leave lanes idle
    assert {(f.check, f.level) for f in check.warnings} == {("shape", "warning")}
    assert len(check.warnings) == 3


def test_dscnn_macc_and_memory_from_shapes(dscnn):
    check = check_model(dscnn[0])
    mel_mixer, stem = check.operators[2], check.operators[6]
    assert (mel_mixer.opcode, mel_mixer.output_shape) == ("CONV_2D", [1, 1, 32, 16])
    assert mel_mixer.macc == 32 * 16 * 65  # 1x1 kernel over 65 bins
    assert (stem.opcode, stem.output_shape) == ("CONV_2D", [1, 8, 16, 8])
    assert stem.macc == 8 * 16 * 8 * 3 * 3 * 1
    assert check.macc == sum(p.macc for p in check.operators)
    # the peak is the float input and its int8 copy, both alive at the QUANTIZE
    assert check.memory.peak_activation_bytes == 65 * 32 * 4 + 65 * 32
    assert (check.memory.peak_op, check.memory.peak_opcode) == (0, "QUANTIZE")
    assert check.memory.fits_one_npu_bank
    assert 0 < check.memory.weights_bytes < dscnn[0].stat().st_size


def test_dscnn_numbers_in_stedgeai_terms(dscnn):
    path, npz = dscnn
    check = check_model(path, npz)
    metrics = check.metrics[HOST_METRICS_ROW]
    assert tuple(metrics) == METRIC_NAMES and check.validation_samples == 12
    with np.load(npz) as data:
        reference, inputs = data["m_outputs_1"], data["m_inputs_1"]
    independent = agreement(reference, run_tflite(path, inputs))  # the gate's metrics
    for ours, theirs in [("rmse", "rmse"), ("mae", "mae"), ("l2r", "l2r"), ("cos", "cosine")]:
        assert metrics[ours] == pytest.approx(independent[theirs], rel=1e-6)
    assert metrics["cos"] > 0.9 and 0 <= metrics["acc"] <= 100
    text = format_host_check(check)
    assert "Evaluation report (INT8 model vs float model, 12 samples)" in text
    assert HOST_METRICS_ROW in text and "verdict: N6-clean" in text


def test_float_fallback_is_an_error(float_fallback):
    check = float_fallback
    assert not check.clean
    by_op = {p.index: p for p in check.operators}
    [sin] = [p for p in check.operators if p.opcode == "SIN"]
    assert (sin.unit, sin.position, sin.reason) == ("CPU", "mid-graph", "float op")
    flagged = {(f.check, by_op[f.op].opcode) for f in check.errors}
    assert {("int8", "SIN"), ("int8", "DEQUANTIZE"), ("int8", "QUANTIZE")} <= flagged
    assert not [f for f in check.errors if f.check == "placement"]  # not reported twice


def test_a_cpu_op_in_mid_graph_is_an_error(resize_mid_graph):
    check = resize_mid_graph
    [error] = check.errors
    assert error.check == "placement" and "RESIZE_BILINEAR runs on the CPU in mid-graph" in (
        error.message
    )
    resize = check.operators[error.op]
    assert (resize.opcode, resize.unit, resize.position) == ("RESIZE_BILINEAR", "CPU", "mid-graph")
    softmax = next(p for p in check.operators if p.opcode == "SOFTMAX")
    assert (softmax.unit, softmax.position) == ("CPU", "output boundary")  # allowed there


def test_a_7x7_kernel_is_flagged(kernel_7x7):
    [kernel] = [f for f in kernel_7x7.warnings if "kernel" in f.message]
    assert "7x7 kernel at stride 1" in kernel.message and "3x6" in kernel.message
    assert kernel_7x7.operators[kernel.op].opcode == "CONV_2D"
    assert kernel_7x7.clean  # stedgeai decomposes it: slower, not wrong


def test_activations_that_do_not_fit_on_chip_are_flagged(huge_activations):
    memory = huge_activations.memory
    assert memory.peak_activation_bytes == 128 * 128 * 4 + 128 * 128 * 192
    assert (memory.peak_opcode, memory.fits_npu_banks, memory.fits_on_chip) == (
        "CONV_2D",
        False,
        False,
    )
    [warning] = [f for f in huge_activations.warnings if f.check == "memory"]
    assert "3,211,264 B" in warning.message and warning.op == memory.peak_op


def test_activation_fit_levels():
    kib = 1024
    assert activation_fit(448 * kib).startswith("one npuRAM bank")
    assert activation_fit(448 * kib + 1).startswith("four npuRAM banks")
    assert activation_fit(4 * 448 * kib + 1).startswith("npuRAM banks + cpuRAM2")
    assert activation_fit(4 * 448 * kib + 1024 * kib + 1).startswith("does not fit")


def test_workflow_entry_fails_when_strict_and_passes_otherwise(resize_bytes, tmp_path, caplog):
    model = tmp_path / "bad.tflite"
    model.write_bytes(resize_bytes)
    out_json, out_txt = tmp_path / "npu/bad.json", tmp_path / "npu/bad.txt"
    with pytest.raises(N6QATError, match=r"(?s)not N6-clean.*RESIZE_BILINEAR.*npu\.strict"):
        check_and_report(model, None, out_json, out_txt, strict=True)
    assert json.loads(out_json.read_text())["clean"] is False  # written before failing
    with caplog.at_level(logging.WARNING, logger="n6qat.n6"):
        check = check_and_report(model, None, out_json, out_txt, strict=False)
    assert not check.clean and "does not stop the run" in caplog.text
    assert "verdict: NOT N6-clean (1 error," in out_txt.read_text()


def test_validation_data_that_does_not_fit_is_unusable(dscnn, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, m_inputs_1=np.zeros((2, 10, 10, 1), np.float32), m_outputs_1=np.zeros((2, 3)))
    with pytest.raises(N6QATError, match="belongs to another model"):
        check_model(dscnn[0], wrong)
    keys = tmp_path / "keys.npz"
    np.savez(keys, x=np.zeros((2, 65, 32, 1), np.float32))
    with pytest.raises(N6QATError, match="needs arrays 'm_inputs_1'"):
        check_model(dscnn[0], keys)


def test_a_model_litert_cannot_run_gets_a_numerics_error(tmp_path):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def determinant(x):
        return tf.linalg.det(tf.reshape(x, [1, 2, 2]))

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [determinant.get_concrete_function()], determinant
    )
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    npz = tmp_path / "det.npz"
    np.savez(npz, m_inputs_1=np.ones((2, 4), np.float32), m_outputs_1=np.zeros((2,), np.float32))
    check = check_model(converter.convert(), npz)
    assert check.metrics is None
    assert {f.check for f in check.errors} >= {"int8", "numerics"}
    assert any("FLEX_MatrixDeterminant" in f.message for f in check.errors)


# --- hand-made graphs --------------------------------------------------------------------------


def _tensor(index, shape, dtype="int8", scales=(0.5,), zero_points=(0,), qdim=0, const=False):
    item = {"int8": 1, "int32": 4, "float32": 4}[dtype]
    return TensorInfo(
        index=index,
        name=f"t{index}",
        shape=list(shape),
        dtype=dtype,
        scales=list(scales),
        zero_points=list(zero_points),
        quantized_dimension=qdim,
        is_constant=const,
        size_bytes=math.prod(shape) * item,
    )


def _conv_model(**changes) -> ModelInfo:
    """int8 input -> CONV_2D (8 filters 3x3, per-channel) -> int8 output."""
    w_scales = [0.01 * (i + 1) for i in range(8)]
    tensors = [
        _tensor(0, [1, 8, 8, 3]),
        _tensor(1, [8, 3, 3, 3], scales=w_scales, zero_points=[0] * 8, const=True),
        _tensor(
            2, [8], "int32", scales=[0.5 * s for s in w_scales], zero_points=[0] * 8, const=True
        ),
        _tensor(3, [1, 8, 8, 8]),
    ]
    for index, change in changes.items():
        tensors[int(index[1:])] = replace(tensors[int(index[1:])], **change)
    conv = OperatorInfo(0, "CONV_2D", [0, 1, 2], [3], {"strides": [1, 1]})
    return ModelInfo(tensors, [conv], inputs=[0], outputs=[3], size_bytes=0, subgraph_count=1)


def test_a_clean_hand_made_conv_has_no_quantization_findings():
    assert quantization_findings(_conv_model()) == []
    assert shape_findings(_conv_model()) == []


@pytest.mark.parametrize(
    ("changes", "level", "words"),
    [
        ({"t1": {"zero_points": [1] * 8}}, "error", "non-zero zero points"),
        ({"t1": {"quantized_dimension": 3}}, "error", "per-channel on axis 3, not 0"),
        (
            {"t1": {"scales": [0.1, 0.2]}, "t2": {"scales": [0.05, 0.1]}},
            "error",
            "2 scales for 8 output channels",
        ),
        ({"t1": {"scales": [0.1]}, "t2": {"scales": [0.05]}}, "warning", "per-tensor"),
        ({"t2": {"scales": [1.0] * 8}}, "error", "input scale x weight scale"),
        ({"t2": {"dtype": "int8"}}, "error", "is int8, not int32"),
        ({"t3": {"scales": [0.5] * 8, "zero_points": [0] * 8}}, "error", "per-channel (8 scales)"),
    ],
)
def test_quantization_audit(changes, level, words):
    [finding] = quantization_findings(_conv_model(**changes))
    assert finding.level == level and words in finding.message


def test_batch_above_one_is_an_error():
    info = _conv_model(t0={"shape": [2, 8, 8, 3]})
    [finding] = shape_findings(info)
    assert finding.level == "error" and "batch 2" in finding.message


def test_a_wide_kernel_is_fine_at_stride_two_but_not_at_one():
    wide = {"t1": {"shape": [8, 3, 9, 3]}}
    assert [f.level for f in shape_findings(_conv_model(**wide))] == ["warning"]
    strided = _conv_model(**wide)
    strided.operators[0].options["strides"] = [2, 2]
    assert shape_findings(strided) == []  # width 9 <= 12 at stride 2


def _chain(opcodes_and_shapes, skip=None) -> ModelInfo:
    """A chain of single-input ops over int8 tensors; `skip` = (from op, to op) adds a
    second input to the op `to` from the output of op `from` (a residual)."""
    tensors = [_tensor(0, opcodes_and_shapes[0][1])]
    operators = []
    for i, (opcode, shape) in enumerate(opcodes_and_shapes[1:]):
        tensors.append(_tensor(i + 1, shape))
        operators.append(OperatorInfo(i, opcode, [i], [i + 1]))
    if skip:
        source, target = skip
        operators[target].inputs.append(operators[source].outputs[0])
    last = len(tensors) - 1
    return ModelInfo(tensors, operators, inputs=[0], outputs=[last], size_bytes=0, subgraph_count=1)


def test_live_activations_follow_tensor_lifetimes():
    # t0 (100 B) -> op0 -> t1 (200) -> op1 -> t2 (50) -> op2 ADD(t2, t1) -> t3 (50)
    info = _chain(
        [("", [1, 100]), ("RELU", [1, 200]), ("RELU", [1, 50]), ("ADD", [1, 50])], skip=(0, 2)
    )
    # op0: t0+t1; op1: t1+t2; op2: t1 (kept for the ADD) + t2 + t3
    assert live_activation_bytes(info) == [300, 250, 300]


def test_positions_along_the_graph():
    info = _chain(
        [
            ("", [1, 4]),
            ("RESIZE_BILINEAR", [1, 8]),
            ("RELU", [1, 8]),
            ("GATHER", [1, 8]),
            ("FULLY_CONNECTED", [1, 4]),
            ("SOFTMAX", [1, 4]),
            ("DEQUANTIZE", [1, 4]),
        ]
    )
    info.tensors[-1] = replace(info.tensors[-1], dtype="float32", scales=[], zero_points=[])
    assert graph_positions(info) == [
        "input boundary",  # a CPU op reading the graph input
        "input boundary",  # the NPU op right after it
        "mid-graph",  # GATHER between NPU ops
        "output boundary",  # FULLY_CONNECTED feeding only CPU ops at the end
        "output boundary",
        "output boundary",
    ]
    findings = placement_findings(info, place_operators(info))
    levels = {(f.level, info.operators[f.op].opcode) for f in findings}
    assert levels == {("warning", "RESIZE_BILINEAR"), ("error", "GATHER")}


def test_metrics_by_hand():
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    test = np.array([[0.9, 0.1], [0.2, 0.8]])
    m = stedgeai_metrics(reference, test)
    assert m["acc"] == 100.0
    assert m["rmse"] == pytest.approx(math.sqrt(0.025))
    assert m["mae"] == pytest.approx(0.15)
    assert m["l2r"] == pytest.approx(math.sqrt(0.1) / math.sqrt(2))
    assert m["mean"] == pytest.approx(0.0, abs=1e-12)
    assert m["std"] == pytest.approx(math.sqrt(0.025))
    assert m["nse"] == pytest.approx(0.9)
    assert m["cos"] == pytest.approx(1.7 / (math.sqrt(2) * math.sqrt(1.5)))
    one_unit = stedgeai_metrics(np.zeros((3, 1)), np.full((3, 1), 0.1))
    assert one_unit["acc"] is None and one_unit["l2r"] is None and one_unit["nse"] is None
    assert one_unit["cos"] == 0.0 and one_unit["mean"] == pytest.approx(0.1)  # metrics' zero rule


def test_the_report_is_json_and_text(dscnn, tmp_path):
    check = check_model(dscnn[0], dscnn[1])
    write_host_check(check, tmp_path / "a/check.json", tmp_path / "a/check.txt")
    data = json.loads((tmp_path / "a/check.json").read_text())
    assert data["clean"] is True and data["error_count"] == 0 and data["warning_count"] == 3
    assert data["operators"][0] == {
        "index": 0,
        "opcode": "QUANTIZE",
        "unit": "CPU",
        "position": "input boundary",
        "reason": "float -> int8 conversion",
        "output_shape": [1, 65, 32, 1],
        "macc": 0,
    }
    assert set(data["metrics"][HOST_METRICS_ROW]) == set(METRIC_NAMES)
    text = (tmp_path / "a/check.txt").read_text()
    assert "Operators in execution order" in text and "peak activations" in text
