"""The real workflow, run by Snakemake on a tiny generated demo tree in a temporary folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, snakemake

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_data_stage_outputs(run):
    files = pd.read_csv(run / "results/index/files.csv")
    labels = (run / "results/index/labels.txt").read_text().split()
    assert len(labels) == 8 and "noise" not in labels
    assert {"path", "label", "source", "duration", "sample_rate", "channels", "size_bytes",
            "content_hash"} <= set(files.columns)
    split = pd.read_csv(run / "results/index/split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    counts = pd.read_csv(run / "results/index/class_counts.csv")
    assert (counts["after"] >= counts["before"]).all()
    for name in ("train", "val", "test"):
        feats = np.load(run / f"results/features/{name}.npy", mmap_mode="r")
        chunks = pd.read_csv(run / f"results/features/{name}_chunks.csv")
        assert feats.shape == (len(chunks), 129, 32, 1)


def test_int8_models_are_clean_and_agree(run):
    from n6qat.tflite_inspect import int8_problems, read_tflite

    for model in ("ptq", "qat"):
        info = read_tflite(run / f"results/model_{model}_int8.tflite")
        assert int8_problems(info) == []
        report = json.loads((run / f"results/convert/{model}.json").read_text())
        assert report["simulation_fidelity"]["cosine"] >= 0.99  # the TFLite is the simulation
        assert report["host_runtime_spread"]["samples"] == report["simulation_fidelity"]["samples"]
        assert report["gate"]["passed"] and report["gate"]["checks"]
        assert report["quality"]["int8"]["files"] == report["quality"]["fp32"]["files"] > 0
        val = np.load(run / f"results/model_{model}_int8_validation.npz")
        assert val["m_inputs_1"].shape[1:] == (129, 32, 1)


REPRODUCED = [
    "results/model_ptq_int8.tflite",
    "results/model_qat_int8.tflite",
    "results/model/pretrained.keras",
    "results/model/qat.keras",
    "results/model/qat_history.csv",
    "results/convert/qat.json",
]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_fresh_runs_give_identical_bytes(run, tmp_path):
    """Same config, seeds, machine and compute.threads: the same .tflite and .keras bytes,
    also with another --cores (TensorFlow's threads come from the config, not from it)."""
    hashes = {name: _sha256(run / name) for name in REPRODUCED}  # before other tests rerun QAT
    result = snakemake(tmp_path, *REPRODUCED, "--cores", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    for name in REPRODUCED:
        assert _sha256(tmp_path / name) == hashes[name], f"{name} differs between two runs"


def test_qat_model_loads_without_custom_objects(run):
    import keras

    model = keras.saving.load_model(run / "results/model/qat.keras", compile=False)
    assert model.output_shape == (None, 8)


def test_second_run_has_nothing_to_do(run):
    result = snakemake(run, "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_host_check_and_evaluation(run):
    summary = json.loads((run / "results/npu/summary.json").read_text())
    assert summary  # the comparison file exists even without stedgeai
    for model in ("ptq", "qat"):
        check = json.loads((run / f"results/npu/{model}_host_check.json").read_text())
        assert check["clean"] and check["error_count"] == 0
        assert (run / f"results/npu/{model}_host_check.txt").read_text().strip()
    table = pd.read_csv(run / "results/eval/summary.csv")
    assert list(table["model"]) == ["fp32", "qat_fp32", "ptq_int8", "qat_int8"]
    assert table["file_top1_accuracy"].between(0, 1).all()
    assert table.loc[2:, "host_latency_ms_median"].gt(0).all()


def test_feature_params_rerun_features_and_qat_params_do_not(run):
    qat_change = snakemake(run, "-n", "--config", 'qat={"epochs": 5}')
    assert "qat" in qat_change.stdout and "extract_features" not in qat_change.stdout
    feature_change = snakemake(run, "-n", "--config", 'features={"spec_width": 16}')
    assert "extract_features" in feature_change.stdout and "pretrain" in feature_change.stdout


def test_equalize_mode_feeds_ptq_and_qat_the_equalized_model(run):
    from n6qat.model import load_model

    equalize = ("--config", 'equalize={"mode": "bounded"}')
    plan = snakemake(run, "-n", *equalize)
    for rule in ("equalize", "convert_int8", "qat"):
        assert f"rule {rule}:" in plan.stdout
    assert "rule pretrain:" not in plan.stdout
    made = snakemake(run, "results/model/equalized.keras", *equalize)  # adds files only
    assert made.returncode == 0, made.stderr[-2000:]
    table = pd.read_csv(run / "results/model/equalization.csv")
    assert len(table) and set(table["mode"]) == {"bounded"}
    x = np.load(run / "results/features/val.npy")[:16].astype(np.float32)
    before = load_model(run / "results/model/pretrained.keras").predict(x, verbose=0)
    after = load_model(run / "results/model/equalized.keras").predict(x, verbose=0)
    np.testing.assert_allclose(after, before, atol=1e-4)  # bounded rescaling is exact


def test_killed_qat_run_resumes_and_keeps_the_best_epoch_across_the_kill(run, tmp_path):
    """Hard-kill the QAT job after its second epoch; the rerun resumes there, and keeps the
    same epoch and the same weights as an uninterrupted run."""
    import signal
    import time

    log = run / "logs/qat.log"
    target = ["results/model/qat.keras", "--config", 'qat={"epochs": 5}']
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(run), "--configfile", str(TINY), "--cores", "2",
           "results/model/qat.keras", "--forcerun", "qat", "--config", 'qat={"epochs": 5}']
    log.unlink(missing_ok=True)
    # The killed job cleans nothing up: its temporary files go to the test's folder.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.time() + 600
    while "epoch 2 of 5" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None and time.time() < deadline, "QAT never reached epoch 2"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and the job, as a node failure would
    proc.wait()
    assert list((run / "results/model/.backup/qat").glob("*/state.json")), "no epoch backup"
    assert snakemake(run, "--unlock").returncode == 0
    log.unlink()
    rerun = snakemake(run, "--rerun-incomplete", *target)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = log.read_text()
    assert "resuming after epoch 2 of 5" in resumed
    assert "epoch 1 of 5" not in resumed and "epoch 5 of 5" in resumed
    history = pd.read_csv(run / "results/model/qat_history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3, 4, 5]  # epoch 0: the starting weights
    resumed_weights = _weights(run / "results/model/qat.keras")

    uninterrupted = snakemake(run, "--forcerun", "qat", *target)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    reference = pd.read_csv(run / "results/model/qat_history.csv")
    assert history["selected"].tolist() == reference["selected"].tolist()
    pd.testing.assert_frame_equal(history, reference)
    for a, b in zip(resumed_weights, _weights(run / "results/model/qat.keras"), strict=True):
        np.testing.assert_array_equal(a, b)


def _weights(path):
    import keras

    return keras.saving.load_model(path, compile=False).get_weights()


SHARED_CHECKPOINT = ROOT.parent / "shared/birdnet_stm32n6_100/birdnet_stm32n6_100.keras"


@pytest.mark.skipif(not SHARED_CHECKPOINT.is_file(), reason="no shared checkpoint")
def test_birdnet_checkpoint_through_qat_conversion_and_host_check(tmp_path):
    """The real 100-species checkpoint, demo classes through head replacement."""
    model = json.dumps({"pretrained": str(SHARED_CHECKPOINT), "replace_head": True})
    result = snakemake(
        tmp_path, "results/model_qat_int8.tflite", "results/npu/qat_host_check.json",
        "--config", f"model={model}", 'qat={"epochs": 1}',
    )
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((tmp_path / "results/model/pretrained.json").read_text())
    assert info["head_replaced"] and len(info["model_labels"]) == 100
    assert np.load(tmp_path / "results/features/train.npy", mmap_mode="r").shape[1:] == (
        257, 256, 1,
    )
    check = json.loads((tmp_path / "results/npu/qat_host_check.json").read_text())
    assert check["clean"] and check["error_count"] == 0
    report = json.loads((tmp_path / "results/convert/qat.json").read_text())
    assert report["gate"]["passed"]
