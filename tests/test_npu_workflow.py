"""The NPU stage's rules run by Snakemake in a temporary folder, fed with converted models.

The upstream stages are not run: the folder gets `results/model_{ptq,qat}_int8.tflite`
and their validation .npz directly, and a small Snakefile includes only `common.smk` and
`npu.smk`. `tests/stand_in/stedgeai` (a stand-in, not ST's tool) plays stedgeai when its
folder is on PATH.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from n6qat.convert import convert_int8
from n6qat.features import FeatureSettings
from n6qat.validation_npz import save_validation_npz

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests/config/tiny.yaml"
STAND_IN_DIR = ROOT / "tests/stand_in"
SMALL = FeatureSettings(sample_rate=8000, chunk_duration=1.0, n_fft=128, spec_width=32, n_mels=16)
BOARD_CONFIG = """\
stedgeai:
  board: true
  extra_flags: "--seed 3 -O 'ram'"
"""

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """PTQ-like (per-channel) and QAT-like (per-tensor) INT8 DS-CNNs with validation data."""
    from n6qat.model import build_dscnn

    model = build_dscnn(SMALL, n_classes=3, width=0.5, depth=2)
    x = np.random.default_rng(0).random((10, *SMALL.input_shape), dtype=np.float32)
    reference = model.predict(x, verbose=0)
    return {
        "ptq": (convert_int8(model, x[:8]), x, reference),
        "qat": (convert_int8(model, x[:8], per_channel=False), x, reference),
    }


def workdir_with_models(tmp_path: Path, models: dict) -> Path:
    results = tmp_path / "results"
    results.mkdir(parents=True)
    for name, (tflite, x, reference) in models.items():
        (results / f"model_{name}_int8.tflite").write_bytes(tflite)
        save_validation_npz(results / f"model_{name}_int8_validation.npz", x, reference)
    (tmp_path / "Snakefile").write_text(
        f'include: "{ROOT}/workflow/rules/common.smk"\ninclude: "{ROOT}/workflow/rules/npu.smk"\n'
    )
    (tmp_path / "board.yaml").write_text(BOARD_CONFIG)
    return tmp_path


def path_without_stedgeai() -> str:
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in entries if d and not (Path(d) / "stedgeai").exists())


def snakemake(workdir: Path, *args: str, stand_in: bool, board: bool = False):
    path = path_without_stedgeai()
    if stand_in:
        path = os.pathsep.join([str(STAND_IN_DIR), path])
    configs = [str(TINY)] + ([str(workdir / "board.yaml")] if board else [])
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(workdir / "Snakefile"),
        "--directory", str(workdir), "--configfile", *configs, "--cores", "2", *args,
    ]  # fmt: skip
    env = {**os.environ, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def with_stand_in(tmp_path_factory, models):
    workdir = workdir_with_models(tmp_path_factory.mktemp("npu_stand_in"), models)
    done = snakemake(workdir, "results/npu/summary.json", stand_in=True, board=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_host_checks_pass_and_report(with_stand_in):
    for name in ("ptq", "qat"):
        host = read_json(with_stand_in / f"results/npu/{name}_host_check.json")
        assert host["clean"] and host["metrics"]["HOST int8 vs float"]["cos"] > 0.9
        text = (with_stand_in / f"results/npu/{name}_host_check.txt").read_text()
        assert "verdict: N6-clean" in text
    qat = read_json(with_stand_in / "results/npu/qat_host_check.json")
    assert any("per-tensor" in f["message"] for f in qat["findings"])  # convert.per_channel off


def test_stedgeai_command_lines_and_folders(with_stand_in):
    base = with_stand_in / "results/npu/stedgeai/ptq"
    for step in ("analyze", "generate", "validate"):
        argv = read_json(base / step / "output/stand_in_argv.json")["argv"]
        assert argv[:2] == [step, "--model"]
        assert argv[2] == str((with_stand_in / "results/model_ptq_int8.tflite").resolve())
        assert argv[argv.index("--output") + 1] == str((base / step / "output").resolve())
        assert argv[argv.index("--workspace") + 1] == str((base / step / "workspace").resolve())
        assert argv[-3:] == ["3", "-O", "ram"]  # extra flags split, quotes removed
        assert (with_stand_in / f"logs/npu/ptq_stedgeai_{step}.log").is_file()
    argv = read_json(base / "validate/output/stand_in_argv.json")["argv"]
    assert argv[argv.index("--mode") : argv.index("--mode") + 4] == [
        "--mode",
        "target",
        "-d",
        "serial:921600",
    ]
    assert "--classifier" in argv
    valinput = Path(argv[argv.index("--valinput") + 1])
    assert valinput == (base / "validate/data/valinput.npy").resolve()
    assert np.load(valinput).shape == (10, *SMALL.input_shape)


def test_reports_are_parsed_end_to_end(with_stand_in):
    report = read_json(with_stand_in / "results/npu/ptq_stedgeai.json")
    assert report["available"] and report["version"] == "3.0.0-20426 123672867"
    assert set(report["steps"]) == {"analyze", "generate", "validate"}
    head = report["headline"]
    tflite = with_stand_in / "results/model_ptq_int8.tflite"
    assert head["weights_bytes"] == tflite.stat().st_size and head["macc"] == 82656
    assert [r["row"] for r in head["validation"]] == [
        "TARGET c-model #1",
        "original model #1",
        "X-cross #1",
    ]
    assert head["validation"][1]["acc"] is None
    assert report["c_info"]["memory_footprint"]["activations"] == 10400


def test_summary_compares_host_and_tool(with_stand_in):
    summary = read_json(with_stand_in / "results/npu/summary.json")
    assert summary["stedgeai_available"] is True and set(summary["models"]) == {"ptq", "qat"}
    ptq = summary["models"]["ptq"]
    host = read_json(with_stand_in / "results/npu/ptq_host_check.json")
    assert ptq["comparison"]["macc"]["host"] == host["macc"]
    assert ptq["comparison"]["macc"]["stedgeai"] == 82656
    assert ptq["comparison"]["activations_bytes"]["stedgeai_over_host"] == pytest.approx(
        10400 / host["memory"]["peak_activation_bytes"]
    )
    assert ptq["host"]["cpu_ops"] == ["0 QUANTIZE", "20 DEQUANTIZE"]
    assert ptq["stedgeai"]["software_ops"] == ["Quantize", "Dequantize"]


def test_second_run_has_nothing_to_do(with_stand_in):
    done = snakemake(with_stand_in, "-n", "results/npu/summary.json", stand_in=True, board=True)
    assert done.returncode == 0 and "Nothing to be done" in done.stdout + done.stderr


def test_without_stedgeai_only_the_host_check_runs(tmp_path, models):
    workdir = workdir_with_models(tmp_path, {"ptq": models["ptq"]})
    target = "results/npu/ptq_stedgeai.json"
    done = snakemake(workdir, target, "results/npu/ptq_host_check.json", stand_in=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "only the host check ran" in done.stderr
    report = read_json(workdir / target)
    assert report["available"] is False and report["looked_in"][0].startswith("PATH: ")
    assert not (workdir / "results/npu/stedgeai/ptq/analyze/output").exists()
    assert read_json(workdir / "results/npu/ptq_host_check.json")["clean"]


def test_the_jobs_do_not_depend_on_the_tool(tmp_path, models):
    workdir = workdir_with_models(tmp_path, models)
    plans = [
        snakemake(workdir, "-n", "results/npu/summary.json", stand_in=found).stdout
        for found in (True, False)
    ]
    stats = [plan[plan.index("Job stats") : plan.index("total")] for plan in plans]
    # two models x (analyze, generate): validate needs a board, none is configured
    assert stats[0] == stats[1] and re.search(r"^npu_stedgeai +4$", stats[0], re.MULTILINE)


def test_required_but_missing_fails_saying_where_it_looked(tmp_path, models):
    workdir = workdir_with_models(tmp_path, {"ptq": models["ptq"]})
    done = snakemake(
        workdir,
        "results/npu/stedgeai/ptq/analyze",
        "--config",
        'stedgeai={"required": true}',
        stand_in=False,
    )
    assert done.returncode != 0
    assert "stedgeai was not found (looked in PATH:" in done.stderr
    assert "stedgeai.required is true" in done.stderr
