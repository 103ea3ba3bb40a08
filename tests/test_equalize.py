"""Cross-layer equalization: exact where the docstring says, ranges closer, pairs found."""

import math

import keras
import numpy as np
import pytest
from keras import layers

from n6qat.equalize import TABLE_COLUMNS, equalize_pairs, find_pairs, folded_depthwise
from n6qat.errors import N6QATError
from n6qat.fake_quant import fake_quantize_weights
from n6qat.features import FeatureSettings
from n6qat.metrics import sqnr_db
from n6qat.model import build_dscnn

SHAPE = (6, 6, 8)


def _spread(model: keras.Model, seed: int = 0) -> keras.Model:
    """Depthwise channels whose ranges span 2**7 and BNs with non-trivial statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.DepthwiseConv2D):
            kernel = layer.kernel.numpy()
            channels = kernel.shape[2] * kernel.shape[3]
            spread = (2.0 ** np.linspace(0.0, 7.0, channels)).reshape(kernel.shape[2:])
            layer.kernel.assign(kernel * spread[None, None])
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.2, 2.0, n).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.3, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0.0, 0.2, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    return model


def _pair_model(activation, batch_norm: bool = True, depth_multiplier: int = 1,
                bounded_input: bool = False) -> keras.Model:
    """[ReLU6 ->] DepthwiseConv2D -> [BN] -> activation -> Conv2D 1x1 -> BN."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    x = layers.ReLU(6.0, name="in_relu")(inputs) if bounded_input else inputs
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=depth_multiplier,
                               use_bias=not batch_norm, name="dw")(x)
    x = layers.BatchNormalization(name="dw_bn")(x) if batch_norm else x
    x = activation(x)
    x = layers.Conv2D(6, 1, use_bias=False, name="pw")(x)
    outputs = layers.BatchNormalization(name="pw_bn")(x)
    return _spread(keras.Model(inputs, outputs))


def _inputs(n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (n, *SHAPE)).astype("float32")


def _ranges(model: keras.Model, name: str = "dw") -> tuple[np.ndarray, np.ndarray]:
    """Folded depthwise output-channel and pointwise input-channel max |w|."""
    (pair,) = [p for p in find_pairs(model) if p.depthwise.name == name]
    r1 = np.abs(folded_depthwise(pair)[0]).max(axis=(0, 1))
    return r1, np.abs(pair.pointwise.kernel.numpy()).max(axis=(0, 1, 3))


def _assert_same_function(a: keras.Model, b: keras.Model, x: np.ndarray) -> float:
    """Outputs equal to float32 rounding: max |change| <= 1e-5 of the largest output."""
    out_a, out_b = np.asarray(a(x)), np.asarray(b(x))
    change = float(np.max(np.abs(out_a - out_b)))
    assert change <= 1e-5 * float(np.max(np.abs(out_b))), change
    return change


def _largest_output(model: keras.Model, name: str, x: np.ndarray) -> float:
    return float(np.max(np.abs(keras.Model(model.inputs, model.get_layer(name).output)([x]))))


