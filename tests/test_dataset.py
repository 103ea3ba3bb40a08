"""Tests for n6qat.dataset: indexing a class-per-folder tree, splitting and upsampling."""

import hashlib
import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from n6qat.dataset import (
    NEGATIVE_FOLDERS_DEFAULT,
    assign_splits,
    check_trees,
    check_val_split,
    class_labels,
    index_tree,
    split_hash,
    upsample_minority,
)
from n6qat.errors import N6QATError

MIN_DURATION = 0.5

# relative path -> (sample rate, channels, seconds, format, subtype)
GOOD = {
    "amsel/plain.wav": (22050, 1, 1.0, "WAV", "PCM_16"),
    "amsel/Amsel – Gesang 1 ü.wav": (22050, 1, 0.75, "WAV", "PCM_16"),
    "amsel/stereo.wav": (44100, 2, 1.0, "WAV", "PCM_16"),
    "amsel/u8.wav": (16000, 1, 1.0, "WAV", "PCM_U8"),
    "amsel/pcm24.wav": (48000, 1, 0.5, "WAV", "PCM_24"),
    "amsel/float.wav": (32000, 1, 2.0, "WAV", "FLOAT"),
    "amsel/song.flac": (44100, 1, 1.0, "FLAC", "PCM_16"),
    "amsel/song.ogg": (22050, 1, 1.0, "OGG", "VORBIS"),
    "amsel/LOUD.WAV": (8000, 1, 1.0, "WAV", "PCM_16"),
    "amsel/deeper/nested/clip.wav": (16000, 1, 1.0, "WAV", "PCM_16"),
    "meise/a.wav": (16000, 1, 1.0, "WAV", "PCM_16"),
    "meise/b.mp3": (44100, 1, 1.0, "MP3", "MPEG_LAYER_III"),
    "Noise/wind.wav": (16000, 1, 3.0, "WAV", "PCM_16"),
    "Noise/rain.flac": (16000, 2, 1.0, "FLAC", "PCM_16"),
}

# relative path -> expected reason (a substring of it)
BAD = {
    "amsel/corrupt.wav": "unreadable or corrupt audio: Format not recognised.",
    "amsel/empty.wav": "empty file (0 bytes)",
    "amsel/short.wav": "too short: 0.200 s, below min_duration 0.5 s",
    "amsel/zero.wav": "zero-length audio (0 frames)",
    "amsel/notes.txt": "not an audio file extension (.txt)",
    "amsel/.DS_Store": "not an audio file extension (.DS_Store)",
    "meise/page.wav": "not audio: the file holds text",
    "stray.wav": "not inside a class folder (file directly under the root)",
}


def write_tone(
    path: Path, rate: int, channels: int, seconds: float, fmt: str, subtype: str
) -> None:
    """Write a 440 Hz tone with the given layout, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(rate * seconds)) / rate
    wave = np.repeat((0.3 * np.sin(2 * np.pi * 440 * t))[:, None], channels, axis=1)
    sf.write(path, wave, rate, format=fmt, subtype=subtype)


def write_bad_files(root: Path) -> None:
    """Every kind of file the indexer must reject, each with its own reason."""
    (root / "amsel/corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "amsel/empty.wav").write_bytes(b"")
    write_tone(root / "amsel/short.wav", 16000, 1, 0.2, "WAV", "PCM_16")
    sf.write(root / "amsel/zero.wav", np.zeros(0), 16000)
    (root / "amsel/notes.txt").write_text("recorded in the garden\n")
    (root / "amsel/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "meise/page.wav").write_text("<!DOCTYPE html><p>404 – nicht gefunden</p>\n")
    write_tone(root / "stray.wav", 16000, 1, 1.0, "WAV", "PCM_16")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training tree with good files in many formats plus one of every bad case."""
    root = tmp_path_factory.mktemp("train")
    for relative, (rate, channels, seconds, fmt, subtype) in GOOD.items():
        write_tone(root / relative, rate, channels, seconds, fmt, subtype)
    write_bad_files(root)
    return root


