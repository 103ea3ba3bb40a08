"""Shared fixtures: one run of the real workflow on the tiny config, for every workflow test."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
TINY = ROOT / "tests/config/tiny.yaml"


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """The command line that runs the workflow in ``workdir`` on the tiny config."""
    return [
        sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE),
        "--directory", str(workdir), "--configfile", str(TINY), "--cores", "2", *args,
    ]  # fmt: skip


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the workflow in ``workdir`` on the tiny config; returns the finished process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        snakemake_command(workdir, *args), capture_output=True, text=True, env=env, timeout=1200
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A folder where the whole default DAG has run on the tiny config."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir
