"""The workflow on a real one-node SLURM cluster: tests/slurm/run_slurm_test.sh.

It takes several minutes and starts daemons, so it runs only when asked for
(N6QAT_SLURM_TEST=1) and as root; SLURM and munge are installed with apt-get when missing.
Otherwise it is skipped.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests/slurm/run_slurm_test.sh"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")

pytestmark = [pytest.mark.slow, pytest.mark.workflow]


def skip_reason() -> str | None:
    if os.environ.get("N6QAT_SLURM_TEST") != "1":
        return "set N6QAT_SLURM_TEST=1 to run the SLURM test (several minutes)"
    if os.geteuid() != 0:
        return "the SLURM test starts slurmd and needs root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing and shutil.which("apt-get") is None:
        return f"SLURM not installed (no {', '.join(missing)}) and no apt-get to install it"
    return None


@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_workflow_on_slurm():
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=3600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "SLURM test passed" in result.stdout
    assert "resumed at epoch" in result.stdout
    print(result.stdout)
