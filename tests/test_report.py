"""Report figures and tables on small synthetic data; weight SQNR against hand-computed cases."""

import math

import numpy as np
import pandas as pd
import pytest

from n6qat.metrics import sqnr_db
from n6qat.report import config_html, flatten_config, rejected_html, table_html
from n6qat.report_figures import (
    plot_class_counts,
    plot_confusions,
    plot_npu,
    plot_output_scatter,
    plot_per_class_ap,
    plot_summary,
    plot_training_curves,
    plot_weight_sqnr,
    save_figure,
)
from n6qat.report_tables import (
    DELTA_MARK,
    npu_table,
    output_agreement,
    summary_with_deltas,
    weight_sqnr,
)

MODELS = ["fp32", "qat_fp32", "ptq_int8", "qat_int8"]
CLASSES = ["buzzer", "chirper", "honker"]


def summary_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "model": MODELS,
        "description": ["a", "b", "c", "d"],
        "file_top1_accuracy": [0.90, 0.91, 0.80, 0.88],
        "file_cmap": [0.95, 0.94, 0.85, 0.93],
        "file_macro_f1": [0.85, 0.86, 0.70, 0.84],
        "file_macro_roc_auc": [0.99, 0.98, 0.95, 0.97],
        "chunk_top1_accuracy": [0.80, 0.81, 0.70, 0.79],
        "chunk_cmap": [0.90, 0.90, 0.80, 0.88],
        "chunk_macro_f1": [0.75, 0.76, 0.60, 0.74],
        "chunk_macro_roc_auc": [0.97, 0.96, 0.93, 0.96],
        "host_latency_ms_median": [np.nan, np.nan, 0.14, 0.13],
    })  # fmt: skip


def host_check(cpu_ops: int = 2, peak: int = 20_000) -> dict:
    operators = [
        {"index": i, "opcode": "CONV_2D", "unit": "NPU", "position": "mid-graph"} for i in range(5)
    ]
    operators += [
        {"index": 5 + i, "opcode": "DEQUANTIZE", "unit": "CPU", "position": "output boundary"}
        for i in range(cpu_ops)
    ]
    return {
        "operators": operators,
        "memory": {"weights_bytes": 7000, "peak_activation_bytes": peak, "fits": "one bank"},
        "macc": 173248,
        "clean": True,
        "error_count": 0,
        "warning_count": 1,
        "metrics": {"HOST int8 vs float": {"cos": 0.9999, "l2r": 0.002}},
    }


def stedgeai_report() -> dict:
    return {
        "available": True,
        "version": "3.0.0",
        "headline": {
            "macc": 82656,
            "weights_bytes": 23368,
            "activations_bytes": 10400,
            "memory_pools": [{"name": "npuRAM5", "used_bytes": 10400, "size_bytes": 458752}],
            "epochs": {"hardware": 10, "software": 2, "software_ops": [{"op": "Quantize"}]},
            "validation": [{"row": "TARGET c-model #1", "acc": None, "rmse": 1e-3, "cos": 0.99}],
        },
    }


def assert_readable(fig, path) -> None:
    """Every plot panel has a title and labelled axes; the PNG is written."""
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert panels
    for ax in panels:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    save_figure(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_sqnr_pairs_by_shape_and_error():
    rng = np.random.default_rng(1)
    kernels = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=(4, 3)), "c": np.ones(5)}
    int8 = [
        {"op": 3, "opcode": "CONV_2D", "shape": (4, 3), "per_channel": True,
         "values": kernels["b"] + 0.01},
        {"op": 7, "opcode": "FULLY_CONNECTED", "shape": (4, 3), "per_channel": False,
         "values": kernels["a"] * 1.001},
        {"op": 9, "opcode": "CONV_2D", "shape": (2, 2), "per_channel": True,
         "values": np.zeros((2, 2))},
    ]  # fmt: skip
    table = weight_sqnr(kernels, int8)
    assert table["layer"].tolist() == ["b", "a"]  # the (2, 2) tensor has no float kernel
    assert table["op"].tolist() == [3, 7]
    assert table["sqnr_db"].iloc[1] == pytest.approx(60.0)  # noise is 1e-3 of the signal
    assert table["sqnr_db"].iloc[0] == pytest.approx(sqnr_db(kernels["b"], kernels["b"] + 0.01))


def test_summary_with_deltas():
    table = summary_with_deltas(summary_frame())
    assert table.index[:4].tolist() == ["FP32", "QAT-FP32", "PTQ-INT8", "QAT-INT8"]
    qat_vs_ptq = table.loc[f"{DELTA_MARK}QAT-INT8 − PTQ-INT8"]
    assert qat_vs_ptq["file top-1"] == pytest.approx(0.08)
    assert qat_vs_ptq["host latency median (ms)"] == pytest.approx(-0.01)
    assert table.loc[f"{DELTA_MARK}QAT-INT8 − FP32", "file cmAP"] == pytest.approx(-0.02)
    assert np.isnan(table.loc[f"{DELTA_MARK}PTQ-INT8 − FP32", "host latency median (ms)"])
    partial = summary_with_deltas(summary_frame().iloc[[0, 3]])
    assert partial.index.tolist() == ["FP32", "QAT-INT8", f"{DELTA_MARK}QAT-INT8 − FP32"]


