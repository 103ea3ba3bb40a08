"""Every bad input stops the workflow early with its own message, before any training job.

Paths are checked when the workflow is parsed, the audio trees by the index and split rules,
a checkpoint's content by prepare_pretrained (no training: model.replace_head is off). Each
case runs the real workflow in a temporary folder on tiny generated trees; a checkpoint that
is needed is a tiny Keras model built here. Faults (a full disk, a job held running) are
injected into the jobs through a sitecustomize module on PYTHONPATH.
"""

import json
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from conftest import TINY, snakemake, snakemake_command

from n6qat.errors import N6QATError
from n6qat.features import FeatureSettings

pytestmark = pytest.mark.workflow

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = ROOT / "tests/stand_in/stedgeai"
TINY_FEATURES = FeatureSettings(**yaml.safe_load(TINY.read_text())["features"])
GOOD_TRAIN = {f"{label}/{name}.wav": 1.2 for label in ("amsel", "meise") for name in "abc"}
GOOD_TEST = {"amsel/t.wav": 1.2, "meise/t.wav": 1.2}
TRAINING_LOGS = ("logs/pretrain.log", "logs/prepare_pretrained.log", "logs/qat.log")
TRAINING_JOB = re.compile(r"^(local)?rule (pretrain|prepare_pretrained|qat):", re.MULTILINE)


def write_tree(root: Path, layout: dict[str, float]) -> Path:
    """A class-per-folder tree of short tones, one pitch per class (seconds per file)."""
    root.mkdir(parents=True, exist_ok=True)
    for relative, seconds in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pitch = 400 + 300 * (sum(map(ord, path.parent.name)) % 7)
        t = np.arange(round(16000 * seconds)) / 16000
        sf.write(path, 0.3 * np.sin(2 * np.pi * pitch * t), 16000, subtype="PCM_16")
    return root


def config_args(**sections: dict) -> list[str]:
    """`--config section={...}` arguments (JSON, which Snakemake parses as YAML)."""
    return ["--config", *(f"{name}={json.dumps(values)}" for name, values in sections.items())]


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def assert_no_training(workdir: Path, done: subprocess.CompletedProcess) -> None:
    """The run failed and no training job (nor prepare_pretrained) ever started."""
    assert done.returncode != 0, output(done)[-3000:]
    for log in TRAINING_LOGS:
        assert not (workdir / log).exists(), f"{log} exists: a training job started"
    assert not TRAINING_JOB.search(output(done))


# ---------------------------------------------------------------- paths: at parse time


def checkpoint_at(name: str):
    """Config sections with a good tree and the checkpoint `name` in the tmp folder."""
    return lambda d: {"data": {"train": str(d / "train")}, "model": {"pretrained": str(d / name)}}


EXPECTED_TREE = "(expected a folder holding one sub-folder of audio files per class)"
PATH_CASES = {  # case: (config sections given the tmp folder, the message)
    "missing data.train": (
        lambda d: {"data": {"train": str(d / "nope"), "test": ""}},
        "data.train: {d}/nope does not exist " + EXPECTED_TREE,
    ),
    "data.train is a file": (
        lambda d: {"data": {"train": str(d / "clip.wav"), "test": ""}},
        "data.train: {d}/clip.wav is not a folder " + EXPECTED_TREE,
    ),
    "missing data.test": (
        lambda d: {"data": {"train": str(d / "train"), "test": "test_tree"}},
        "data.test: test_tree ({d}/run/test_tree) does not exist " + EXPECTED_TREE,
    ),
    "missing checkpoint": (
        lambda d: {"data": {"train": str(d / "train")}, "model": {"pretrained": "m.keras"}},
        "model.pretrained: m.keras ({d}/run/m.keras) does not exist (expected a .keras "
        "checkpoint; leave model.pretrained empty to train one)",
    ),
    "checkpoint of garbage bytes": (
        checkpoint_at("g.keras"),
        "model.pretrained: {d}/g.keras is not a Keras checkpoint (neither a .keras zip archive "
        "nor an HDF5 .h5 file): give a model saved with model.save('<name>.keras') in Keras 3",
    ),
    "truncated .keras": (
        checkpoint_at("t.keras"),
        "model.pretrained: {d}/t.keras is an incomplete zip archive (",
    ),
    ".h5 renamed .keras": (
        checkpoint_at("h.keras"),
        "model.pretrained: {d}/h.keras is an HDF5 file (the legacy .h5 format), which Keras 3 "
        "reads only from a file named .h5: rename it to h.h5, or load it and save it with "
        "model.save('<name>.keras')",
    ),
    "missing labels file": (
        lambda d: {"data": {"train": str(d / "train")}, "model": {"labels": str(d / "l.txt")}},
        "model.labels: {d}/l.txt does not exist (expected the checkpoint's labels file",
    ),
}


def write_bad_files(folder: Path) -> None:
    """The files the path cases point at: a WAV file, garbage, a cut .keras, an .h5."""
    import keras

    write_tree(folder / "train", GOOD_TRAIN)
    (folder / "clip.wav").write_bytes((folder / "train/amsel/a.wav").read_bytes())
    (folder / "g.keras").write_bytes(np.random.default_rng(0).bytes(4096))
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.save(folder / "whole.keras")
    whole = (folder / "whole.keras").read_bytes()
    (folder / "t.keras").write_bytes(whole[: len(whole) // 2])
    model.save(folder / "h.h5")
    (folder / "h.h5").rename(folder / "h.keras")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_paths")
    write_bad_files(folder)
    return folder


@pytest.mark.parametrize("case", PATH_CASES)
def test_a_bad_path_stops_the_run_before_any_job(bad_files, case):
    sections, message = PATH_CASES[case]
    workdir = bad_files / "run"
    done = snakemake(workdir, *config_args(**sections(bad_files)))
    assert "invalid configuration:\n  " + message.format(d=bad_files) in output(done)
    assert_no_training(workdir, done)
    assert not (workdir / "logs").exists()  # no job ran at all


# ---------------------------------------------------------------- trees: index and split

TREE_CASES = {  # case: (the training tree, the message's start, the rule that stops)
    "empty tree": (
        {},
        "data.train: {root} holds no files. Put one sub-folder of audio files per class "
        "(<folder>/<class>/*.wav, .flac, .ogg, .mp3) in it.",
        "index_dataset",
    ),
    "only negatives": (
        {"noise/a.wav": 1.2, "silence/b.wav": 1.2},
        "data.train: {root} holds only negative folders (noise: 1 file (negative), silence: 1 "
        "file (negative)); folders named in data.negatives hold background clips, not classes."
        " Add one sub-folder of audio files per class to detect beside them.",
        "index_dataset",
    ),
    "one class": (
        {"amsel/a.wav": 1.2, "amsel/b.wav": 1.2, "noise/c.wav": 1.2},
        "data.train: {root} holds 1 class (amsel: 2 files, noise: 1 file (negative)), at least "
        "2 are needed. Add a sub-folder of audio files for each class to detect.",
        "index_dataset",
    ),
    "every file of a class rejected": (
        {"amsel/a.wav": 1.2, "amsel/b.wav": 1.2, "meise/c.wav": 0.2, "meise/d.wav": 0.2},
        "data.train: every file of the class 'meise' in {root} was rejected:\n"
        "  meise/c.wav: too short: 0.200 s, below min_duration 0.5 s\n"
        "  meise/d.wav: too short: 0.200 s, below min_duration 0.5 s\n"
        "Replace these files with readable audio, or remove {root}/meise.",
        "index_dataset",
    ),
    "a class the validation split leaves empty": (
        {"amsel/a.wav": 1.2, "amsel/b.wav": 1.2, "amsel/c.wav": 1.2, "meise/d.wav": 1.2},
        "data.train: the validation split gets no file of 'meise' (1 file in {root}/meise). "
        "Each class needs one file to train on and one to validate on: add audio files to the "
        "folder (a larger split.val_fraction does not help a class of one file), or remove it.",
        "split_dataset",
    ),
}


@pytest.mark.parametrize("case", TREE_CASES)
def test_a_bad_tree_stops_the_index_or_split(tmp_path, case):
    layout, message, rule = TREE_CASES[case]
    root = write_tree(tmp_path / "train", layout)
    workdir = tmp_path / "run"
    done = snakemake(workdir, *config_args(data={"train": str(root), "test": ""}))
    assert f"n6qat error: {message.format(root=root)}\n(log: logs/{rule}.log)" in output(done)
    assert_no_training(workdir, done)
    assert "rule extract_features:" not in output(done)  # also not "localrule ..."


# ---------------------------------------------------------------- checkpoints: prepare_pretrained


def tiny_model(n_classes: int = 2, settings: FeatureSettings = TINY_FEATURES):
    from n6qat.model import build_dscnn

    return build_dscnn(settings, n_classes=n_classes, width=0.5, depth=1)


def save_checkpoint(folder: Path, name: str, model, labels: list[str] | None = None) -> Path:
    from n6qat.model import save_model

    path = folder / f"{name}.keras"
    save_model(model, path)
    if labels:
        (folder / f"{name}_labels.txt").write_text("".join(f"{label}\n" for label in labels))
    return path


def lambda_model():
    import keras

    inputs = keras.Input(TINY_FEATURES.input_shape)
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="sigmoid")(x))


