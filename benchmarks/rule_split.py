"""Where the time of the training rules goes: train epochs, INT8 scoring and the rest.

Reads finished runs (a workflow folder each, e.g. the clones `e2e.py --keep` leaves):
the rule's wall time from its Snakemake benchmark file and, from its log, the seconds
of every epoch's ``fit`` (train steps plus Keras validation) and of every INT8 scoring
(QAT: the epoch's TFLite conversion and the simulation, epoch 0 included). The rest is
process start, loading, twin building, calibration, range refresh and saving.

    python benchmarks/rule_split.py /tmp/e2e/HEAD-0 /tmp/e2e/HEAD-1

Logs from before the scoring time was logged show the scoring as part of the rest. Since
the TFLite scoring runs in a worker process (c74036c), the logged scoring time is what the
training process spends on it: the simulation's scoring and any wait for the worker.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import rule_seconds  # noqa: E402 (the same benchmark files e2e.py reads)

RULES = ("pretrain", "qat")
EPOCH = re.compile(r"epoch \d+ of \d+ \((?P<fit>[\d.]+) s(?:, scoring (?P<score>[\d.]+) s)?\)")
EPOCH_0 = re.compile(r"epoch 0 \(before training; scoring (?P<score>[\d.]+) s\)")


def split(folder: Path, rule: str) -> dict[str, float] | None:
    """Wall, fit and scoring seconds of one rule in one run (None if it did not run)."""
    wall, log = rule_seconds(folder).get(rule), folder / f"logs/{rule}.log"
    if wall is None or not log.exists():
        return None
    fit = score = 0.0
    for line in log.read_text().splitlines():
        if found := EPOCH.search(line):
            fit += float(found["fit"])
            score += float(found["score"] or 0.0)
        elif found := EPOCH_0.search(line):
            score += float(found["score"])
    return {"wall": wall, "fit": fit, "scoring": score}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished workflow folders")
    args = parser.parse_args(argv)
    print("| run | rule | wall s | fit s | INT8 scoring s | rest s | outside fit | rest only |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in args.runs:
        for rule in RULES:
            found = split(folder, rule)
            if found is None:
                continue
            rest = found["wall"] - found["fit"] - found["scoring"]
            print(
                f"| {folder.name} | {rule} | {found['wall']:.0f} | {found['fit']:.0f} | "
                f"{found['scoring']:.0f} | {rest:.0f} | "
                f"{100 * (1 - found['fit'] / found['wall']):.0f} % | "
                f"{100 * rest / found['wall']:.0f} % |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
