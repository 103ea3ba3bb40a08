"""The DS-CNN builder and the checks a user's checkpoint goes through."""

import keras
import numpy as np
import pytest

from n6qat.errors import N6QATError
from n6qat.features import FeatureSettings
from n6qat.model import (
    build_dscnn,
    check_input_shape,
    check_labels,
    load_model,
    predict,
    prepare_pretrained,
    replace_head,
    save_model,
)

SMALL = FeatureSettings(sample_rate=8000, chunk_duration=1.0, n_fft=128, spec_width=32, n_mels=16)
N6_LAYERS = {
    "InputLayer", "Permute", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU",
    "Add", "GlobalAveragePooling2D", "Dropout", "Dense",
}


@pytest.fixture(scope="module")
def model():
    return build_dscnn(SMALL, n_classes=3, width=0.5, depth=2)


def test_dscnn_uses_n6_layers_and_multiples_of_8(model):
    assert {type(layer).__name__ for layer in model.layers} <= N6_LAYERS
    assert model.input_shape == (None, 65, 32, 1) and model.output_shape == (None, 3)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and layer.name.startswith(("stem", "block")):
            assert layer.filters % 8 == 0, layer.name
    out = model(np.random.default_rng(0).random((2, 65, 32, 1), dtype=np.float32))
    assert np.all((out > 0) & (out < 1))


def test_mel_mixer_starts_as_the_mel_filter_bank(model):
    from n6qat.features import mel_basis

    kernel = model.get_layer("mel_mixer").kernel.numpy()[0, 0]  # (bins, mels)
    np.testing.assert_allclose(kernel / 8.0, mel_basis(SMALL).T, rtol=1e-6)


def test_label_mismatch_lists_the_differences():
    check_labels(["a", "b"], ["a", "b"], "m")
    differences = r"(?s)not in the model: \['c'\].*not in the data: \['b'\]"
    with pytest.raises(N6QATError, match=differences):
        check_labels(["a", "b"], ["a", "c"], "m")
    with pytest.raises(N6QATError, match="different order"):
        check_labels(["b", "a"], ["a", "b"], "m")


def test_input_shape_mismatch_is_a_clear_error(model):
    with pytest.raises(N6QATError, match=r"expects inputs of shape \(65, 32, 1\)"):
        check_input_shape(model, FeatureSettings(), "the model x")


def test_replace_head_keeps_the_body(model):
    new = replace_head(model, 5)
    assert new.output_shape == (None, 5)
    assert new.get_layer("stem_conv") is model.get_layer("stem_conv")


def test_safe_mode_refuses_lambda_layers(tmp_path):
    inp = keras.Input((4,))
    out = keras.layers.Dense(2)(keras.layers.Lambda(lambda x: x * 2)(inp))
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(N6QATError, match="safe_mode: false"):
        load_model(path)
    assert load_model(path, safe_mode=False).output_shape == (None, 2)


def test_prepare_pretrained_checks_and_replaces(tmp_path, model):
    path = tmp_path / "m.keras"
    save_model(model, path)
    (tmp_path / "m_labels.txt").write_text("a\nb\nc\n")
    loaded, info, replaced = prepare_pretrained(path, ["a", "b", "c"], SMALL)
    assert not replaced and info["model_labels"] == ["a", "b", "c"]
    with pytest.raises(N6QATError, match="replace_head"):
        prepare_pretrained(path, ["a", "b", "d", "e"], SMALL)
    loaded, info, replaced = prepare_pretrained(path, ["a", "d"], SMALL, replace=True)
    assert replaced and loaded.output_shape == (None, 2)
    with pytest.raises(N6QATError, match="missing.keras does not exist"):
        prepare_pretrained(tmp_path / "missing.keras", ["a"], SMALL)


def test_the_same_weights_save_to_the_same_bytes(tmp_path):
    """Keras stamps the save time and Python object ids into a .keras file; save_model
    replaces both, so two builds of the same model give identical files."""
    from n6qat.model import save_model

    for name in ("a", "b"):
        save_model(build_dscnn(SMALL, n_classes=3, width=0.5, depth=2, seed=1),
                   tmp_path / f"{name}.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    loaded = keras.saving.load_model(tmp_path / "a.keras")
    assert loaded.count_params() == build_dscnn(SMALL, 3, width=0.5, depth=2).count_params()


def test_predict_matches_keras_and_traces_once(model):
    """The same numbers as ``model.predict`` (a short last batch included), from one trace
    that later calls reuse."""
    x = np.random.default_rng(0).normal(size=(21, *model.input_shape[1:])).astype(np.float32)
    expected = model.predict(x, batch_size=8, verbose=0)
    np.testing.assert_array_equal(predict(model, x, batch_size=8), expected)
    np.testing.assert_array_equal(predict(model, x[:5], batch_size=8), expected[:5])
    (step,) = model.__dict__["_n6qat_predict_functions"].values()
    assert step.experimental_get_tracing_count() == 1
    assert predict(model, x[:0]).shape == (0, 3)
