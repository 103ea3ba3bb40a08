"""BirdNET-STM32 checkpoints: loading both weight layouts, features, unfolding, INT8, QAT.

Reference arrays in tests/fixtures/birdnet/ were computed by BirdNET-STM32's own code,
outside this repository (see NOTE.md there); none of that code is needed here.
"""

import dataclasses
import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from n6qat import birdnet
from n6qat.convert import convert_int8
from n6qat.errors import N6QATError
from n6qat.features import FeatureSettings, spectrogram
from n6qat.int8_twin import build_qat_model, quantized_kernels
from n6qat.litert import run_tflite
from n6qat.metrics import agreement
from n6qat.model import load_model, prepare_pretrained, read_labels, save_model

SHARED = Path(__file__).parents[2] / "shared" / "birdnet_stm32n6_100"
CHECKPOINT = SHARED / "birdnet_stm32n6_100.keras"
FIXTURES = Path(__file__).parent / "fixtures" / "birdnet"
TINY = {  # fixture name: (weight layout, peak normalization)
    "tiny_current_hybrid_pwl": ("current", True),
    "tiny_current_librosa_pwl": ("current", False),
    "tiny_legacy_hybrid_none": ("legacy", False),
}
PLAIN_LAYERS = {
    "InputLayer", "Permute", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU",
    "Add", "SpatialDropout2D", "GlobalAveragePooling2D", "Dropout", "Dense",
}

# Only the tests of the shared BirdNET-STM32 checkpoint need it; the committed tiny fixtures
# are tested without it.
needs_checkpoint = pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"no {CHECKPOINT}")


def reference_signal(sample_rate=22050, seconds=3.0, n_chunks=2):
    """Deterministic bird-like test audio: FM sweeps, harmonics, bursts, low noise."""
    n = int(round(sample_rate * seconds))
    t = np.arange(n, dtype=np.float64) / sample_rate
    rng = np.random.default_rng(20250830)
    chunks = []
    for k in range(n_chunks):
        f0 = 2500.0 + 1700.0 * k
        rate = 1.5 + k
        phase = f0 * t + 600.0 * np.sin(2 * np.pi * rate * t) / (2 * np.pi * rate)
        sweep = np.sin(2 * np.pi * phase)
        gate = (np.sin(2 * np.pi * (2.0 + 1.5 * k) * t) > 0.2).astype(np.float64)
        envelope = np.exp(-((t - 1.2 - 0.4 * k) ** 2) / 0.05)
        harmonic = 0.3 * np.sin(2 * np.pi * 2.0 * f0 * t) * envelope
        low = 0.2 * np.sin(2 * np.pi * (400.0 + 150.0 * k) * t)
        noise = 0.02 * (rng.random(n) - 0.5)
        chunks.append(0.5 * sweep * gate + harmonic + low + noise)
    return np.stack(chunks).astype(np.float32)


def varied_chunks(n: int, seed: int) -> np.ndarray:
    """The reference calls shifted in time, at other levels, in other noise."""
    base = reference_signal()
    rng = np.random.default_rng(seed)
    chunks = []
    for i in range(n):
        chunk = np.roll(base[i % 2], rng.integers(0, base.shape[1])) * rng.uniform(0.05, 1.0)
        chunks.append(chunk + rng.normal(0, rng.uniform(0.001, 0.05), chunk.shape))
    return np.stack(chunks).astype(np.float32)


@pytest.fixture(scope="module")
def settings():
    return FeatureSettings(**birdnet.read_sidecar(birdnet.sidecar_path(CHECKPOINT)))


@pytest.fixture(scope="module")
def shared_model():
    return load_model(CHECKPOINT)


@pytest.fixture(scope="module")
def unfolded(shared_model):
    return birdnet.unfold_frontend(shared_model)


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "shared_reference.npz")


@needs_checkpoint
def test_shared_checkpoint_loads_without_birdnet_code_and_matches_it(
    shared_model, settings, reference
):
    assert importlib.util.find_spec("birdnet_stm32") is None
    frontend = shared_model.get_layer("audio_frontend")
    assert isinstance(frontend, birdnet.AudioFrontendLayer)
    assert (frontend.layout, frontend.peak_normalize) == ("legacy", False)
    x = spectrogram(reference_signal(), settings)
    out = shared_model.predict(x, verbose=0)
    np.testing.assert_allclose(out, reference["outputs"], rtol=0, atol=1e-5)
    assert out.max() > 0.9  # the reference is not a flat, uninformative output


