"""Checks for tests/slurm/run_slurm_test.sh, run with the test cluster's SLURM_CONF set.

preempt-qat   wait for QAT's first finished epoch, then preempt its SLURM job
verify        SLURM's job records and logs; outputs against the local run's
gpu-profile   a copy of the SLURM profile with the GPU switched on for QAT
verify-gpu    the QAT job of that run was given a GPU by SLURM
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

TRAINING_RULES = ("pretrain", "prepare_pretrained", "qat")
# Bit-identical from run to run on one host with the same thread counts (checked by
# running the tiny workflow twice); the QAT branch is not, and is compared by structure.
EXACT_OUTPUTS = (
    "resources/demo/manifest.csv",
    "results/index/files.csv",
    "results/index/labels.txt",
    "results/index/rejected.csv",
    "results/index/split.csv",
    "results/index/train_upsampled.csv",
    "results/index/class_counts.csv",
    *(
        f"results/features/{split}{ext}"
        for split in ("train", "val", "test")
        for ext in (".npy", "_chunks.csv")
    ),
    "results/model/pretrain_history.csv",
    "results/model/pretrained.json",
    "results/model_ptq_int8.tflite",
    "results/model_ptq_int8_validation.npz",
)
SAME_WEIGHTS = ("results/model/fp32_trained.keras", "results/model/pretrained.keras")
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")
EPOCH = re.compile(r"n6qat\.fit: epoch (\d+) of (\d+) ")  # one line per finished epoch


class CheckFailed(Exception):
    """A check did not hold; the message says which and what was seen."""


# ------------------------------------------------------------------------- SLURM


def slurm_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld remembers (finished ones for MinJobAge), as its key=value fields."""
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, check=True
    ).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def rule_of(record: dict[str, str]) -> str:
    """The rule a job ran, from the comment the plugin gives it (rule_<name>[_wildcards_..])."""
    match = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", record.get("Comment", ""))
    return match.group(1) if match else "?"


