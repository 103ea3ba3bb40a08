"""Per-tensor INT8 fidelity: tensor-to-layer matching, metrics, and the figure."""

import math

import numpy as np
import pandas as pd
import pytest

from n6qat.errors import N6QATError
from n6qat.layer_fidelity import LAYER_OUTPUT, MODEL_INPUT, PRE_ACTIVATION, layer_fidelity
from n6qat.metrics import cosine_similarity, sqnr_db
from n6qat.tflite_inspect import read_tflite

INPUT_SHAPE = (33, 16, 1)
SAMPLES = 12
# Layer names TF's scope uniquifying makes ambiguous: "relu" gets the scope "relu_1",
# layer "relu_1" gets "relu_1_2", and "add" gets "add_1" like BatchNorm's "batchnorm/add_1".
EXPECTED_LAYERS = {  # op -> the Keras layer its output stands for
    "QUANTIZE": "features",
    "CONV_2D": "relu",  # conv + folded bn + ReLU6
    "DEPTHWISE_CONV_2D": "relu_1",  # dw + bn_1 + ReLU6
    "CONV_2D#2": "pw_bn",  # 1x1 conv with its folded BN, which leaves no name
    "ADD": "add",
    "MEAN": "pool",
    "FULLY_CONNECTED": "head",  # before the sigmoid
    "LOGISTIC": "head",
}


def _model(seed: int):
    """Conv+BN+ReLU6, depthwise+BN+ReLU6, 1x1 conv+BN, residual Add, pooling, sigmoid Dense."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input(INPUT_SHAPE, name="features")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inp)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(6.0, name="relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = layers.BatchNormalization(name="bn_1")(y)
    y = layers.ReLU(6.0, name="relu_1")(y)
    y = layers.Conv2D(8, 1, name="pw")(y)
    y = layers.BatchNormalization(name="pw_bn")(y)
    z = layers.Add(name="add")([x, y])
    z = layers.GlobalAveragePooling2D(name="pool")(z)
    out = layers.Dense(4, activation="sigmoid", name="head")(z)
    model = keras.Model(inp, out, name="tiny_fidelity")
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # BN statistics far from identity, so a wrong fold shows
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2.0, n), rng.normal(0.3, 0.2, n),
                               rng.normal(0.0, 0.2, n), rng.uniform(0.2, 1.5, n)])  # fmt: skip
    return model


def _sparse_inputs(n: int, seed: int) -> np.ndarray:
    """Gaussian values with about 70 % exact zeros: many land on the input's zero level."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *INPUT_SHAPE)) * (rng.random((n, *INPUT_SHAPE)) < 0.3)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def converted():
    from n6qat.convert import convert_int8

    model = _model(seed=0)
    tflite = convert_int8(model, _sparse_inputs(48, seed=0), per_channel=True)
    x = _sparse_inputs(SAMPLES + 4, seed=1)
    return model, tflite, x, layer_fidelity(model, tflite, x, max_samples=SAMPLES)


def test_one_row_per_int8_activation_in_op_order(converted):
    _, tflite, _, table = converted
    info = read_tflite(tflite)
    written = [
        info.tensors[i].name for op in info.operators for i in op.outputs
        if info.tensors[i].dtype == "int8"
    ]  # fmt: skip
    assert table["tensor"].tolist() == written
    assert table["order"].tolist() == list(range(len(written)))
    assert (table["samples"] == SAMPLES).all()
    assert any(";" in name for name in table["tensor"])  # fused ops keep their full names


def test_tensors_map_to_the_layer_they_stand_for(converted):
    model, _, _, table = converted
    seen: dict[str, int] = {}
    for row in table.to_dict("records"):
        seen[row["op"]] = seen.get(row["op"], 0) + 1
        key = row["op"] if seen[row["op"]] == 1 else f"{row['op']}#{seen[row['op']]}"
        assert row["layer"] == EXPECTED_LAYERS[key], row["tensor"]
    fused = {name for names in table["fused_layers"] for name in names.split("+")}
    kinds = ("Conv2D", "DepthwiseConv2D", "Add", "GlobalAveragePooling2D", "BatchNormalization")
    wanted = {layer.name for layer in model.layers if type(layer).__name__ in kinds}
    assert wanted <= fused
    assert table.loc[table["op"] == "CONV_2D", "fused_layers"].tolist() == [
        "conv+bn+relu",
        "pw+pw_bn",
    ]