@needs_checkpoint
@pytest.mark.parametrize(
    ("kind", "scale", "key", "step"),
    [("linear", "none", "linear", (4, 8)), ("mel", "none", "mel_none", (2, 8)),
     ("mel", "pwl", "mel_pwl", (2, 8))],
)
def test_features_match_birdnet_feature_code(settings, reference, kind, scale, key, step):
    variant = dataclasses.replace(settings, kind=kind, magnitude_scale=scale)
    ours = spectrogram(reference_signal(), variant)[:, :: step[0], :: step[1], 0]
    np.testing.assert_allclose(ours, reference[key], rtol=0, atol=1e-6)
    uncentred = dataclasses.replace(variant, center=False)
    assert np.abs(spectrogram(reference_signal(), uncentred)[:, :: step[0], :: step[1], 0]
                  - reference[key]).max() > 0.05


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_checkpoints_of_both_layouts_match_birdnet(name):
    refs = np.load(FIXTURES / "tiny_references.npz")
    path = FIXTURES / f"{name}.keras"
    assert birdnet.weight_layout(path) == TINY[name][0]
    model = load_model(path)
    frontend = model.get_layer("audio_frontend")
    assert (frontend.layout, frontend.peak_normalize) == TINY[name]
    x, expected = refs[f"{name}_input"], refs[f"{name}_output"]
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(birdnet.unfold_frontend(model)(x).numpy(), expected, atol=1e-6)
    if frontend.mode == "hybrid":  # the reference tells the two hybrid functions apart
        frontend.peak_normalize = not frontend.peak_normalize
        assert np.abs(model(x).numpy() - expected).max() > 1e-3


@needs_checkpoint
def test_weight_layout_of_the_shared_checkpoint():
    assert birdnet.weight_layout(CHECKPOINT) == "legacy"


def test_weight_layout_of_other_files(tmp_path):
    (tmp_path / "x.keras").write_text("not a zip")
    assert birdnet.weight_layout(tmp_path / "x.keras") is None


@needs_checkpoint
def test_unfolded_frontend_is_plain_keras_with_the_same_outputs(
    shared_model, unfolded, settings, reference
):
    assert {type(layer).__name__ for layer in unfolded.layers} <= PLAIN_LAYERS
    assert unfolded.get_layer("audio_frontend_mel_mixer").kernel.shape == (1, 1, 257, 64)
    assert all(layer.trainable for layer in unfolded.layers if layer.name.startswith("audio_"))
    x = spectrogram(reference_signal(), settings)
    np.testing.assert_allclose(unfolded(x).numpy(), reference["outputs"], rtol=0, atol=1e-5)


def test_resaved_models_load_again(tmp_path):
    refs = np.load(FIXTURES / "tiny_references.npz")
    name = "tiny_current_hybrid_pwl"
    model = load_model(FIXTURES / f"{name}.keras")
    x, expected = refs[f"{name}_input"], refs[f"{name}_output"]
    for label, variant in [("custom", model), ("plain", birdnet.unfold_frontend(model))]:
        save_model(variant, tmp_path / f"{label}.keras")
        again = load_model(tmp_path / f"{label}.keras")
        np.testing.assert_allclose(again(x).numpy(), expected, atol=1e-6)


def _with_frontend_config(source: Path, target: Path, **changes) -> Path:
    shutil.copy(source, target)
    with zipfile.ZipFile(source) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    frontend = next(
        layer for layer in config["config"]["layers"] if layer["class_name"] == "AudioFrontendLayer"
    )
    frontend["config"].update(changes)
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return target


def test_unsupported_modes_name_what_is_missing(tmp_path):
    common = dict(mel_bins=16, spec_width=32, sample_rate=16000, chunk_duration=1)
    with pytest.raises(N6QATError, match=r"mode='raw' \(a raw-waveform frontend"):
        birdnet.AudioFrontendLayer(mode="raw", **common)
    with pytest.raises(N6QATError, match=r"mag_scale='pcen' \(PCEN"):
        birdnet.AudioFrontendLayer(mode="hybrid", mag_scale="pcen", **common)
    with pytest.raises(N6QATError, match=r"method='db' \(decibel"):
        birdnet.MagnitudeScalingLayer(method="db")
    source = FIXTURES / "tiny_legacy_hybrid_none.keras"
    raw = _with_frontend_config(source, tmp_path / "raw.keras", mode="raw")
    with pytest.raises(N6QATError, match=r"(?s)raw.keras.*mode='raw'"):
        load_model(raw)