def minutes(limit: str) -> int:
    """SLURM's [D-]HH:MM:SS time limit in minutes."""
    days, _, clock = limit.rpartition("-")
    h, m, s = (int(part) for part in clock.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def wait_for(what: str, condition, timeout: float, step: float = 0.2):
    """Poll `condition` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(step)
    raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}")


# ------------------------------------------------------------------- preemption


def finished_epochs(backup: Path) -> int:
    """Epochs QAT has backed up so far (its state file under results/model/.backup)."""
    for state in backup.glob("*/state.json"):
        try:
            return int(json.loads(state.read_text())["epochs_done"])
        except (OSError, ValueError, KeyError):
            return 0
    return 0


def qat_epochs(overlay: Path) -> int:
    """QAT's epochs in the test's config overlay."""
    return int(yaml.safe_load(overlay.read_text())["qat"]["epochs"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def preempt_qat(workdir: Path, epochs: int, cpus: int, watch_pid: int, timeout: float) -> str:
    """Preempt the running QAT job with an urgent job that needs every CPU of the node.

    SLURM requeues the QAT job (it was submitted with --requeue) and it starts again after
    the urgent job; the requeue delay SLURM adds is lifted so the test does not wait 2 min.
    """
    backup = workdir / "results/model/.backup/qat"

    def first_epoch_done():
        if not alive(watch_pid):
            raise CheckFailed("snakemake ended before QAT finished an epoch")
        return finished_epochs(backup) >= 1

    wait_for("QAT's first epoch", first_epoch_done, timeout)
    qat = [i for i, r in slurm_jobs().items() if rule_of(r) == "qat" and r["JobState"] == "RUNNING"]
    if len(qat) != 1:
        raise CheckFailed(f"expected one running QAT job in SLURM, found {qat}")
    (qat,) = qat
    done = finished_epochs(backup)
    if done >= epochs:
        raise CheckFailed(f"QAT finished all {epochs} epochs before the test could preempt it")
    urgent = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition=urgent",
            "--job-name=n6qat-preemptor",
            f"--cpus-per-task={cpus}",
            "--mem=100",
            "--time=2",
            f"--output={workdir / 'logs/slurm-preemptor-%j.out'}",  # not the current folder
            "--wrap=sleep 2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    def requeued():
        record = slurm_jobs()[qat]
        if record["JobState"] == "COMPLETED":
            raise CheckFailed(
                f"QAT job {qat} finished before SLURM preempted it: raise qat.epochs in "
                "tests/slurm/preemptible.yaml"
            )
        if record["JobState"] in ("CANCELLED", "FAILED"):
            raise CheckFailed(
                f"QAT job {qat} ended {record['JobState']} instead of being requeued "
                f"(Requeue={record.get('Requeue')}; is slurm-requeue on in the profile?)"
            )
        return int(record.get("Restarts", 0)) >= 1

    wait_for(f"SLURM to requeue QAT job {qat}", requeued, 60)
    at = finished_epochs(backup)
    wait_for(
        f"the urgent job {urgent}", lambda: slurm_jobs()[urgent]["JobState"] == "COMPLETED", 60
    )
    subprocess.run(["scontrol", "update", f"JobId={qat}", "StartTime=now"], check=False)
    return (
        f"urgent job {urgent} (submitted after QAT epoch {done}/{epochs}) preempted QAT "
        f"(SLURM job {qat}) after epoch {at}/{epochs}; SLURM requeued it"
    )


# ----------------------------------------------------------------------- verify


def job_stats(log_text: str) -> Counter:
    """The jobs Snakemake planned, from the first 'Job stats' table of its log."""
    table = log_text.split("Job stats:", 1)[1].strip().splitlines()[2:]
    counts = Counter()
    for line in table:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def check_jobs(log_text: str, profile: dict, epochs: int, slurm_dir: Path) -> list[str]:
    """Every planned job (but the local target rule) went through sbatch and completed."""
    run_id = re.search(r"SLURM run ID: (\S+)", log_text)
    if not run_id:
        raise CheckFailed("no 'SLURM run ID' in the log: was the slurm executor used?")
    planned = job_stats(log_text)
    local = set(re.findall(r"^localrule (\w+):", log_text, re.MULTILINE))
    if local - {"all"}:
        raise CheckFailed(f"rules ran on the submit host instead of SLURM: {local - {'all'}}")
    planned.pop("all", None)
    submitted = SUBMITTED.findall(log_text)
    records = {i: r for i, r in slurm_jobs().items() if r.get("JobName") == run_id.group(1)}
    ids = [slurm_id for _, slurm_id, _ in submitted]
    if sorted(ids) != sorted(records):
        raise CheckFailed(f"submitted {sorted(ids)} but SLURM knows {sorted(records)}")
    ran = Counter(rule_of(r) for r in records.values())
    if ran != planned:
        raise CheckFailed(f"SLURM ran {dict(ran)}, Snakemake planned {dict(planned)}")
    not_done = {i: r["JobState"] for i, r in records.items() if r["JobState"] != "COMPLETED"}
    if not_done:
        raise CheckFailed(f"SLURM jobs not COMPLETED: {not_done}")
    not_requeueable = [i for i, r in records.items() if r.get("Requeue") != "1"]
    if not_requeueable:
        raise CheckFailed(f"jobs submitted without --requeue: {not_requeueable}")
    missing_logs = [p for _, _, p in submitted if not Path(p).is_file()]
    if missing_logs:
        raise CheckFailed(f"SLURM log files missing: {missing_logs}")
    lines = [
        f"jobs submitted through sbatch: {len(ids)} of {sum(planned.values()) + 1} "
        f"(the target rule 'all' is local), SLURM job ids {', '.join(sorted(ids, key=int))}",
        "jobs per rule: " + ", ".join(f"{rule} {n}" for rule, n in sorted(ran.items())),
        f"SLURM records: all {len(records)} COMPLETED and Requeue=1; "
        f"{len(submitted)} SLURM logs kept",
    ]
    lines += check_resources(records, profile)
    lines.append(check_resumed(records, slurm_dir, epochs))
    return lines


def check_resources(records: dict[str, dict[str, str]], profile: dict) -> list[str]:
    """The training jobs asked SLURM for the profile's memory and wall time."""
    wanted = profile["set-resources"]
    lines = []
    for record in records.values():
        rule = rule_of(record)
        if rule not in TRAINING_RULES:
            continue
        mem, limit = record["MinMemoryNode"], minutes(record["TimeLimit"])
        if mem != f"{wanted[rule]['mem_mb']}M" or limit != wanted[rule]["runtime"]:
            raise CheckFailed(
                f"{rule}: SLURM got mem {mem}, time {limit} min; the profile asks "
                f"{wanted[rule]['mem_mb']}M, {wanted[rule]['runtime']} min"
            )
        lines.append(f"{rule}: --mem {mem} --time {limit} min, {record['NumCPUs']} CPUs")
    return ["training jobs as the profile asks: " + "; ".join(sorted(lines))]


def check_resumed(records: dict[str, dict[str, str]], slurm_dir: Path, epochs: int) -> str:
    """QAT was restarted by SLURM and its second start continued after the last epoch."""
    (qat,) = [i for i, r in records.items() if rule_of(r) == "qat"]
    restarts = int(records[qat].get("Restarts", 0))
    if restarts < 1:
        raise CheckFailed(f"QAT job {qat} was never restarted (Restarts={restarts})")
    log = (slurm_dir / "logs/qat.log").read_text()
    last_start = log.rfind("QAT: QATSettings")
    first = EPOCH.search(log, last_start)
    if last_start < 0 or not first:
        raise CheckFailed("logs/qat.log shows no QAT start followed by an epoch")
    if int(first.group(1)) == 1:
        raise CheckFailed("QAT started again from epoch 1 after the requeue")
    rows = len((slurm_dir / "results/model/qat_history.csv").read_text().splitlines()) - 2
    if rows != epochs:  # the header and epoch 0 (the starting weights, scored) aside
        raise CheckFailed(f"qat_history.csv has {rows} trained epochs, expected {epochs}")
    return (
        f"QAT job {qat}: restarted {restarts}x by SLURM, resumed at epoch "
        f"{first.group(1)}/{first.group(2)}, history complete ({rows} epochs)"
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_outputs(slurm_dir: Path, local_dir: Path) -> list[str]:
    """Deterministic outputs bit-identical to the local run's; the QAT branch alike in shape."""
    demo = sorted(
        str(p.relative_to(local_dir))
        for p in (local_dir / "resources/demo").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )
    differ = [
        rel
        for rel in (*EXACT_OUTPUTS, *demo)
        if not (slurm_dir / rel).is_file() or digest(slurm_dir / rel) != digest(local_dir / rel)
    ]
    if differ:
        raise CheckFailed(f"outputs differ from the local run: {differ}")
    lines = [
        f"bit-identical to the local run: {len(EXACT_OUTPUTS)} data/FP32/PTQ outputs "
        f"and {len(demo)} demo audio files"
    ]
    lines.append(compare_models(slurm_dir, local_dir))
    return lines


def compare_models(slurm_dir: Path, local_dir: Path) -> str:
    import keras
    import numpy as np

    import n6qat.model  # noqa: F401  (registers the custom layers)
    from n6qat.tflite_inspect import int8_problems, read_tflite

    def weights(root: Path, rel: str):
        return keras.saving.load_model(root / rel, compile=False).get_weights()

    for rel in SAME_WEIGHTS:
        a, b = weights(slurm_dir, rel), weights(local_dir, rel)
        if len(a) != len(b) or not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)):
            raise CheckFailed(f"{rel}: weights differ from the local run's")
    rel = "results/model/qat.keras"
    shapes = [[w.shape for w in weights(root, rel)] for root in (slurm_dir, local_dir)]
    if shapes[0] != shapes[1]:
        raise CheckFailed(f"{rel}: weight shapes differ from the local run's")
    rel = "results/model_qat_int8.tflite"
    infos = [read_tflite(root / rel) for root in (slurm_dir, local_dir)]
    layout = [
        ([op.opcode for op in i.operators], [(t.shape, t.dtype) for t in i.tensors]) for i in infos
    ]
    if layout[0] != layout[1] or int8_problems(infos[0]):
        raise CheckFailed(f"{rel}: graph differs from the local run's or is not clean INT8")
    return (
        f"same weights as the local run: {', '.join(Path(p).name for p in SAME_WEIGHTS)}; "
        f"QAT model and its INT8 graph alike ({len(infos[0].operators)} ops, int8 clean)"
    )