@pytest.fixture(scope="module")
def indexed(tree: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tree indexed once for all tests that only read the result."""
    return index_tree(tree, "train", NEGATIVE_FOLDERS_DEFAULT, MIN_DURATION, show_progress=False)


# ---------------------------------------------------------------- index_tree


def test_index_tree_columns_and_order(indexed: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    files, rejected = indexed
    assert list(files.columns) == [
        "path", "source", "label", "negative", "duration", "sample_rate", "channels",
        "frames", "format", "size_bytes", "content_hash",
    ]  # fmt: skip
    assert list(rejected.columns) == ["path", "source", "label", "reason"]
    assert files["path"].tolist() == sorted(files["path"])
    assert rejected["path"].tolist() == sorted(rejected["path"])
    assert files["negative"].dtype == bool
    assert files["sample_rate"].dtype == "int64"
    assert set(files["source"]) == set(rejected["source"]) == {"train"}


def test_index_tree_indexes_every_good_file(
    tree: Path, indexed: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    files = indexed[0].set_index("path")
    assert sorted(files.index) == sorted(GOOD)
    for relative, (rate, channels, seconds, fmt, _) in GOOD.items():
        row = files.loc[relative]
        assert (row["sample_rate"], row["channels"], row["format"]) == (rate, channels, fmt)
        assert row["frames"] == round(rate * seconds), relative
        assert row["duration"] == pytest.approx(seconds, abs=1 / rate), relative
        assert row["label"] == relative.split("/")[0]
        content = (tree / relative).read_bytes()
        assert row["size_bytes"] == len(content)
        assert row["content_hash"] == hashlib.blake2b(content).hexdigest()


def test_index_tree_marks_negative_folders_case_insensitively(
    indexed: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    files = indexed[0]
    assert set(files.loc[files["negative"], "label"]) == {"Noise"}
    assert set(files.loc[~files["negative"], "label"]) == {"amsel", "meise"}


def test_index_tree_rejects_every_bad_file_with_reason(
    indexed: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    rejected = indexed[1].set_index("path")
    assert sorted(rejected.index) == sorted(BAD)
    for relative, reason in BAD.items():
        assert rejected.loc[relative, "reason"] == reason
    assert rejected.loc["stray.wav", "label"] == ""
    assert rejected.loc["meise/page.wav", "label"] == "meise"


def test_index_tree_reads_headers_only(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("index_tree decoded audio")

    monkeypatch.setattr(sf.SoundFile, "read", refuse)
    monkeypatch.setattr(sf, "read", refuse)
    files, _ = index_tree(tree, "train", NEGATIVE_FOLDERS_DEFAULT, MIN_DURATION, False)
    assert len(files) == len(GOOD)


def test_index_tree_progress_only_when_asked_or_on_a_terminal(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index_tree(tree, "train", NEGATIVE_FOLDERS_DEFAULT, MIN_DURATION)  # stderr is no terminal
    assert capsys.readouterr().err == ""
    index_tree(tree, "train", NEGATIVE_FOLDERS_DEFAULT, MIN_DURATION, show_progress=True)
    assert "indexing train" in capsys.readouterr().err


def test_index_tree_missing_root_names_path_and_key(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(N6QATError, match="data.test") as caught:
        index_tree(missing, "test", NEGATIVE_FOLDERS_DEFAULT, MIN_DURATION)
    assert str(missing) in str(caught.value)
    with pytest.raises(N6QATError, match="data.extra"):
        index_tree(missing, "train", (), MIN_DURATION, config_key="data.extra")


def test_index_tree_empty_root_gives_typed_empty_tables(tmp_path: Path) -> None:
    files, rejected = index_tree(tmp_path, "train", (), MIN_DURATION)
    assert files.empty and rejected.empty
    assert files["duration"].dtype == "float64"
    assert "content_hash" in files.columns and "reason" in rejected.columns


# ---------------------------------------------------------------- labels and checks


def test_class_labels_exclude_negatives(indexed: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    assert class_labels(indexed[0]) == ["amsel", "meise"]


def test_check_trees_accepts_a_usable_tree(
    tree: Path, indexed: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    check_trees(*indexed, {"train": tree})  # rejected files alone do not stop the run


def _index(root: Path, source: str = "train") -> tuple[pd.DataFrame, pd.DataFrame]:
    return index_tree(root, source, NEGATIVE_FOLDERS_DEFAULT, MIN_DURATION, show_progress=False)


def _tone(root: Path, relative: str, seconds: float = 1.0) -> None:
    write_tone(root / relative, 16000, 1, seconds, "WAV", "PCM_16")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, r"data.train: {root} holds no files\. Put one sub-folder of audio files per class"),
        (
            {"amsel/a.wav": 0.2, "meise/b.wav": 0.2},
            r"(?s)data.train: none of the 2 files under {root} is usable audio:\n"
            r"  amsel/a.wav: too short: 0.200 s.*meise/b.wav",
        ),
        (
            {"amsel/a.wav": 1, "amsel/b.wav": 1, "meise/c.wav": 0.2},
            r"(?s)data.train: every file of the class 'meise' in {root} was rejected:\n"
            r"  meise/c.wav: too short.*Replace these files with readable audio, or remove "
            r"{root}/meise\.",
        ),
        (
            {"noise/a.wav": 1, "Silence/b.wav": 1},
            r"data.train: {root} holds only negative folders \(Silence: 1 file \(negative\), "
            r"noise: 1 file \(negative\)\); folders named in data.negatives",
        ),
        (
            {"amsel/a.wav": 1, "amsel/b.wav": 1, "noise/c.wav": 1},
            r"data.train: {root} holds 1 class \(amsel: 2 files, noise: 1 file \(negative\)\), "
            r"at least 2 are needed",
        ),
    ],
    ids=["empty", "all rejected", "class rejected", "only negatives", "one class"],
)
def test_check_trees_names_the_folder_and_what_to_do(
    tmp_path: Path, layout: dict[str, float], message: str
) -> None:
    root = tmp_path / "train"
    root.mkdir()
    for relative, seconds in layout.items():
        _tone(root, relative, seconds)
    with pytest.raises(N6QATError, match=message.format(root=re.escape(str(root)))):
        check_trees(*_index(root), {"train": root})


def _index_both(train: Path, test: Path) -> list[pd.DataFrame]:
    """(files, rejected) of both trees together, as the index rule makes them."""
    pairs = zip(_index(train), _index(test, "test"), strict=True)
    return [pd.concat(pair, ignore_index=True) for pair in pairs]


def test_check_trees_checks_the_test_tree(tmp_path: Path) -> None:
    train, test = tmp_path / "train", tmp_path / "test"
    for relative in ("amsel/a.wav", "meise/b.wav"):
        _tone(train, relative)
    test.mkdir()
    tables = _index_both(train, test)
    with pytest.raises(N6QATError, match='data.test: .* holds no files.*or set data.test: ""'):
        check_trees(*tables, {"train": train, "test": test})
    _tone(test, "drossel/c.wav")
    tables = _index_both(train, test)
    with pytest.raises(N6QATError, match=r"data.test: the classes \['drossel'\] .* no usable"):
        check_trees(*tables, {"train": train, "test": test})


def test_check_val_split_names_a_class_without_validation_files() -> None:
    files = make_files({"amsel": 6, "meise": 1}).assign(negative=False)
    split = assign_splits(files, 0.15, 0.0, seed=0)
    with pytest.raises(N6QATError) as caught:
        check_val_split(split, "/data/train")
    assert str(caught.value).startswith(
        "data.train: the validation split gets no file of 'meise' (1 file in /data/train/meise)"
    )
    assert "split.val_fraction" in str(caught.value)
    check_val_split(assign_splits(make_files({"amsel": 6, "meise": 2}).assign(negative=False),
                                  0.15, 0.0, seed=0), "/data/train")


# ---------------------------------------------------------------- assign_splits


def make_files(counts: dict[str, int], source: str = "train", first: int = 0) -> pd.DataFrame:
    """A files table of `counts[label]` paths per label, numbered from `first`."""
    rows = [
        {"path": f"{label}/clip{i:04d}.wav", "source": source, "label": label, "negative": False}
        for label, count in counts.items()
        for i in range(first, first + count)
    ]
    return pd.DataFrame(rows)


def split_of(files: pd.DataFrame) -> dict[str, str]:
    """Path -> split."""
    return dict(zip(files["path"], files["split"], strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assign_splits_stable_when_files_are_added(seed: int) -> None:
    before = assign_splits(make_files({"a": 40, "b": 30, "c": 25}), 0.2, 0.1, seed)
    added = pd.concat(
        [make_files({"a": 40, "b": 30, "c": 25}), make_files({"a": 50, "b": 5}, first=100)]
    )
    after = split_of(assign_splits(added.sample(frac=1.0, random_state=seed), 0.2, 0.1, seed))
    assert {path: after[path] for path in split_of(before)} == split_of(before)


def hash_rule(path: str, seed: int, val_fraction: float) -> str:
    """The split a path gets from its hash alone (no test band)."""
    return "val" if split_hash(seed, path) < val_fraction else "train"


def test_only_forced_files_move_as_a_small_class_grows() -> None:
    seed, val_fraction = 3, 0.2
    previous: dict[str, str] = {}
    forced_before: set[str] = set()
    forced_seen = 0
    for size in range(1, 40):
        current = split_of(assign_splits(make_files({"rare": size}), val_fraction, 0.0, seed))
        by_hash = {path: hash_rule(path, seed, val_fraction) for path in current}
        forced = {path for path in current if current[path] != by_hash[path]}
        assert len(forced) <= 1
        if forced:  # forcing happens only when the hash splits lack val or train
            assert len(set(by_hash.values())) == 1
        assert set(current.values()) == ({"train"} if size == 1 else {"train", "val"})
        moved = {path for path in previous if current[path] != previous[path]}
        assert moved <= forced_before | forced
        forced_seen += len(forced)
        previous, forced_before = current, forced
    assert forced_seen > 0  # the guarantee did force files, so the checks above were exercised
    assert not forced_before  # once the class is large enough, the hash alone decides


def test_every_class_gets_val_and_train() -> None:
    files = make_files({"two": 2, "three": 3, "five": 5, "many": 200, "single": 1})
    result = assign_splits(files, 0.1, 0.0, seed=11)
    per_class = result.groupby("label")["split"].agg(set)
    for label in ["two", "three", "five", "many"]:
        assert per_class[label] == {"train", "val"}, label
    assert per_class["single"] == {"train"}
    assert (result.loc[result["label"] == "many", "split"] == "val").mean() == pytest.approx(
        0.1, abs=0.05
    )


def test_test_tree_files_are_test_and_train_tree_is_not() -> None:
    files = pd.concat([make_files({"a": 50, "b": 50}), make_files({"a": 7, "b": 3}, "test")])
    result = assign_splits(files, 0.2, 0.3, seed=0)  # index labels repeat after concat
    assert (result.loc[result["source"] == "test", "split"] == "test").all()
    assert set(result.loc[result["source"] == "train", "split"]) == {"train", "val"}
    assert len(result) == len(files) and result.index.equals(files.index)


def test_test_fraction_applies_without_test_tree() -> None:
    result = assign_splits(make_files({"a": 600, "b": 600}), 0.1, 0.2, seed=5)
    shares = result["split"].value_counts(normalize=True)
    assert shares["test"] == pytest.approx(0.2, abs=0.03)
    assert shares["val"] == pytest.approx(0.1, abs=0.03)
    assert shares["train"] == pytest.approx(0.7, abs=0.03)


def test_assign_splits_deterministic_per_seed() -> None:
    files = make_files({"a": 100, "b": 100})
    first = assign_splits(files, 0.2, 0.0, seed=1)
    assert assign_splits(files, 0.2, 0.0, seed=1).equals(first)
    assert not assign_splits(files, 0.2, 0.0, seed=2)["split"].equals(first["split"])


def test_split_hash_ignores_unicode_normalisation() -> None:
    name = "amsel/Amsel – Gesang ü.wav"
    nfd = unicodedata.normalize("NFD", name)
    assert nfd != name
    assert split_hash(4, nfd) == split_hash(4, name)
    assert 0.0 <= split_hash(4, name) < 1.0


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "key"),
    [(-0.1, 0.0, "split.val_fraction"), (0.2, 1.0, "split.test_fraction"), (0.6, 0.4, "lower")],
)
def test_assign_splits_rejects_bad_fractions(
    val_fraction: float, test_fraction: float, key: str
) -> None:
    with pytest.raises(N6QATError, match=key):
        assign_splits(make_files({"a": 3}), val_fraction, test_fraction, seed=0)


# ---------------------------------------------------------------- upsample_minority


def minority_train() -> pd.DataFrame:
    """10 / 4 / 1 target files and 7 negative files."""
    files = make_files({"big": 10, "mid": 4, "tiny": 1, "noise": 7})
    files["negative"] = files["label"] == "noise"
    return files


def counts_of(table: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """label -> (before, after) from a counts table."""
    return {row.label: (row.before, row.after) for row in table.itertuples()}


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (0.5, {"big": (10, 10), "mid": (4, 5), "noise": (7, 7), "tiny": (1, 5)}),
        (0.3, {"big": (10, 10), "mid": (4, 4), "noise": (7, 7), "tiny": (1, 3)}),
        (1.0, {"big": (10, 10), "mid": (4, 10), "noise": (7, 10), "tiny": (1, 10)}),
    ],
)
def test_upsample_minority_counts(ratio: float, expected: dict[str, tuple[int, int]]) -> None:
    rows, table = upsample_minority(minority_train(), ratio, seed=0)
    assert list(table.columns) == ["label", "before", "after"]
    assert counts_of(table) == expected
    assert rows["label"].value_counts().to_dict() == {k: v[1] for k, v in expected.items()}


def test_upsample_minority_rows_and_copies() -> None:
    train = minority_train()
    rows, _ = upsample_minority(train, 0.5, seed=0)
    originals = rows[rows["copy"] == 0]
    assert sorted(originals["path"]) == sorted(train["path"])
    assert not rows.duplicated(["path", "copy"]).any()
    tiny = rows[rows["label"] == "tiny"]
    assert tiny["copy"].tolist() == [0, 1, 2, 3, 4]
    assert rows[["label", "path", "copy"]].equals(
        rows[["label", "path", "copy"]].sort_values(["label", "path", "copy"])
    )


def test_upsample_minority_reproducible_by_seed() -> None:
    train = minority_train()
    first = upsample_minority(train, 1.0, seed=9)[0].to_csv(index=False).encode()
    again = upsample_minority(train.sample(frac=1.0, random_state=1), 1.0, seed=9)[0]
    assert again.to_csv(index=False).encode() == first
    other = upsample_minority(train, 1.0, seed=10)[0].to_csv(index=False).encode()
    assert other != first


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_upsample_minority_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(N6QATError, match="split.upsample_ratio"):
        upsample_minority(minority_train(), ratio, seed=0)
