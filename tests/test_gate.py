"""The INT8 gate: fidelity to the simulation, and losses in points against FP32 and PTQ."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from n6qat.errors import N6QATError
from n6qat.gate import (
    GateSettings,
    failures,
    gate_candidate,
    gate_checks,
    gate_table,
    quality,
)

LABELS = ["a", "b"]


def _chunks(n_files: int = 10) -> pd.DataFrame:
    """Two chunks per file; files alternate between class a and class b."""
    files = np.repeat(np.arange(n_files), 2)
    return pd.DataFrame({
        "source": "val", "path": [f"f{i}.wav" for i in files],
        "label_index": files % 2, "row": np.arange(2 * n_files),
    })


def _scores(correct_files: int, n_files: int = 10) -> np.ndarray:
    """Scores whose top-1 is right for the first ``correct_files`` files."""
    labels = np.repeat(np.arange(n_files) % 2, 2)
    right = np.repeat(np.arange(n_files) < correct_files, 2)
    top = np.where(right, labels, 1 - labels)
    scores = np.full((2 * n_files, 2), 0.1, np.float32)
    scores[np.arange(2 * n_files), top] = 0.9
    return scores


def test_quality_is_in_points_against_fp32():
    measured = quality(_scores(8), _scores(10), _chunks(), LABELS)
    assert measured["fp32"]["file_top1"] == 1.0 and measured["int8"]["file_top1"] == 0.8
    assert measured["loss_vs_fp32_points"]["file_top1"] == pytest.approx(20.0)
    assert measured["file_top1_agreement"] == pytest.approx(0.8)
    assert measured["int8"]["files"] == 10 and measured["labelled_files"] == 10


def test_the_gate_fails_on_each_limit_with_what_was_measured():
    settings = GateSettings(min_simulation_cosine=0.99, max_loss_vs_fp32=3.0,
                            max_loss_vs_ptq=1.0, metrics=("file_top1",))
    fp32 = _scores(10)
    ptq = quality(_scores(10), fp32, _chunks(), LABELS)
    qat = quality(_scores(9), fp32, _chunks(), LABELS)
    fidelity = {"cosine": 0.98, "top1_agreement": 0.9, "samples": 20}
    checks = gate_checks("qat", fidelity, qat, settings, ptq=ptq)
    assert [c["check"] for c in checks] == [
        "simulation_fidelity", "file_top1_loss_vs_fp32", "file_top1_loss_vs_ptq",
    ]
    assert not any(c["passed"] for c in checks)
    messages = failures(checks)
    assert "cosine 0.9800 on 20 validation chunks" in messages[0] and "bug" in messages[0]
    assert "loses 10.0 points of file-level top-1 to the FP32 reference" in messages[1]
    assert "(100.0 -> 90.0, top-1 over the 10 labelled of 10 files: one file is 10.00 points)" \
        in messages[1]
    assert "more than convert.max_loss_vs_fp32=3" in messages[1]
    assert "to the PTQ-INT8 baseline" in messages[2] and "max_loss_vs_ptq=1" in messages[2]


def test_a_top1_loss_names_the_labelled_files_it_counts():
    chunks = _chunks()
    chunks.loc[chunks["path"].isin(["f8.wav", "f9.wav"]), "label_index"] = -1  # two negatives
    fp32, int8 = _scores(10), _scores(7)
    settings = GateSettings(min_simulation_cosine=0.99, max_loss_vs_fp32=3.0,
                            max_loss_vs_ptq=1.0, metrics=("file_top1", "file_cmap"))
    measured = quality(int8, fp32, chunks, LABELS)
    assert measured["labelled_files"] == 8 and measured["int8"]["files"] == 10
    top1, cmap = failures(gate_checks("ptq", None, measured, settings))
    assert "(100.0 -> 87.5, top-1 over the 8 labelled of 10 files: one file is 12.50 points)" \
        in top1
    assert "10 files), more than" in cmap and "labelled" not in cmap


def test_the_gate_passes_within_its_limits_and_a_gain_is_a_negative_loss():
    settings = GateSettings(metrics=("file_top1", "file_cmap"))
    fp32 = _scores(10)
    ptq = quality(_scores(8), fp32, _chunks(), LABELS)
    qat = quality(_scores(10), fp32, _chunks(), LABELS)
    checks = gate_checks("qat", {"cosine": 0.999, "top1_agreement": 1.0, "samples": 20},
                         qat, settings, ptq=ptq)
    assert all(c["passed"] for c in checks) and failures(checks) == []
    vs_ptq = next(c for c in checks if c["check"] == "file_top1_loss_vs_ptq")
    assert vs_ptq["measured"] == pytest.approx(-20.0)


def test_gate_table_has_one_column_per_model():
    fp32 = _scores(10)
    reports = {}
    for name, correct in (("ptq", 8), ("qat", 9)):
        measured = quality(_scores(correct), fp32, _chunks(), LABELS)
        checks = gate_checks(name, {"cosine": 0.995, "top1_agreement": 1.0, "samples": 20},
                             measured, GateSettings())
        reports[name] = {
            "quality": measured, "simulation_fidelity": {"cosine": 0.995},
            "agreement": {"cosine": 0.97}, "host_runtime_spread": {"cosine": 0.98},
            "gate": {"gated": name == "qat", "passed": not failures(checks), "checks": checks},
        }
    table = gate_table(reports)
    assert list(table.columns) == ["ptq", "qat"]
    assert table.loc["file-level top-1: loss vs FP32 (points)", "qat"] == pytest.approx(10.0)
    assert table.loc["output cosine, XNNPACK vs built-in kernels (diagnostic)", "ptq"] == 0.98
    assert table.loc["labelled validation files (file top-1 counts these)", "qat"] == 10


CONVERT = {"min_simulation_cosine": 0.99, "max_loss_vs_fp32": 3.0, "max_loss_vs_ptq": 1.0,
           "gate_metrics": ["file_top1"], "gate_models": ["qat"]}  # fmt: skip


def _candidate(folder, name, correct, cosine=0.999):
    """A conversion's outputs as convert_and_measure writes them: TFLite and report."""
    report = {
        "model": name, "size_bytes": 3,
        "simulation_fidelity": {"cosine": cosine, "top1_agreement": 1.0, "samples": 20},
        "quality": quality(_scores(correct), _scores(10), _chunks(), LABELS),
        "int8_problems": [],
    }  # fmt: skip
    tflite, path = folder / f"{name}_candidate.tflite", folder / f"{name}_candidate.json"
    tflite.write_bytes(name.encode())
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return tflite, path