# -------------------------------------------------------------------------- GPU


def gpu_profile(profile: Path, out: Path) -> None:
    """The profile with QAT's `gpu: 0` set to 1, as its README tells users to do."""
    settings = yaml.safe_load(profile.read_text())
    settings["set-resources"]["qat"]["gpu"] = 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def verify_gpu(log_text: str) -> str:
    submitted = SUBMITTED.findall(log_text)
    if len(submitted) != 1:
        raise CheckFailed(f"expected one submitted job (QAT), got {len(submitted)}")
    slurm_id = submitted[0][1]
    record = slurm_jobs()[slurm_id]
    gres = record.get("TresPerJob", "")
    if rule_of(record) != "qat" or record["JobState"] != "COMPLETED" or "gpu:1" not in gres:
        raise CheckFailed(
            f"GPU job {slurm_id}: rule {rule_of(record)}, "
            f"state {record['JobState']}, TresPerJob {gres!r}"
        )
    return f"QAT job {slurm_id} COMPLETED on a GPU allocation (TresPerJob={gres})"


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preempt-qat")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--overlay", type=Path, required=True)
    p.add_argument("--cpus", type=int, required=True)
    p.add_argument("--watch-pid", type=int, required=True)
    p.add_argument("--timeout", type=float, default=1200)
    p = sub.add_parser("verify")
    p.add_argument("--slurm-dir", type=Path, required=True)
    p.add_argument("--local-dir", type=Path, required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--overlay", type=Path, required=True)
    p = sub.add_parser("gpu-profile")
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("verify-gpu")
    p.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "preempt-qat":
            lines = [
                preempt_qat(
                    args.workdir, qat_epochs(args.overlay), args.cpus, args.watch_pid, args.timeout
                )
            ]
        elif args.command == "verify":
            profile = yaml.safe_load(args.profile.read_text())
            epochs = qat_epochs(args.overlay)
            lines = check_jobs(args.log.read_text(), profile, epochs, args.slurm_dir)
            lines += compare_outputs(args.slurm_dir, args.local_dir)
        elif args.command == "gpu-profile":
            gpu_profile(args.profile, args.out)
            lines = []
        else:
            lines = [verify_gpu(args.log.read_text())]
    except CheckFailed as exc:
        print(f"[slurm-test] FAIL: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
