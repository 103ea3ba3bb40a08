"""Tests for the synthetic demo dataset: determinism, layout, formats and difficulty."""

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from n6qat import demo
from n6qat.errors import N6QATError

TINY = 0.1


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A scale-0.1 demo tree written once for the module."""
    root = tmp_path_factory.mktemp("demo")
    return root, demo.generate_demo_dataset(root, seed=42, scale=TINY)


def test_same_seed_gives_identical_bytes(tiny_tree, tmp_path):
    root, _ = tiny_tree
    demo.generate_demo_dataset(tmp_path, seed=42, scale=TINY, workers=2)
    first, second = _hashes(root), _hashes(tmp_path)
    assert "manifest.csv" in first
    assert first == second


def test_other_seed_gives_different_audio():
    plan_a = [s for s in demo.demo_plan(42, TINY) if s.split == "test"]
    plan_b = [s for s in demo.demo_plan(43, TINY) if s.split == "test"]
    for spec_a, spec_b in zip(plan_a, plan_b, strict=True):
        assert spec_a.label == spec_b.label
        a, b = demo.render_demo_file(spec_a), demo.render_demo_file(spec_b)
        assert a.tobytes() != b.tobytes(), spec_a.path


def test_file_does_not_depend_on_generation_order(tiny_tree):
    root, _ = tiny_tree
    spec = demo.demo_plan(42, TINY)[-1]
    alone = demo.render_demo_file(spec)
    written, _ = sf.read(root / spec.path, dtype="int16", always_2d=True)
    np.testing.assert_array_equal(written, alone)


def test_small_plan_is_prefix_of_full_plan():
    full = demo.plan_manifest(demo.demo_plan(42, 1.0)).set_index("path")
    small = demo.plan_manifest(demo.demo_plan(42, TINY)).set_index("path")
    assert len(small) < len(full)
    pd.testing.assert_frame_equal(full.loc[small.index], small)


def test_tree_matches_manifest(tiny_tree):
    root, manifest = tiny_tree
    assert list(manifest.columns) == list(demo.MANIFEST_COLUMNS)
    on_disk = pd.read_csv(root / "manifest.csv")
    pd.testing.assert_frame_equal(on_disk, manifest)
    audio = {p.relative_to(root).as_posix() for p in root.glob("*/*/*") if p.is_file()}
    assert audio == set(manifest["path"])
    assert not list(root.rglob("*.partial"))
    for row in manifest.itertuples():
        info = sf.info(root / row.path)
        assert row.path.split("/")[:2] == [row.split, row.label]
        assert (info.samplerate, info.channels) == (row.sample_rate, row.channels)
        assert (info.format, info.subtype) == (row.format, row.subtype)
        assert info.frames == round(row.duration_s * row.sample_rate)


def test_tiny_tree_has_every_label_in_both_splits(tiny_tree):
    root, manifest = tiny_tree
    counts = manifest.groupby(["split", "label"]).size()
    assert len(demo.LABELS) == 9 and demo.NOISE_LABEL in demo.LABELS
    for label in demo.LABELS:
        assert counts["train", label] >= 3 and counts["test", label] >= 1
        assert (root / "train" / label).is_dir() and (root / "test" / label).is_dir()


def test_full_scale_counts_are_imbalanced():
    counts = demo.file_counts(1.0)
    train = counts["train"]
    assert max(train.values()) >= 4 * min(train.values())
    assert all(10 <= n <= 14 for n in counts["test"].values())


def test_full_plan_has_the_formats_of_a_real_tree():
    manifest = demo.plan_manifest(demo.demo_plan(42, 1.0))
    wav = manifest[manifest["format"] == "WAV"]
    assert set(wav["sample_rate"]) == {22050, 44100, 48000}
    assert (manifest["format"] == "FLAC").sum() >= 20
    assert (manifest["channels"] == 2).sum() >= 20
    duration = manifest["duration_s"]
    assert duration.min() < 3.0 and duration.max() > 20.0
    assert duration.between(3.0, 12.0).mean() > 0.6
    assert 40 <= duration.sum() / 60 <= 60


def test_snr_spreads_over_the_configured_range():
    manifest = demo.plan_manifest(demo.demo_plan(42, 1.0))
    calls = manifest[manifest["label"] != demo.NOISE_LABEL]
    noise = manifest[manifest["label"] == demo.NOISE_LABEL]
    assert calls["snr_db"].min() < -3.0 and calls["snr_db"].max() > 18.0
    assert calls["snr_db"].between(-5.0, 20.0).all()
    assert (calls["n_calls"] >= 1).all()
    assert noise["snr_db"].isna().all() and (noise["n_calls"] == 0).all()


@pytest.mark.parametrize("label", list(demo.SPECIES))
@pytest.mark.parametrize("overlap", [0.0, 1.0])
def test_calls_keep_their_energy_between_1_and_7_khz(label, overlap):
    rng = np.random.default_rng(0)
    for _ in range(5):
        call = demo.synthesize_call(rng, label, 48000, overlap=overlap)
        power = np.abs(np.fft.rfft(call)) ** 2
        freqs = np.fft.rfftfreq(call.size, 1 / 48000)
        in_band = power[(freqs >= 900) & (freqs <= 7100)].sum() / power.sum()
        assert in_band > 0.98, (label, in_band)


def test_rendered_snr_matches_the_plan():
    quiet = demo.Difficulty(distractor_prob=0.0)
    spec = next(s for s in demo.demo_plan(42, 1.0, quiet) if s.label == "whistler")
    clean = demo.render_demo_file(dataclasses.replace(spec, snr_db=np.inf), quiet)[:, 0]
    clean = clean.astype(float)
    for snr_db in (-5.0, 5.0, 15.0):
        noisy = demo.render_demo_file(dataclasses.replace(spec, snr_db=snr_db), quiet)[:, 0]
        source = clean * (noisy @ clean) / (clean @ clean)
        residual = np.fft.rfft(noisy - source)
        freqs = np.fft.rfftfreq(noisy.size, 1 / spec.sample_rate)
        band = residual[(freqs >= 1000) & (freqs <= 7000)]
        noise_power = 2 * np.sum(np.abs(band) ** 2) / noisy.size**2
        measured = 10 * np.log10(np.mean(source[clean != 0] ** 2) / noise_power)
        assert measured == pytest.approx(snr_db, abs=1.0)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def crash(path, *args, **kwargs):
        Path(path).write_bytes(b"RIFF half a file")
        raise OSError("disk full")

    monkeypatch.setattr(demo.sf, "write", crash)
    spec = demo.demo_plan(42, TINY)[0]
    with pytest.raises(OSError, match="disk full"):
        demo.write_demo_file(tmp_path, spec, demo.DEFAULT_DIFFICULTY)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_refuses_to_mix_with_other_files(tmp_path):
    stray = tmp_path / "train" / "whistler" / "my_recording.wav"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"")
    with pytest.raises(N6QATError, match="my_recording.wav"):
        demo.generate_demo_dataset(tmp_path, scale=TINY)


@pytest.mark.parametrize(("seed", "scale"), [(42, 0.0), (42, -1.0), (42, float("nan")), (-1, 1.0)])
def test_bad_seed_or_scale_raises(seed, scale):
    with pytest.raises(N6QATError):
        demo.demo_plan(seed, scale)
