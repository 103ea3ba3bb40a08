"""Index class-per-folder audio trees, split them reproducibly and balance the training set.

A tree holds one folder per class (`root/<label>/**/<file>`); folders named like a negative
class ("noise", "background", ...) hold clips with none of the target sounds.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from n6qat.audio import AudioInfo, AudioReadError, has_audio_extension, read_audio_info
from n6qat.errors import N6QATError

logger = logging.getLogger(__name__)

NEGATIVE_FOLDERS_DEFAULT = ("noise", "silence", "background", "other")

FILE_DTYPES = {
    "path": "str",
    "source": "str",
    "label": "str",
    "negative": "bool",
    "duration": "float64",
    "sample_rate": "int64",
    "channels": "int64",
    "frames": "int64",
    "format": "str",
    "size_bytes": "int64",
    "content_hash": "str",
}
REJECTED_DTYPES = {"path": "str", "source": "str", "label": "str", "reason": "str"}
SPLITS = ("train", "val", "test")

_HASH_CHUNK_BYTES = 1 << 20
_BOOKKEEPING_FILES = {".snakemake_timestamp"}  # Snakemake's marker in directory outputs
_TEXT_SNIFF_BYTES = 1024


class _Rejected(Exception):
    """Why one file cannot be used; raised and caught inside the indexer only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- indexing


def _walk_files(root: Path) -> Iterator[Path]:
    """Every file under root in sorted order, following folder links at most once.

    Hidden folders (.git, .ipynb_checkpoints) and Snakemake's timestamp marker are skipped.
    """
    seen_dirs: set[str] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            dirnames.clear()
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .git, checkpoints
        for name in sorted(filenames):
            if name not in _BOOKKEEPING_FILES:
                yield Path(folder, name)


def _content_hash(path: Path) -> str:
    """blake2b hex digest of the file's bytes, read in chunks so large files stay cheap."""
    digest = hashlib.blake2b()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _looks_like_text(path: Path) -> bool:
    """Whether the file starts with UTF-8 text (no NUL bytes), e.g. a saved web page."""
    with path.open("rb") as stream:
        head = stream.read(_TEXT_SNIFF_BYTES)
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(head) - 3  # only a multi-byte character cut off at the end
    return True


def _extension_name(path: Path) -> str:
    """The extension to show in a rejection reason (".txt", ".DS_Store", "no extension")."""
    if path.suffix:
        return path.suffix
    return path.name if path.name.startswith(".") else "no extension"


def _base_row(path: Path, root: Path, source: str) -> dict[str, str]:
    """Relative POSIX path, source and label (first-level folder, "" directly under root)."""
    parts = path.relative_to(root).parts
    return {"path": "/".join(parts), "source": source, "label": parts[0] if len(parts) > 1 else ""}


def _usable_header(path: Path, min_duration: float) -> AudioInfo:
    """The file's audio header, or _Rejected when it is not audio, empty or too short."""
    try:
        info = read_audio_info(path)
    except AudioReadError as error:
        if _looks_like_text(path):
            raise _Rejected("not audio: the file holds text") from error
        raise _Rejected(f"unreadable or corrupt audio: {error.reason}") from error
    if info.frames == 0:
        raise _Rejected("zero-length audio (0 frames)")
    if info.duration < min_duration:
        raise _Rejected(f"too short: {info.duration:.3f} s, below min_duration {min_duration:g} s")
    return info


def _describe_file(path: Path, label: str, min_duration: float) -> dict[str, object]:
    """Header metadata and content hash of one file, or _Rejected saying why it is unusable."""
    if not has_audio_extension(path):
        raise _Rejected(f"not an audio file extension ({_extension_name(path)})")
    if not label:
        raise _Rejected("not inside a class folder (file directly under the root)")
    try:
        size = path.stat().st_size
        if size == 0:
            raise _Rejected("empty file (0 bytes)")
        info = _usable_header(path, min_duration)
        content_hash = _content_hash(path)
    except OSError as error:
        raise _Rejected(f"cannot read file: {error.strerror or error}") from error
    return {
        "duration": info.duration,
        "sample_rate": info.sample_rate,
        "channels": info.channels,
        "frames": info.frames,
        "format": info.format,
        "size_bytes": size,
        "content_hash": content_hash,
    }


