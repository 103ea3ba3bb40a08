"""Chunking, chunk selection, spectrogram shapes and the on-disk feature cache."""

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from n6qat.errors import N6QATError
from n6qat.features import (
    FeatureSettings,
    chunk_energy,
    chunk_signal,
    extract_features,
    load_features,
    select_chunks,
    spectrogram,
)

SMALL = FeatureSettings(sample_rate=8000, chunk_duration=1.0, n_fft=128, spec_width=32)


def test_default_settings_shape_and_hop():
    s = FeatureSettings()
    assert s.input_shape == (257, 128, 1)
    assert s.hop == 48000 // 128
    assert FeatureSettings(kind="mel", n_mels=40).input_shape == (40, 128, 1)


def test_bad_settings_name_the_key():
    with pytest.raises(N6QATError, match="features.kind"):
        FeatureSettings(kind="wavelet")
    with pytest.raises(N6QATError, match="features.magnitude_scale"):
        FeatureSettings(magnitude_scale="log2")


def test_chunking_pads_short_files_and_drops_tiny_tails():
    short = np.ones(300, dtype=np.float32)
    chunks, starts = chunk_signal(short, SMALL)
    assert chunks.shape == (1, 8000) and chunks[0, :300].all() and not chunks[0, 300:].any()
    long = np.ones(8000 * 3 + 1000, dtype=np.float32)  # 1000-sample tail < half a chunk
    chunks, starts = chunk_signal(long, SMALL)
    assert chunks.shape == (3, 8000) and list(starts) == [0.0, 1.0, 2.0]
    chunks, _ = chunk_signal(np.ones(8000 * 2 + 5000, dtype=np.float32), SMALL)
    assert chunks.shape == (3, 8000)


def test_quiet_chunks_of_labelled_files_are_dropped_but_negatives_kept():
    energy = np.array([0.5, 0.01, 0.3, 0.0], dtype=np.float32)
    assert list(select_chunks(energy, negative=False, settings=SMALL)) == [0, 2]
    assert list(select_chunks(energy, negative=True, settings=SMALL)) == [0, 1, 2, 3]
    capped = FeatureSettings(**{**SMALL.to_dict(), "max_chunks_per_file": 1})
    assert list(select_chunks(energy, negative=False, settings=capped)) == [0]


def test_spectrogram_peak_sits_at_the_tone_bin():
    t = np.arange(8000) / 8000
    chunk = np.sin(2 * np.pi * 1000 * t).astype(np.float32)[None] * 0.1
    spec = spectrogram(chunk, SMALL)
    assert spec.shape == (1, 65, 32, 1)
    assert np.argmax(spec[0, :, 10, 0]) == round(1000 / (8000 / 128))
    assert spec.max() == pytest.approx(1.0, rel=0.05)  # peak-normalised, window-gain corrected
    mel = spectrogram(chunk, FeatureSettings(**{**SMALL.to_dict(), "kind": "mel", "n_mels": 16}))
    assert mel.shape == (1, 16, 32, 1)


def test_energy_is_rms():
    assert chunk_energy(np.full((1, 100), 0.5, dtype=np.float32))[0] == pytest.approx(0.5)


def test_extract_features_writes_memmappable_cache(tmp_path):
    rng = np.random.default_rng(0)
    for label, seconds in [("a", 2.5), ("b", 0.7), ("noise", 1.0)]:
        (tmp_path / label).mkdir()
        sf.write(tmp_path / label / "x.wav", rng.normal(0, 0.1, int(seconds * 16000)), 16000)
    files = pd.DataFrame(
        {
            "path": ["a/x.wav", "b/x.wav", "noise/x.wav"],
            "source": ["train"] * 3,
            "label": ["a", "b", "noise"],
            "negative": [False, False, True],
            "duration": [2.5, 0.7, 1.0],
        }
    )
    out = tmp_path / "train.npy"
    table = extract_features(files, {"train": tmp_path}, ["a", "b"], SMALL, out,
                             tmp_path / "train_chunks.csv", workers=2)
    feats = load_features(out)
    assert isinstance(feats, np.memmap) and feats.dtype == np.float16
    assert feats.shape == (len(table), 65, 32, 1)
    assert list(table["label_index"]) == [0, 0, 0, 1, -1]
    assert list(table["row"]) == list(range(5))
    assert not list(tmp_path.glob("*.tmp*"))
    again = extract_features(files, {"train": tmp_path}, ["a", "b"], SMALL, out,
                             tmp_path / "train_chunks.csv", workers=1)
    assert np.array_equal(load_features(out), feats) and again.equals(table)


@pytest.mark.parametrize("rows", [0, 1, 7, 40])
@pytest.mark.parametrize("row_shape", [(3, 2, 1), (257, 256, 1)])
def test_streamed_npy_is_byte_for_byte_np_save(tmp_path, rows, row_shape, monkeypatch):
    """Rows written block by block give np.save's file, with the reserved header the
    right size (written in place) and too big (the data moved up behind it)."""
    from n6qat import features

    data = np.random.default_rng(rows).normal(size=(rows, *row_shape)).astype(np.float16)
    np.save(tmp_path / "ref.npy", data)
    for reserved in (10**12, 10**70):
        monkeypatch.setattr(features._NpyRows, "RESERVED_ROWS", reserved)
        with features._NpyRows(tmp_path / "out.npy", row_shape) as out:
            for block in np.array_split(data, 3):
                out.append(block)
        assert (tmp_path / "out.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()


def test_log_and_pcen_compressions():
    from n6qat.features import PCEN_ALPHA, PCEN_DELTA, PCEN_POWER, scale_magnitude

    x = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 8, 8)
    logged = scale_magnitude(x, "log")
    assert logged.dtype == np.float32 and logged.min() == 0.0
    assert logged.max() == pytest.approx(1.0) and np.all(np.diff(logged.ravel()) > 0)
    steady = np.full((1, 4, 50), 0.2, dtype=np.float32)  # stationary: one gain everywhere
    expected = (0.2 / 0.2**PCEN_ALPHA + PCEN_DELTA) ** PCEN_POWER - PCEN_DELTA**PCEN_POWER
    np.testing.assert_allclose(scale_magnitude(steady, "pcen"), expected, rtol=1e-4)
    onset = steady.copy()
    onset[..., 25] = 2.0  # a sudden call stands out against the smoothed background
    out = scale_magnitude(onset, "pcen")
    assert out[0, 0, 25] > 5 * out[0, 0, 24]