def test_table_html_signs_differences_and_dashes_missing_values():
    text = table_html(summary_with_deltas(summary_frame()))
    assert '<tr class="delta"><th>Δ QAT-INT8 − PTQ-INT8</th><td>+0.080</td>' in text
    assert "<tr><th>PTQ-INT8</th><td>0.800</td>" in text
    assert "<tr><th>FP32</th>" in text and "<td>–</td>" in text
    assert text.count('class="delta"') == 4


def test_summary_and_curves_figures(tmp_path):
    assert_readable(plot_summary(summary_frame()), tmp_path / "summary.png")
    pretrain = pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.9, 0.5, 0.4], "auc": [0.6, 0.8, 0.9],
                             "val_loss": [0.8, 0.6, 0.5], "val_auc": [0.5, 0.7, 0.8]})  # fmt: skip
    # QAT's epoch 0 is the starting weights (scored, not trained); the kept epoch is starred.
    qat = pretrain.assign(epoch=[0, 1, 2], selected=[False, True, False],
                          val_int8_file_top1=[0.7, 0.8, 0.75])
    fig = plot_training_curves({"pretraining": pretrain, "QAT": qat})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "ROC-AUC", "INT8 model: validation file top-1"]  # loss first
    xs = [list(np.asarray(line.get_xdata(), dtype=float)) for line in fig.axes[0].lines]
    assert [1, 2, 3] in xs and [3, 4, 5] in xs  # QAT's epochs continue after pretraining
    int8 = [list(np.asarray(line.get_xdata(), dtype=float)) for line in fig.axes[2].lines]
    assert [4] in int8  # the kept epoch
    assert_readable(fig, tmp_path / "curves.png")
    only_qat = plot_training_curves({"QAT": qat})  # a user checkpoint: no pretraining
    assert only_qat.get_suptitle() == "Training curves: QAT"
    assert_readable(only_qat, tmp_path / "qat_curves.png")


def test_confusion_and_per_class_figures(tmp_path):
    names = [*CLASSES, "(none)"]
    counts = np.diag([3, 2, 4, 1]) + np.eye(4, k=1, dtype=int)
    table = pd.DataFrame(counts, index=pd.Index(names, name="true"), columns=names)
    fig = plot_confusions({"fp32": table, "qat_int8": table})
    assert fig.axes[0].get_title() == "FP32: 10 of 13 files on the diagonal"
    assert_readable(fig, tmp_path / "confusion.png")
    per_class = pd.DataFrame({
        "label": CLASSES * 3, "ap": [0.9, 0.8, 0.7, 0.8, 0.7, 0.6, 0.9, 0.8, 0.6],
        "model": ["fp32"] * 3 + ["ptq_int8"] * 3 + ["qat_int8"] * 3,
    })  # fmt: skip
    fig = plot_per_class_ap(per_class, ["fp32", "ptq_int8", "qat_int8"])
    assert len(fig.axes[0].patches) == 9
    assert_readable(fig, tmp_path / "ap.png")


def test_output_scatter(tmp_path):
    rng = np.random.default_rng(2)
    reference = rng.random((50, 3))
    agreement = output_agreement(reference, reference + 0.01)
    assert agreement["rmse"] == pytest.approx(0.01)
    assert agreement["max_abs"] == pytest.approx(0.01)
    assert agreement["top1"] == 1.0
    fig = plot_output_scatter({"FP32 vs PTQ-INT8": (reference, reference + 0.01),
                               "QAT-FP32 vs QAT-INT8": (reference, reference)})  # fmt: skip
    assert len(fig.axes[0].collections[0].get_offsets()) == 150
    assert_readable(fig, tmp_path / "scatter.png")


def test_weight_sqnr_figure(tmp_path):
    table = pd.DataFrame({"layer": ["stem", "dw", "head"], "sqnr_db": [45.0, math.inf, 38.0]})
    fig = plot_weight_sqnr({"PTQ-INT8": table, "QAT-INT8": table.assign(sqnr_db=[46, 50, 40])})
    widths = [bar.get_width() for bar in fig.axes[0].patches]
    assert max(widths) == 80.0  # an exact layer is drawn at the cap
    assert_readable(fig, tmp_path / "sqnr.png")