def _table(rows: list[dict[str, object]], dtypes: dict[str, str]) -> pd.DataFrame:
    """Rows as a DataFrame with fixed columns and dtypes (also when empty), sorted by path."""
    table = pd.DataFrame.from_records(rows, columns=list(dtypes)).astype(dtypes)
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def _check_root(root: Path, config_key: str) -> None:
    """Raise N6QATError unless root is an existing folder."""
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise N6QATError(
            f"{config_key}: {root} {problem}. Set {config_key} in the config to a folder "
            "holding one sub-folder of audio files per class."
        )


def index_tree(
    root: Path,
    source: str,
    negatives: Sequence[str],
    min_duration: float,
    show_progress: bool | None = None,
    config_key: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Index a class-per-folder tree from file headers into (files, rejected) tables.

    The label is the first-level folder; deeper folders belong to it. Files that cannot be
    used land in `rejected` with a reason instead of raising. `config_key` (default
    "data.<source>") names the setting in errors; the progress bar shows only on a terminal
    unless `show_progress` says otherwise.
    """
    root = Path(root)
    _check_root(root, config_key or f"data.{source}")
    negative_names = {name.casefold() for name in negatives}
    paths = list(_walk_files(root))
    show = sys.stderr.isatty() if show_progress is None else show_progress
    files: list[dict[str, object]] = []
    rejected: list[dict[str, object]] = []
    for path in tqdm(paths, desc=f"indexing {source}", unit="file", disable=not show):
        row = _base_row(path, root, source)
        try:
            details = _describe_file(path, row["label"], min_duration)
        except _Rejected as rejection:
            rejected.append({**row, "reason": rejection.reason})
            continue
        files.append({**row, "negative": row["label"].casefold() in negative_names, **details})
    logger.info("%s: indexed %d files, rejected %d", root, len(files), len(rejected))
    return _table(files, FILE_DTYPES), _table(rejected, REJECTED_DTYPES)


# ---------------------------------------------------------------- checks


def class_labels(files: pd.DataFrame) -> list[str]:
    """Sorted target class labels, negative (background) classes excluded."""
    return sorted(files.loc[~files["negative"], "label"].unique().tolist())


def _class_summary(files: pd.DataFrame) -> str:
    """Each label with its file count, negatives marked, for error messages."""
    counts = files.groupby(["label", "negative"]).size()
    return ", ".join(
        f"{label}: {count} file{'s' if count != 1 else ''}{' (negative)' if negative else ''}"
        for (label, negative), count in counts.items()
    )


def _rejections(rejected: pd.DataFrame, shown: int = 5) -> str:
    """Indented `path: reason` lines of the first rejected files, for error messages."""
    lines = [f"  {row.path}: {row.reason}" for row in rejected.head(shown).itertuples()]
    if len(rejected) > shown:
        lines.append(f"  ... and {len(rejected) - shown} more (all listed in the log)")
    return "\n".join(lines)


TREE_LAYOUT = "one sub-folder of audio files per class (<folder>/<class>/*.wav, .flac, .ogg, .mp3)"


def check_trees(
    files: pd.DataFrame,
    rejected: pd.DataFrame,
    roots: Mapping[str, str | Path],
    min_classes: int = 2,
) -> None:
    """Raise N6QATError unless the indexed trees can train a classifier.

    Each tree (`roots`: source -> folder, the config key is data.<source>) must hold usable
    files, and no class may lose all its files to rejection; the training tree needs
    `min_classes` target classes (negative folders do not count) and the test tree no class
    the training tree lacks. The message names the key, the folder and what to do.
    """
    for source, root in roots.items():
        _check_tree(files[files["source"] == source], rejected[rejected["source"] == source],
                    f"data.{source}", Path(root))
    train = files[files["source"] == "train"]
    root = roots.get("train", "data.train")
    if not train.empty and train["negative"].all():
        raise N6QATError(
            f"data.train: {root} holds only negative folders ({_class_summary(train)}); "
            "folders named in data.negatives hold background clips, not classes. Add one "
            "sub-folder of audio files per class to detect beside them."
        )
    labels = class_labels(train)
    if len(labels) < min_classes:
        raise N6QATError(
            f"data.train: {root} holds {len(labels)} class{'es' if len(labels) != 1 else ''} "
            f"({_class_summary(train)}), at least {min_classes} are needed. Add a sub-folder "
            "of audio files for each class to detect."
        )
    unknown = sorted(set(class_labels(files[files["source"] == "test"])) - set(labels))
    if unknown:
        raise N6QATError(
            f"data.test: the classes {unknown} of {roots.get('test')} have no usable files in "
            f"data.train ({root}), so the model cannot learn them. Add them to data.train or "
            "remove them from data.test."
        )


def _check_tree(files: pd.DataFrame, rejected: pd.DataFrame, key: str, root: Path) -> None:
    """One tree: not empty, not every file rejected, no class whose files were all rejected."""
    if files.empty and rejected.empty:
        other = ', or set data.test: "" to cut a test split from data.train'
        raise N6QATError(
            f"{key}: {root} holds no files. Put {TREE_LAYOUT} in it"
            f"{other if key == 'data.test' else ''}."
        )
    if files.empty:
        raise N6QATError(
            f"{key}: none of the {len(rejected)} files under {root} is usable audio:\n"
            f"{_rejections(rejected)}\nPut {TREE_LAYOUT} in it."
        )
    lost = sorted(set(rejected.loc[rejected["label"] != "", "label"]) - set(files["label"]))
    if lost:
        bad = rejected[rejected["label"].isin(lost)]
        folders = ", ".join(str(root / label) for label in lost)
        raise N6QATError(
            f"{key}: every file of the class{'es' if len(lost) > 1 else ''} "
            f"{', '.join(repr(label) for label in lost)} in {root} was rejected:\n"
            f"{_rejections(bad)}\nReplace these files with readable audio, or remove {folders}."
        )


def check_val_split(split: pd.DataFrame, train_root: str | Path) -> None:
    """Raise N6QATError when a target class of the training tree has no validation file."""
    train = split[(split["source"] != "test") & ~split["negative"]]
    with_val = set(train.loc[train["split"] == "val", "label"])
    empty = sorted(set(train["label"]) - with_val)
    if not empty:
        return
    counts = train.groupby("label").size()
    listed = ", ".join(
        f"{label!r} ({counts[label]} file{'s' if counts[label] != 1 else ''} in "
        f"{Path(train_root) / label})"
        for label in empty
    )
    raise N6QATError(
        f"data.train: the validation split gets no file of {listed}. Each class needs one "
        "file to train on and one to validate on: add audio files to the folder (a larger "
        "split.val_fraction does not help a class of one file), or remove it."
    )


# ---------------------------------------------------------------- splitting


def split_hash(seed: int, path: str) -> float:
    """Map (seed, relative path) to [0, 1) reproducibly on every machine and OS.

    The path is NFC-normalised so a tree copied from macOS (NFD names) splits the same.
    """
    key = f"{seed}\x00{unicodedata.normalize('NFC', path)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise N6QATError unless the fractions are in [0, 1) and leave files for training."""
    fractions = {"split.val_fraction": val_fraction, "split.test_fraction": test_fraction}
    for key, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise N6QATError(f"{key} is {value}; set it to a fraction in [0, 1).")
    if val_fraction + test_fraction >= 1.0:
        raise N6QATError(
            f"split.val_fraction + split.test_fraction is {val_fraction + test_fraction}; "
            "lower them so some files remain for training."
        )


def _hash_split(u: float, val_fraction: float, test_fraction: float) -> str:
    """Split of a file by its hash alone: val below val_fraction, then test, then train."""
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def _force_val_and_train(splits: np.ndarray, hashes: np.ndarray, want_val: bool) -> None:
    """Give one class a train file and, with >= 2 files, a val file (in place).

    With no val file (and want_val), the lowest-hash file, nearest the val band, becomes val;
    with no train file, the highest-hash file becomes train. So at most two files per class
    differ from their hash split, and only in a class whose hash splits lack val or train;
    when files are added, only such forced files (before or after) can change split.
    """
    if want_val and len(splits) >= 2 and not (splits == "val").any():
        splits[np.argmin(hashes)] = "val"
    if len(splits) >= 1 and not (splits == "train").any():
        splits[np.argmax(hashes)] = "train"


def _split_one_tree(
    paths: np.ndarray, labels: np.ndarray, fractions: tuple[float, float], seed: int
) -> np.ndarray:
    """Splits for files of the training tree: by hash, then per-class guarantees."""
    val_fraction, test_fraction = fractions
    hashes = np.array([split_hash(seed, path) for path in paths], dtype="float64")
    splits = np.array([_hash_split(u, val_fraction, test_fraction) for u in hashes], dtype=object)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        class_splits = splits[members]
        _force_val_and_train(class_splits, hashes[members], want_val=val_fraction > 0)
        splits[members] = class_splits
    return splits


def assign_splits(
    files: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """Return files with a `split` column (train/val/test), stable when files are added.

    Files from the test tree (source "test") are always test. Others are split per class by
    split_hash(seed, path): below val_fraction is val, the next test_fraction is test (only
    when no test tree was indexed), the rest train. Then every class keeps a train file and
    each class with >= 2 files gets a val file (if val_fraction > 0): _force_val_and_train.
    """
    _check_fractions(val_fraction, test_fraction)
    from_test_tree = (files["source"] == "test").to_numpy()
    fractions = (val_fraction, 0.0 if from_test_tree.any() else test_fraction)
    splits = np.full(len(files), "test", dtype=object)
    pool = ~from_test_tree
    splits[pool] = _split_one_tree(
        files["path"].to_numpy()[pool], files["label"].to_numpy()[pool], fractions, seed
    )
    return files.assign(split=pd.Series(splits, index=files.index, dtype="str"))


# ---------------------------------------------------------------- balancing


def _target_size(ratio: float, largest: int) -> int:
    """ceil(ratio * largest), ignoring float noise such as 0.3 * 10 = 3.0000000000000004."""
    return math.ceil(round(ratio * largest, 9))


def _label_rng(seed: int, label: str) -> np.random.Generator:
    """A generator seeded by (seed, label), so one class's draws do not depend on others."""
    label_key = int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "big")
    return np.random.default_rng([seed, label_key])


def _with_repeats(group: pd.DataFrame, target: int, rng: np.random.Generator) -> pd.DataFrame:
    """One class's rows (sorted by path) plus seeded repeats up to target, numbered by copy."""
    originals = group.sort_values("path", kind="stable").assign(copy=0)
    extra = target - len(originals)
    if extra <= 0:
        return originals
    repeats = originals.iloc[rng.integers(0, len(originals), size=extra)].copy()
    repeats["copy"] = repeats.groupby("path").cumcount() + 1
    return pd.concat([originals, repeats])


def upsample_minority(
    train: pd.DataFrame, ratio: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Repeat files of small classes up to ceil(ratio * largest class size).

    Each label (negatives too) is its own group, sampled with replacement from its own files.
    Returns the rows with a `copy` column (0 original, 1.. repeat) ordered by label, path and
    copy, and a table of `label, before, after` counts.
    """
    if not 0.0 < ratio <= 1.0:
        raise N6QATError(f"split.upsample_ratio is {ratio}; set it to a number in (0, 1].")
    counts = train.groupby("label", sort=True).size()
    target = _target_size(ratio, int(counts.max())) if len(counts) else 0
    parts = [
        _with_repeats(group, target, _label_rng(seed, str(label)))
        for label, group in train.groupby("label", sort=True)
    ]
    rows = pd.concat(parts) if parts else train.assign(copy=pd.Series(dtype="int64"))
    rows = rows.sort_values(["label", "path", "copy"], kind="stable").reset_index(drop=True)
    rows["copy"] = rows["copy"].astype("int64")
    after = rows.groupby("label", sort=True).size()
    table = pd.DataFrame(
        {"label": counts.index.astype("str"), "before": counts.values, "after": after.values}
    ).astype({"before": "int64", "after": "int64"})
    return rows, table


def read_table(path: Path) -> pd.DataFrame:
    """Read an index table back with text columns kept as text (a class named "1" stays "1")."""
    text = {"path": str, "source": str, "label": str, "split": str, "reason": str}
    return pd.read_csv(path, dtype=text, keep_default_na=False)
