"""Time the whole `make run` DAG of one or more commits, each in a fresh clone, side by side.

Every commit is cloned from this repository into its own temporary folder and runs the
default target as `make run` does (`snakemake --profile profiles/default`), on the demo
data it generates itself. The runs alternate between the commits (A B A B ... with
--repeat), so machine noise hits both alike. Each run imports the package of its own
clone (PYTHONPATH), with this environment's installed dependencies.

Printed: per rule, the median seconds over its jobs' Snakemake benchmark files (summed
over the jobs of the rule) for each commit; the DAG's wall time; and the ratio of every
commit to the first. Also the test-split file top-1 of FP32 and QAT-INT8, so that a
faster commit can be seen not to lose accuracy.

    python benchmarks/e2e.py 5ce4c79 HEAD --cores 2
    python benchmarks/e2e.py HEAD --repeat 2 --keep /tmp/e2e

Nothing in this repository changes; clones live under --keep or a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def clone(commit: str, folder: Path) -> str:
    """A fresh clone of this repository at ``commit``; returns the full hash."""
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(folder)], check=True)
    subprocess.run(["git", "-C", str(folder), "checkout", "--quiet", commit], check=True)
    return subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip


def run_dag(folder: Path, cores: int) -> float:
    """Run the default target in ``folder`` (as `make run`); wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(folder / "src")}
    cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/default", "--cores",
           str(cores)]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-30:])
        raise SystemExit(f"the DAG failed in {folder}:\n{tail}")
    return seconds


def rule_seconds(folder: Path) -> dict[str, float]:
    """Rule name -> seconds summed over its jobs, from benchmarks/runs/*.tsv.

    Each file is matched to its rule by the rules' `benchmark:` patterns; a file no
    literal pattern matches (the report rules, made in a loop) is named by its stem,
    which is its rule's name.
    """
    patterns = _benchmark_patterns(folder)
    times: dict[str, float] = defaultdict(float)
    for tsv in sorted((folder / "benchmarks/runs").glob("*.tsv")):
        relative = tsv.relative_to(folder).as_posix()
        rule = next((r for regex, r in patterns if regex.fullmatch(relative)), tsv.stem)
        times[rule] += float(pd.read_csv(tsv, sep="\t")["s"].sum())
    return dict(times)


def _benchmark_patterns(folder: Path) -> list[tuple[re.Pattern, str]]:
    """(regex of a rule's benchmark path, rule name), read from the rule files."""
    patterns = []
    for smk in sorted((folder / "workflow/rules").glob("*.smk")):
        rule, lines = None, smk.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("rule "):
                rule = line.split()[1].rstrip(":")
            elif line.strip() == "benchmark:" and rule and i + 1 < len(lines):
                literal = lines[i + 1].strip().rstrip(",")
                if literal[:1] in "\"'":
                    parts = re.split(r"\{[^}]+\}", literal.strip("\"'"))
                    patterns.append((re.compile("[^/]+".join(map(re.escape, parts))), rule))
    return patterns


def accuracy(folder: Path) -> dict[str, float]:
    summary = pd.read_csv(folder / "results/eval/summary.csv").set_index("model")
    return {
        model: float(summary.loc[model, "file_top1_accuracy"])
        for model in ("fp32", "qat_int8") if model in summary.index
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commits", nargs="+", help="commits to compare; the first is the base")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per commit, alternating")
    parser.add_argument("--keep", type=Path, help="keep the clones under this folder")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="n6qat_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    walls: dict[str, list[float]] = defaultdict(list)
    rules: dict[str, list[dict[str, float]]] = defaultdict(list)
    accuracies: dict[str, list[dict[str, float]]] = defaultdict(list)
    names = {}
    for repeat in range(args.repeat):
        for commit in args.commits:
            folder = work / f"{commit.replace('/', '_')}-{repeat}"
            names[commit] = clone(commit, folder)[:10]
            print(f"running {names[commit]} ({commit}) in {folder}", flush=True)
            walls[commit].append(run_dag(folder, args.cores))
            rules[commit].append(rule_seconds(folder))
            accuracies[commit].append(accuracy(folder))
            print(f"  {walls[commit][-1]:.0f} s", flush=True)

    base = args.commits[0]
    all_rules = sorted({r for runs in rules.values() for run in runs for r in run},
                       key=lambda r: -statistics.median(run.get(r, 0.0) for run in rules[base]))
    header = [names[c] for c in args.commits]
    print(f"\nmedian seconds over {args.repeat} run(s) per commit, {args.cores} cores\n")
    print("| rule | " + " | ".join(header) + " | " + " | ".join(
        f"{h} / {names[base]}" for h in header[1:]) + " |")  # fmt: skip
    print("|---" * (1 + 2 * len(header) - 1) + "|")

    def row(label: str, values: list[float]) -> str:
        ratios = [f"{v / values[0]:.2f}" if values[0] else "n/a" for v in values[1:]]
        return f"| {label} | " + " | ".join(f"{v:.0f}" for v in values) + (
            " | " + " | ".join(ratios) if ratios else "") + " |"  # fmt: skip

    for rule in all_rules:
        print(row(rule, [statistics.median(run.get(rule, 0.0) for run in rules[c])
                         for c in args.commits]))  # fmt: skip
    print(row("**DAG wall time**", [statistics.median(walls[c]) for c in args.commits]))
    print()
    for commit in args.commits:
        for i, acc in enumerate(accuracies[commit]):
            shown = ", ".join(f"{k} {100 * v:.1f} %" for k, v in acc.items())
            print(f"{names[commit]} run {i}: test file top-1 {shown}")
    print(f"\nclones: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
