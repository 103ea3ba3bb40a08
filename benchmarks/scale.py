"""How indexing and feature extraction scale with the number of files: time and peak memory.

For each size (default 1k, 10k and 50k files) this writes a class-per-folder tree of short
WAV files (--seconds long, 10 classes, noise plus a class tone; one chunk each), then runs
the two stages as the workflow's rules do, each in its own process:

- index: ``n6qat.dataset.index_tree`` over the tree (headers, content hashes);
- features: ``n6qat.features.extract_features`` of every file into the float16 memmap,
  with the config's feature settings and --workers processes.

Printed per size and stage: seconds, milliseconds per file, and peak RSS (the stage's
process, and its largest worker). Then the growth from the smallest to the largest size:
time per file should stay flat (linear time) and peak RSS should not grow with the
dataset (features are streamed into the memmap; no full-dataset array is held).

    python benchmarks/scale.py
    python benchmarks/scale.py --sizes 1000 5000 --workers 2 --keep /tmp/scale

Everything is written under --keep or a temporary folder; nothing in the repository
changes. The 50k tree takes about 1.6 GB and its features about 3.3 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10
SAMPLE_RATE = 16000


def write_tree(root: Path, n_files: int, seconds: float) -> None:
    """``n_files`` short WAVs over ``CLASSES`` folders (reused when already complete)."""
    import soundfile as sf

    done = root.with_name(f"{root.name}.complete")
    if done.is_file() and done.read_text() == f"{n_files} {seconds}":
        return
    rng = np.random.default_rng(n_files)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    for index in range(n_files):
        label = f"class_{index % CLASSES:02d}"
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        tone = 0.3 * np.sin(2 * np.pi * (500 + 300 * (index % CLASSES)) * t)
        signal = (tone + rng.normal(0, 0.05, t.size)).astype(np.float32)
        sf.write(folder / f"f{index:06d}.wav", signal, SAMPLE_RATE, subtype="PCM_16")
    done.write_text(f"{n_files} {seconds}")


def feature_settings() -> dict:
    """The default config's feature settings, as the workflow resolves them."""
    from selection_rules import resolved_config

    return resolved_config(ROOT / "config/config.yaml", seed=0)["features"]


def stage(name: str, tree: Path, out: Path, workers: int) -> dict:
    """Run one stage in this process; return its time and peak RSS (self and workers)."""
    from n6qat.dataset import index_tree, read_table

    started = time.perf_counter()
    if name == "index":
        files, rejected = index_tree(tree, "train", negatives=[], min_duration=0.1,
                                     show_progress=False)
        if len(rejected):
            raise SystemExit(f"{len(rejected)} files rejected: {rejected.head()}")
        files.to_csv(out / "files.csv", index=False)
    else:
        from n6qat.features import FeatureSettings, extract_features

        files = read_table(out / "files.csv")
        labels = sorted(files["label"].unique())
        extract_features(
            files, {"train": tree}, labels, FeatureSettings.from_dict(feature_settings()),
            out / "features.npy", out / "chunks.csv", workers=workers,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def run_stage(name: str, tree: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--tree", str(tree), "--out", str(out),
           "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} on {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of every file")
    parser.add_argument("--workers", type=int, default=2, help="feature worker processes")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep")
    parser.add_argument("--stage", choices=["index", "features"], help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:  # the child process of run_stage
        print(json.dumps(stage(args.stage, args.tree, args.out, args.workers)))
        return 0

    with tempfile.TemporaryDirectory(prefix="n6qat_scale_") as scratch:
        work = args.keep or Path(scratch)
        rows = []
        for size in args.sizes:
            tree, out = work / f"tree-{size}", work / f"out-{size}"
            out.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            write_tree(tree, size, args.seconds)
            print(f"{size} files: tree ready in {time.perf_counter() - started:.0f} s", flush=True)
            for name in ("index", "features"):
                found = run_stage(name, tree, out, args.workers)
                rows.append({"files": size, "stage": name, **found,
                             "ms_per_file": 1000 * found["seconds"] / size})
                print(f"  {name}: {found['seconds']:.1f} s, "
                      f"{rows[-1]['ms_per_file']:.2f} ms/file, "
                      f"peak RSS {found['rss_mb']:.0f} MB "
                      f"(workers {found['worker_rss_mb']:.0f} MB)", flush=True)
            (out / "features.npy").unlink(missing_ok=True)  # GBs: keep the disk free
        table = pd.DataFrame(rows)
        print()
        print(table.round(2).to_markdown(index=False))
        small, large = min(args.sizes), max(args.sizes)
        print(f"\ngrowth from {small} to {large} files ({large / small:.0f}x the files):")
        for name, group in table.groupby("stage", sort=False):
            first = group[group["files"] == small].iloc[0]
            last = group[group["files"] == large].iloc[0]
            workers = (f", worker peak RSS x{last['worker_rss_mb'] / first['worker_rss_mb']:.2f}"
                       if first["worker_rss_mb"] > 0 else "")
            print(f"  {name}: time per file x{last['ms_per_file'] / first['ms_per_file']:.2f}, "
                  f"peak RSS x{last['rss_mb'] / first['rss_mb']:.2f}{workers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