@needs_checkpoint
def test_read_sidecar_maps_the_shared_config(tmp_path):
    features = birdnet.read_sidecar(birdnet.sidecar_path(CHECKPOINT))
    assert features == {
        "kind": "linear", "sample_rate": 22050, "chunk_duration": 3.0, "n_fft": 512,
        "spec_width": 256, "n_mels": 64, "hop_length": 258, "fmin": 150.0, "fmax": 11025.0,
        "magnitude_scale": "none", "center": True, "normalization": "minmax",
    }
    assert FeatureSettings(**features).input_shape == (257, 256, 1)
    original = json.loads(birdnet.sidecar_path(CHECKPOINT).read_text())

    def sidecar(**changes):
        path = tmp_path / "x_model_config.json"
        path.write_text(json.dumps({**original, **changes}))
        return path

    mel = birdnet.read_sidecar(sidecar(audio_frontend="librosa"))
    assert (mel["kind"], mel["magnitude_scale"]) == ("mel", "pwl")
    assert FeatureSettings(**mel).input_shape == (64, 256, 1)
    with pytest.raises(N6QATError, match=r"audio_frontend='mfcc' \(MFCC"):
        birdnet.read_sidecar(sidecar(audio_frontend="mfcc"))
    with pytest.raises(N6QATError, match=r"mag_scale='db'"):
        birdnet.read_sidecar(sidecar(audio_frontend="librosa", mag_scale="db"))
    with pytest.raises(N6QATError, match="hop_length=300 disagrees"):
        birdnet.read_sidecar(sidecar(hop_length=300))
    del original["fft_length"]
    with pytest.raises(N6QATError, match=r"lacks the keys \['fft_length'\]"):
        birdnet.read_sidecar(sidecar())


@needs_checkpoint
def test_check_sidecar_catches_a_frontend_built_for_other_audio(shared_model):
    features = birdnet.read_sidecar(birdnet.sidecar_path(CHECKPOINT))
    birdnet.check_sidecar(shared_model, features, "m")
    with pytest.raises(N6QATError, match="sample_rate: layer 22050 vs features 16000"):
        birdnet.check_sidecar(shared_model, {**features, "sample_rate": 16000}, "m")


@needs_checkpoint
def test_labels_file_gives_the_class_order_and_a_subset_gets_a_new_head(settings):
    labels = read_labels(SHARED / "birdnet_stm32n6_100_labels.txt")
    sidecar = json.loads(birdnet.sidecar_path(CHECKPOINT).read_text())
    assert labels == sidecar["class_names"] and len(labels) == 100
    model, info, replaced = prepare_pretrained(CHECKPOINT, labels[:3], settings, replace=True)
    assert replaced and model.output_shape == (None, 3) and info["model_labels"] == labels


@needs_checkpoint
def test_int8_conversion_agrees_with_the_float_checkpoint(unfolded, settings):
    calibration = spectrogram(varied_chunks(12, seed=1), settings)
    validation = spectrogram(varied_chunks(8, seed=2), settings)
    tflite = convert_int8(unfolded, calibration)
    result = agreement(unfolded.predict(validation, verbose=0), run_tflite(tflite, validation))
    assert result["cosine"] >= 0.95, result


@needs_checkpoint
def test_qat_twin_quantizes_the_unfolded_frontend_only(shared_model, unfolded, settings):
    frontend = {"audio_frontend_mel_mixer", "audio_frontend_pwl_k0_dw",
                *(f"audio_frontend_pwl_{kind}{i}_dw" for kind in ("shift", "k") for i in (1, 2, 3))}
    assert not frontend & set(quantized_kernels(build_qat_model(shared_model)))
    twin = build_qat_model(unfolded)
    assert frontend <= set(quantized_kernels(twin))
    x = spectrogram(reference_signal(), settings)
    result = agreement(unfolded(x).numpy(), twin(x).numpy())
    assert result["cosine"] > 0.99, result
    keras.backend.clear_session()


@needs_checkpoint
def test_plain_keras_loading_assumes_the_current_layout():
    """Why load_model reads the layout first: the legacy file does not fit the current one."""
    with pytest.raises(ValueError, match="expected 1 variables, but received 0"):
        keras.saving.load_model(CHECKPOINT, compile=False)