def test_data_figure_and_rejected_table(tmp_path):
    counts = pd.DataFrame({"label": ["buzzer", "noise", "upsweep"], "before": [2, 5, 9],
                           "after": [4, 5, 9]})  # fmt: skip
    fig = plot_class_counts(counts, negatives=["noise"])
    hatched = [bar.get_hatch() for bar in fig.axes[0].patches]
    assert hatched.count("//") == 2  # the noise bars, before and after
    assert_readable(fig, tmp_path / "counts.png")
    assert "No file was rejected" in rejected_html(pd.DataFrame(columns=["path", "reason"]))
    rejected = pd.DataFrame({"path": ["a.wav", "b.wav", "c.txt"], "source": "train",
                             "label": "x", "reason": ["empty", "empty", "not audio"]})  # fmt: skip
    text = rejected_html(rejected, max_rows=2)
    assert "<td>empty</td><td>2</td>" in text and "3 files could not be used" in text
    assert "a.wav" in text and "c.txt" not in text


def test_npu_table_and_figure(tmp_path):
    hosts = {"ptq": host_check(), "qat": host_check(cpu_ops=1, peak=600_000)}
    absent = {"available": False}
    table = npu_table(hosts, {"ptq": absent, "qat": stedgeai_report()})
    assert table.columns.tolist() == ["PTQ-INT8", "QAT-INT8"]
    assert table.loc["operators on CPU"].tolist() == ["2", "1"]
    assert table.loc["stedgeai", "PTQ-INT8"] == "not found: only the host check ran"
    assert table.loc["activations (stedgeai, KiB)", "QAT-INT8"] == "10.2"
    assert table.loc["epochs HW / SW (stedgeai)", "QAT-INT8"] == "10 / 2"
    assert table.loc["pool npuRAM5 used (stedgeai, KiB)", "QAT-INT8"] == "10.2 of 448"
    assert table.loc["validate: TARGET c-model #1 (stedgeai)", "QAT-INT8"] == "rmse 0.001, cos 0.99"
    fig = plot_npu(hosts, {"qat": stedgeai_report()})
    ops_ax, memory_ax = fig.axes
    assert [bar.get_width() for bar in ops_ax.patches] == [5, 5, 2, 1]  # NPU, then CPU
    assert memory_ax.get_yscale() == "log"
    assert len(memory_ax.patches) == 6  # host peak, stedgeai, weights for each model
    assert_readable(fig, tmp_path / "npu.png")
    fig = plot_npu(hosts, {})
    assert len(fig.axes[1].patches) == 4  # no stedgeai bars without stedgeai


def test_config_html():
    config = {"data": {"train": "resources/demo/train", "negatives": ["noise"]},
              "model": {"pretrained": "", "epochs": 2}}  # fmt: skip
    assert flatten_config(config) == {
        "data.train": "resources/demo/train", "data.negatives": '["noise"]',
        "model.pretrained": '""', "model.epochs": "2",
    }  # fmt: skip
    text = config_html(config)
    assert "<td>model.epochs</td><td>2</td>" in text and "epochs: 2" in text


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A small conv / depthwise / dense model with BatchNorms and its INT8 conversion."""
    import keras

    from n6qat.convert import convert_int8

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 10, 1))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="sigmoid", name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for bn in (model.get_layer("conv_bn"), model.get_layer("dw_bn")):
        size = bn.gamma.shape[0]
        bn.set_weights([rng.uniform(0.5, 2, size), rng.normal(0, 0.1, size),
                        rng.normal(0, 0.1, size), rng.uniform(0.1, 3, size)])  # fmt: skip
    x = rng.random((16, 12, 10, 1), dtype=np.float32)
    return model, convert_int8(model, x)


def test_int8_weights_match_the_folded_float_kernels(converted):
    from n6qat.report_tables import folded_float_kernels
    from n6qat.tflite_inspect import tflite_weights

    model, tflite_bytes = converted
    kernels = folded_float_kernels(model)
    assert {n: k.shape for n, k in kernels.items()} == {
        "conv": (8, 3, 3, 1), "dw": (1, 3, 3, 8), "head": (3, 8)
    }  # fmt: skip
    weights = tflite_weights(tflite_bytes)
    assert [w["opcode"] for w in weights] == ["CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"]
    for weight, name, axis in zip(weights, ["conv", "dw", "head"], [0, 3, 0], strict=True):
        # per-channel int8: every weight within half a step of the folded float weight
        kernel = kernels[name]
        others = tuple(i for i in range(kernel.ndim) if i != axis)
        step = np.abs(kernel).max(axis=others, keepdims=True) / 127
        assert np.all(np.abs(weight["values"] - kernel) <= step / 2 + 1e-6)
    table = weight_sqnr(kernels, weights)
    assert table["layer"].tolist() == ["conv", "dw", "head"]
    assert table["sqnr_db"].between(35, 60).all()
    unfolded = model.get_layer("conv").kernel.numpy().transpose(3, 0, 1, 2)
    assert sqnr_db(unfolded, weights[0]["values"]) < 20  # the BatchNorm is folded in