def _same_weights(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


@pytest.mark.parametrize(("batch_norm", "depth_multiplier"), [(True, 1), (False, 2)])
def test_relu_pair_is_exact_and_ranges_shrink(batch_norm, depth_multiplier):
    model = _pair_model(layers.ReLU(name="act"), batch_norm, depth_multiplier)
    original = [w.copy() for w in model.get_weights()]
    x = _inputs()
    equalized, table = equalize_pairs(model, x)
    assert list(table.columns) == list(TABLE_COLUMNS)
    (row,) = table.to_dict("records")
    assert row["mode"] == "exact" and row["channels_scaled"] == 8 * depth_multiplier
    _assert_same_function(equalized, model, x)
    assert row["max_abs_change"] <= 1e-5 * _largest_output(model, "pw", x)
    # Channels spread over 2**7 (times the BN's spread); equalizing takes about a sqrt.
    assert row["range_ratio_after"] < row["range_ratio_before"] ** 0.6
    r1, r2 = _ranges(equalized)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # the paper's fixed point: r1_i = r2_i
    assert all(np.array_equal(a, b) for a, b in zip(original, model.get_weights(), strict=True))


def test_relu6_pairs_are_skipped_by_default():
    model = _pair_model(layers.ReLU(6.0, name="act"))
    x = _inputs()
    equalized, table = equalize_pairs(model, x)
    (row,) = table.to_dict("records")
    assert row["mode"] == "skipped" and "clips at 6" in row["reason"]
    assert row["channels_scaled"] == 0 and row["range_ratio_after"] == row["range_ratio_before"]
    assert _same_weights(model, equalized)
    assert row["max_abs_change"] == 0.0


def test_relu6_checked_is_exact_on_the_calibration_data_only():
    model = _pair_model(layers.ReLU(6.0, name="act"))
    x = _inputs() * 4.0  # large enough that some channels reach 6
    preact = keras.Model(model.inputs, model.get_layer("act").input)([x]).numpy()
    clipping = int(np.sum(preact.reshape(-1, preact.shape[-1]).max(axis=0) > 6.0))
    assert 0 < clipping < preact.shape[-1]
    equalized, table = equalize_pairs(model, x, relu6="checked")
    (row,) = table.to_dict("records")
    assert row["mode"] == "data-checked"
    assert row["channels_scaled"] == row["channels"] - clipping
    assert row["reason"].startswith(f"{clipping} of 8 channels reach the clip")
    assert row["range_ratio_after"] < row["range_ratio_before"]
    assert row["max_abs_change"] <= 1e-5 * _largest_output(model, "pw", x)
    _assert_same_function(equalized, model, x)
    # Not proven beyond that data: larger inputs clip at 6 * s_i < 6 in scaled channels.
    louder = x * 3.0
    assert np.max(np.abs(equalized(louder) - model(louder))) > 1e-2


def test_relu6_bounded_is_exact_for_every_input():
    model = _pair_model(layers.ReLU(6.0, name="act"), bounded_input=True)
    # Small weights so that the proven bound 6 * sum(w+) + b stays below 6 in most channels.
    dw = model.get_layer("dw")
    dw.kernel.assign(dw.kernel.numpy() * 0.05)
    equalized, table = equalize_pairs(model, _inputs(), relu6="bounded")
    (row,) = table.to_dict("records")
    assert row["mode"] == "bounded" and row["channels_scaled"] > 0
    assert row["range_ratio_after"] < row["range_ratio_before"]
    for scale in (1.0, 100.0, 1e4):  # the depthwise input is ReLU6's, whatever comes in
        x = _inputs(seed=2) * scale
        _assert_same_function(equalized, model, x)


def test_relu6_bounded_needs_a_bounded_depthwise_input():
    model = _pair_model(layers.ReLU(6.0, name="act"))
    equalized, table = equalize_pairs(model, relu6="bounded")
    assert table.loc[0, "mode"] == "skipped" and "not bounded" in table.loc[0, "reason"]
    assert math.isnan(table.loc[0, "max_abs_change"])
    assert _same_weights(model, equalized)


def test_model_without_pairs_is_unchanged():
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)  # not depthwise
    x = layers.ReLU(name="relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = layers.ReLU(name="dw_relu")(x)
    y = layers.Conv2D(4, 1, name="pw")(y)
    outputs = layers.Add()([x, y])  # the depthwise output also feeds the Add: no pair
    model = keras.Model(inputs, outputs)
    x = _inputs()
    equalized, table = equalize_pairs(model, x)
    assert table.empty and list(table.columns) == list(TABLE_COLUMNS)
    assert _same_weights(model, equalized)
    np.testing.assert_array_equal(equalized(x), model(x))


def test_bad_arguments_are_named():
    model = _pair_model(layers.ReLU(6.0, name="act"))
    with pytest.raises(N6QATError, match="needs calibration"):
        equalize_pairs(model, relu6="checked")
    with pytest.raises(N6QATError, match="relu6 must be one of"):
        equalize_pairs(model, relu6="clip")


@pytest.fixture(scope="module")
def dscnn():
    settings = FeatureSettings(spec_width=32, chunk_duration=1.0, n_fft=256, n_mels=24)
    return _spread(build_dscnn(settings, n_classes=3, width=0.5, depth=2)), settings


def test_dscnn_pairs_are_the_ds_blocks(dscnn):
    model, settings = dscnn
    blocks = [f"block{i}{b}" for i in range(2) for b in ("", "b")]
    pairs = find_pairs(model)
    assert [(p.depthwise.name, p.batch_norm.name, p.activation.name, p.pointwise.name)
            for p in pairs] == [(f"{b}_dw", f"{b}_dw_bn", f"{b}_dw_relu", f"{b}_pw")
                                for b in blocks]  # fmt: skip
    assert all(p.clip == 6.0 and p.input_bound == 6.0 for p in pairs)
    x = np.random.default_rng(0).uniform(0, 1, (8, *settings.input_shape)).astype("float32")
    for relu6 in ("bounded", "checked"):
        equalized, table = equalize_pairs(model, x, relu6=relu6)
        assert list(table["depthwise"]) == [f"{b}_dw" for b in blocks]
        assert (table["range_ratio_after"] < table["range_ratio_before"]).all()
        for row in table.to_dict("records"):
            assert row["max_abs_change"] <= 1e-5 * _largest_output(model, row["pointwise"], x)
        _assert_same_function(equalized, model, x)


def test_equalized_depthwise_kernel_quantizes_better_per_tensor():
    model = _pair_model(layers.ReLU(name="act"))
    equalized, _ = equalize_pairs(model)

    def channel_sqnr(m):
        kernel = folded_depthwise(find_pairs(m)[0])[0].astype("float32")
        quantized = fake_quantize_weights(kernel, None).numpy()
        return np.array([sqnr_db(kernel[..., i], quantized[..., i])
                         for i in range(kernel.shape[-1])])  # fmt: skip

    before, after = channel_sqnr(model), channel_sqnr(equalized)
    assert after.min() > before.min() + 10.0  # the smallest channel no longer rounds to ~0
    assert after.mean() > before.mean()