def test_matched_tensors_agree_closely(converted):
    _, _, _, table = converted
    kinds = table.set_index("op")["compared_with"]
    assert kinds["QUANTIZE"] == MODEL_INPUT
    assert kinds["FULLY_CONNECTED"] == PRE_ACTIVATION
    assert kinds["LOGISTIC"] == LAYER_OUTPUT
    assert table["cosine"].notna().all()
    assert (table["cosine"] > 0.95).all(), table[["layer", "cosine"]]
    assert (table["sqnr_db"] > 15.0).all(), table[["layer", "sqnr_db"]]


def test_input_row_counts_values_on_the_zero_level(converted):
    _, _, x, table = converted
    row = table.iloc[0]
    assert (row["op"], row["layer"], row["compared_with"]) == ("QUANTIZE", "features", MODEL_INPUT)
    scale, zero_point = row["scale"], row["zero_point"]
    codes = np.clip(np.round(x[:SAMPLES] / scale) + zero_point, -128, 127)
    assert row["zero_level_share"] == pytest.approx(np.mean(codes == zero_point))
    assert row["zero_level_share"] > 0.65


def test_other_weights_give_low_cosine(converted):
    _, tflite, x, _ = converted
    table = layer_fidelity(_model(seed=1), tflite, x, max_samples=SAMPLES)
    inside = table[table["compared_with"] != MODEL_INPUT]
    assert table.iloc[0]["cosine"] > 0.99  # same inputs
    assert inside["cosine"].notna().all()
    assert inside["cosine"].median() < 0.8, inside[["layer", "cosine"]]
    assert (inside["sqnr_db"] < 10.0).all(), inside[["layer", "sqnr_db"]]


def test_wrong_inputs_name_the_model(converted):
    model, tflite, x, _ = converted
    with pytest.raises(N6QATError, match=r"do not fit <bytes>"):
        layer_fidelity(model, tflite, x[:, :32])
    with pytest.raises(N6QATError, match="max_samples"):
        layer_fidelity(model, tflite, x, max_samples=0)


def test_cosine_edge_cases():
    assert cosine_similarity(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine_similarity(np.zeros(3), np.ones(3)) == 0.0
    assert cosine_similarity(np.ones(3), np.zeros(3)) == 0.0
    assert cosine_similarity([[1.0, 2.0]], [2.0, 4.0]) == pytest.approx(1.0)
    assert cosine_similarity([1.0, 0.0], [-3.0, 0.0]) == pytest.approx(-1.0)
    assert cosine_similarity([1.0, 0.0], [1.0, 1.0]) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError):
        cosine_similarity(np.ones(3), np.ones(4))


def test_sqnr_edge_cases():
    assert sqnr_db([1.0, -2.0], [1.0, -2.0]) == math.inf
    assert sqnr_db(np.zeros(2), np.zeros(2)) == math.inf
    assert sqnr_db(np.zeros(2), [0.0, 0.1]) == -math.inf
    assert sqnr_db([1.0, 0.0], [1.0, 0.1]) == pytest.approx(20.0)
    assert sqnr_db([3.0, 4.0], [0.0, 0.0]) == pytest.approx(0.0)


def test_plot_has_two_panels_after_a_csv_round_trip(converted, tmp_path):
    from n6qat.report_figures import plot_layer_fidelity

    _, _, _, table = converted
    unmatched = table.iloc[[0]].assign(layer="", cosine=np.nan, sqnr_db=np.nan, order=len(table))
    path = tmp_path / "layers.csv"
    pd.concat([table, unmatched]).to_csv(path, index=False)
    fig = plot_layer_fidelity({"PTQ-INT8": pd.read_csv(path), "QAT-INT8": table})
    assert len(fig.axes) == 2
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[0] == "features" and ticks[-1] == "(QUANTIZE)" and "head (pre-act)" in ticks
    assert "where the INT8 error enters" in fig.get_suptitle()