def test_a_passing_candidate_is_published_with_the_verdict(tmp_path):
    ptq = gate_candidate(*_candidate(tmp_path, "ptq", 8), CONVERT,
                         tmp_path / "ptq.tflite", tmp_path / "ptq.json")  # fmt: skip
    qat = gate_candidate(*_candidate(tmp_path, "qat", 10), CONVERT,
                         tmp_path / "qat.tflite", tmp_path / "qat.json",
                         ptq_report=tmp_path / "ptq.json")  # fmt: skip
    assert (tmp_path / "qat.tflite").read_bytes() == b"qat"
    published = json.loads((tmp_path / "qat.json").read_text())
    assert published == json.loads(json.dumps(qat, default=float))
    assert list(published)[-2:] == ["gate", "int8_problems"]
    assert published["gate"]["gated"] and published["gate"]["passed"]
    assert [c["check"] for c in published["gate"]["checks"]] == [
        "simulation_fidelity", "file_top1_loss_vs_fp32", "file_top1_loss_vs_ptq",
    ]
    assert not ptq["gate"]["gated"] and not ptq["gate"]["passed"]  # 20 points below FP32


def test_a_gated_model_that_loses_to_ptq_is_not_published(tmp_path):
    gate_candidate(*_candidate(tmp_path, "ptq", 10), CONVERT,
                   tmp_path / "ptq.tflite", tmp_path / "ptq.json")  # fmt: skip
    with pytest.raises(N6QATError, match="loses 10.0 points of file-level top-1 to the PTQ"):
        gate_candidate(*_candidate(tmp_path, "qat", 9), CONVERT,
                       tmp_path / "qat.tflite", tmp_path / "qat.json",
                       ptq_report=tmp_path / "ptq.json")  # fmt: skip
    assert not (tmp_path / "qat.tflite").exists() and not (tmp_path / "qat.json").exists()
    assert (tmp_path / "qat_candidate.tflite").is_file()  # kept for a look at what failed


def test_an_ungated_model_is_published_with_its_failures_as_warnings(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="n6qat.gate"):
        report = gate_candidate(*_candidate(tmp_path, "ptq", 10, cosine=0.9), CONVERT,
                                tmp_path / "ptq.tflite", tmp_path / "ptq.json")  # fmt: skip
    assert (tmp_path / "ptq.tflite").is_file() and not report["gate"]["passed"]
    failed = report["gate"]["checks"][0]
    assert failed["check"] == "simulation_fidelity" and "cosine 0.9000" in failed["message"]
    assert "not gated: ptq is not in convert.gate_models" in caplog.text