@pytest.fixture(scope="module")
def features_ready(tmp_path_factory) -> tuple[Path, dict]:
    """A folder where the tiny trees are indexed, split and featurised (no model yet)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    data = {
        "train": str(write_tree(folder / "train", GOOD_TRAIN)),
        "test": str(write_tree(folder / "test", GOOD_TEST)),
    }
    workdir = folder / "run"
    targets = [f"results/features/{split}.npy" for split in ("train", "val", "test")]
    done = snakemake(workdir, *targets, *config_args(data=data))
    assert done.returncode == 0, output(done)[-3000:]
    return workdir, data


CHECKPOINT_CASES = {  # case: (make the checkpoint in a folder, the message)
    "labels that do not match": (
        lambda d: save_checkpoint(d, "other", tiny_model(), ["amsel", "drossel"]),
        "n6qat error: the model {path}: the model's classes differ from the dataset's.\n"
        "  in the data, not in the model: ['meise']\n"
        "  in the model, not in the data: ['drossel']\n"
        "Set model.replace_head: true to swap the classifier head for the dataset's classes.",
    ),
    "more outputs than classes, no labels file": (
        lambda d: save_checkpoint(d, "three", tiny_model(3)),
        "n6qat error: the model {path} has 3 outputs but data.train has 2 classes (amsel, "
        "meise), and no labels file names the model's classes. Set model.replace_head: true",
    ),
    "a Lambda layer (safe mode)": (
        lambda d: save_checkpoint(d, "lambda", lambda_model()),
        "n6qat error: the model {path} holds a Lambda layer, whose Python code Keras' safe "
        "mode refuses to run. Replace the Lambda layer with built-in layers and save the model "
        "again, or set model.safe_mode: false if you trust the file's source.",
    ),
    "input-shape mismatch": (
        lambda d: save_checkpoint(
            d, "shape", tiny_model(settings=FeatureSettings(n_fft=128, spec_width=32)),
            ["amsel", "meise"],
        ),
        "n6qat error: the model {path} expects inputs of shape (65, 32, 1), but the features "
        "are (129, 32, 1) (features.kind=linear, n_fft=256, spec_width=32, n_mels=24). Set the "
        "features section of the config to the model's settings, or give the checkpoint's "
        "sidecar JSON.",
    ),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_a_bad_checkpoint_stops_before_training(features_ready, tmp_path, case):
    make, message = CHECKPOINT_CASES[case]
    workdir, data = features_ready
    path = make(tmp_path)
    done = snakemake(
        workdir, "results/model_qat_int8.tflite",
        *config_args(data=data, model={"pretrained": str(path)}),
    )  # fmt: skip
    assert message.format(path=path) in output(done)
    assert "(log: logs/prepare_pretrained.log)" in output(done)
    assert done.returncode != 0
    assert not re.search(r"^(local)?rule (pretrain|qat):", output(done), re.MULTILINE)
    assert not (workdir / "logs/qat.log").exists()
    assert not (workdir / "results/model/pretrained.keras").exists()


def inject(folder: Path, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `code` at the start of every Python process of the run (jobs included)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    paths = [str(folder), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))


DISK_FULL = """
    import errno, pathlib, sys

    if sys.argv[0].endswith("convert_int8.py"):  # the device fills up halfway into the .tflite
        write_bytes = pathlib.Path.write_bytes

        def full_disk(self, data):
            if self.suffix != ".tflite":
                return write_bytes(self, data)
            write_bytes(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))

        pathlib.Path.write_bytes = full_disk
