"""Interruptions anywhere: the tiny workflow hard-killed at 20 random moments across the DAG.

One chain of runs in one folder: a run is started, SIGKILLed (Snakemake and its jobs, as a
lost node would be) at a random moment while a job of the stage under test runs, unlocked
and started again with --rerun-incomplete, 20 times: pretraining, QAT, conversion,
evaluation and report jobs, 4 kills each. After every kill no output is visible under its
final name unless it is complete; the last run ends with the same bytes as an uninterrupted
run. Slow (about 10 minutes on 2 cores): `pytest -m slow tests/test_kill_anywhere.py`.
"""

import json
import os
import random
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import snakemake, snakemake_command

pytestmark = [pytest.mark.slow, pytest.mark.workflow]

# stage: (rules whose jobs the kill lands in, the benchmark files that time them)
STAGES = {
    "pretrain": (("pretrain",), "pretrain.tsv"),
    "qat": (("qat",), "qat.tsv"),
    "conversion": (("convert_int8", "gate_int8"), "convert_*.tsv"),
    "evaluation": (("evaluate_model", "evaluate_summary"), "evaluate_*.tsv"),
    "report": (("report_",), "report_*.tsv"),
}
KILLS_PER_STAGE = 4
# Deterministic (same config, seeds, machine, threads): compared byte for byte.
EXACT = [
    "results/index/files.csv", "results/index/labels.txt", "results/index/rejected.csv",
    "results/index/split.csv", "results/index/train_upsampled.csv",
    "results/index/class_counts.csv",
    *(f"results/features/{split}{end}" for split in ("train", "val", "test")
      for end in (".npy", "_chunks.csv")),
    "results/model/fp32_trained.keras", "results/model/pretrain_history.csv",
    "results/model/pretrained.keras", "results/model/pretrained.json",
    "results/model/qat.keras", "results/model/qat_history.csv",
    *(f"results/model_{m}_int8{e}" for m in ("ptq", "qat") for e in (".tflite", "_validation.npz")),
    *(f"results/convert/{m}{e}" for m in ("ptq", "qat")
      for e in ("_candidate.tflite", "_candidate.json", ".json", "_layers.csv",
                "_weight_sqnr.csv")),
]  # fmt: skip
JOB_START = re.compile(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    jobid: (\d+)$", re.MULTILINE)
JOB_END = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)", re.MULTILINE)


def running_rules(text: str) -> set[str]:
    """Rules of the jobs a run's output shows started and not finished."""
    started = {jobid: rule for rule, jobid in JOB_START.findall(text)}
    for jobid, _ in JOB_END.findall(text):
        started.pop(jobid, None)
    return set(started.values())


def in_stage(rule: str, stage: str) -> bool:
    return rule.startswith(STAGES[stage][0])


def stage_seconds(reference: Path, stage: str) -> float:
    """The shortest job of the stage in the uninterrupted run, in seconds."""
    files = (reference / "benchmarks/runs").glob(STAGES[stage][1])
    return min(float(pd.read_csv(f, sep="\t")["s"].iloc[0]) for f in files)


def is_complete(path: Path) -> bool:
    """Whether a file left under an output's name reads whole in its format."""
    try:
        if path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npy":
            np.asarray(np.load(path, mmap_mode="r")).sum()
        elif path.suffix == ".npz":
            with np.load(path) as data:
                for key in data.files:
                    data[key].sum()
        elif path.suffix == ".keras":
            return zipfile.ZipFile(path).testzip() is None
        elif path.suffix == ".png":
            return path.read_bytes().endswith(b"IEND\xaeB`\x82")
        elif path.suffix == ".html":
            return path.read_text().rstrip().endswith("</html>")
        elif path.suffix == ".tflite":
            from n6qat.tflite_inspect import read_tflite

            read_tflite(path)
        else:
            return path.stat().st_size > 0 or path.suffix == ".txt"
    except Exception:  # any failure to read it means it is not complete
        return False
    return True


def outputs(workdir: Path) -> list[Path]:
    """Every file under results/ under its final name (not temporaries, not epoch backups)."""
    return [
        p for p in (workdir / "results").rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(workdir).parts)
    ]  # fmt: skip


def run_until_killed(workdir: Path, stage: str, delay_range: float, rng: random.Random) -> str:
    """Start the workflow, SIGKILL it at a random moment after a job of `stage` starts;
    return the rules that were running."""
    log = workdir.parent / f"round_{time.monotonic_ns()}.log"
    # A killed job cleans nothing up: its temporary files (AutoGraph's sources, a scoring
    # worker's folder) go to a folder of the test, not to the system's.
    scratch = workdir.parent / "tmp"
    scratch.mkdir(exist_ok=True)
    with log.open("w") as stream:
        proc = subprocess.Popen(
            snakemake_command(workdir, "--rerun-incomplete"), stdout=stream,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(scratch)},
        )  # fmt: skip
    deadline = time.time() + 900
    while not any(in_stage(rule, stage) for rule in running_rules(log.read_text())):
        ended = proc.poll() is not None
        assert not ended, f"the run ended before a {stage} job:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {stage} job started"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, delay_range))
    running = running_rules(log.read_text())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return running


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    # Not conftest's tiny_run: other tests rerun parts of that folder with other configs.
    workdir = tmp_path_factory.mktemp("uninterrupted")
    done = snakemake(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_twenty_hard_kills_anywhere_end_with_the_uninterrupted_bytes(reference, tmp_path):
    rng = random.Random(int(os.environ.get("N6QAT_KILL_SEED", "12")))
    workdir = tmp_path / "killed"
    hits = []
    for stage in STAGES:
        delay_range = 0.8 * stage_seconds(reference, stage)
        for _ in range(KILLS_PER_STAGE):
            running = run_until_killed(workdir, stage, delay_range, rng)
            hits.append((stage, sorted(running)))
            for path in outputs(workdir):
                relative = str(path.relative_to(workdir))
                if relative in EXACT:
                    same = path.read_bytes() == (reference / relative).read_bytes()
                    assert same, f"after a kill in {running}: {relative} differs or is partial"
                else:
                    assert is_complete(path), f"after a kill in {running}: {relative} is partial"
            unlock = snakemake(workdir, "--unlock")
            assert unlock.returncode == 0, unlock.stderr[-2000:]
    assert len(hits) == len(STAGES) * KILLS_PER_STAGE == 20
    for stage, running in hits:  # each kill landed while a job of its stage ran
        assert any(in_stage(rule, stage) for rule in running), (stage, running)
    final = snakemake(workdir, "--rerun-incomplete")
    assert final.returncode == 0, final.stderr[-4000:]
    for relative in EXACT:
        same = (workdir / relative).read_bytes() == (reference / relative).read_bytes()
        assert same, f"{relative} differs from the uninterrupted run"
    assert {str(p.relative_to(workdir)) for p in outputs(workdir)} == {
        str(p.relative_to(reference)) for p in outputs(reference)
    }
    assert all(is_complete(p) for p in outputs(workdir))
    assert "Nothing to be done" in "".join(
        (done := snakemake(workdir, "-n")).stdout + done.stderr
    )