"""


def test_a_full_disk_while_writing_the_tflite_leaves_no_partial_output(
    features_ready, tmp_path, monkeypatch
):
    workdir, data = features_ready
    path = save_checkpoint(tmp_path, "good", tiny_model(), ["amsel", "meise"])
    inject(tmp_path / "inject", DISK_FULL, monkeypatch)
    done = snakemake(
        workdir, "results/model_ptq_int8.tflite",
        *config_args(data=data, model={"pretrained": str(path)}),
    )  # fmt: skip
    assert done.returncode != 0
    assert (
        "n6qat error: no space left on the device while writing "
        "results/convert/ptq_candidate.tflite "
        "(No space left on device); nothing was written under that name. Free space on it "
        "(df -h results/convert) and run the workflow again.\n(log: logs/convert_ptq.log)"
    ) in output(done)
    results = workdir / "results"
    assert (results / "model/pretrained.keras").is_file()  # the job before it finished
    for name in ("convert/ptq_candidate.tflite", "model_ptq_int8_validation.npz",
                 "convert/ptq_candidate.json", "model_ptq_int8.tflite", "convert/ptq.json"):
        assert not (results / name).exists(), name
    assert not [p for p in results.rglob("*") if "partial" in p.name]


# ---------------------------------------------------------------- two runs in one folder

HOLD = """
    import os, pathlib, sys, time

    if sys.argv[0].endswith("index_dataset.py"):  # hold the job until the test releases it
        release = pathlib.Path(os.environ["N6QAT_TEST_RELEASE"])
        (release.parent / "job_started").touch()
        deadline = time.time() + 300
        while not release.exists() and time.time() < deadline:
            time.sleep(0.1)
"""


def test_a_second_run_in_the_same_folder_is_refused_by_the_lock(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "train", GOOD_TRAIN)
    inject(tmp_path / "inject", HOLD, monkeypatch)
    monkeypatch.setenv("N6QAT_TEST_RELEASE", str(tmp_path / "inject/release"))
    workdir = tmp_path / "run"
    args = ["results/index/files.csv", *config_args(data={"train": str(root), "test": ""})]
    first = subprocess.Popen(
        snakemake_command(workdir, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (tmp_path / "inject/job_started").exists():
            assert first.poll() is None and time.time() < deadline, "the first run never started"
            time.sleep(0.1)
        second = snakemake(workdir, *args)
        assert second.returncode != 0
        assert "Error: Directory cannot be locked." in output(second)
        assert "--unlock" in output(second)  # and what to do if no other run is alive
        assert not (workdir / "results/index/files.csv").exists()
    finally:
        (tmp_path / "inject/release").touch()
        log, _ = first.communicate(timeout=120)
    assert first.returncode == 0, log[-3000:]  # the refused run did not disturb the first
    assert (workdir / "results/index/files.csv").is_file()


# ---------------------------------------------------------------- stedgeai: non-ASCII paths


@pytest.fixture
def tflite_in(tmp_path) -> Path:
    """A folder with a non-ASCII name holding a model file (the tool never reads it here)."""
    folder = tmp_path / "jörg"
    folder.mkdir()
    (folder / "model.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3")
    return folder


def test_a_non_ascii_path_is_refused_before_stedgeai_runs(tflite_in):
    from n6qat.stedgeai import StedgeaiSettings, run_step

    folder, settings = tflite_in / "analyze", StedgeaiSettings(path=str(STAND_IN))
    with pytest.raises(N6QATError) as caught:
        run_step("analyze", tflite_in / "model.tflite", settings, folder)
    assert str(caught.value) == (
        f"the path {tflite_in / 'model.tflite'} holds non-ASCII characters; stedgeai's "
        "Neural-ART compiler fails on them (E103(CliRuntimeError): Error calling the Neural Art "
        "compiler). Move the project to a path of plain ASCII characters"
    )
    assert not (folder / "output").exists()  # the tool never ran


def test_stedgeai_e103_is_explained(tflite_in, monkeypatch):
    """Should a non-ASCII path reach the tool anyway, its E103 comes with what to do."""
    from n6qat import stedgeai

    monkeypatch.setattr(stedgeai, "check_ascii_paths", lambda paths: None)
    settings = stedgeai.StedgeaiSettings(path=str(STAND_IN))
    with pytest.raises(N6QATError) as caught:
        stedgeai.run_step("analyze", tflite_in / "model.tflite", settings, tflite_in / "analyze")
    assert str(caught.value).startswith(
        "stedgeai analyze failed (exit status 1): E103(CliRuntimeError): Error calling the "
        "Neural Art compiler\nWhat to do: the Neural-ART compiler fails on paths with non-ASCII "
        "characters: move the project (and the profile file) to a path of plain ASCII characters"
        "\nCommand: "
    )
