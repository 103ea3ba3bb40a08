"""Judging an INT8 model by what is deployed: simulation fidelity, and quality against FP32 and PTQ.

Two questions, two checks. Fidelity: does the converted model, run on TFLite's built-in
int8 kernels (`n6qat.litert`), compute what the QAT simulation (the twin with
fake-quantized weights and activations, on the converter's calibration ranges) computes?
It should, to cosine >= 0.99; less is a bug in the simulation or the converter path, or
rare 1-LSB rounding differences (float32 arithmetic in the twin, fixed-point
requantization in the kernels) that the model amplifies along the graph
(benchmarks/simulation_divergence.py). LiteRT's default XNNPACK kernels requantize
differently and are not the reference: their spread is reported, not gated. Quality:
what does a user lose by deploying the INT8 model instead of the FP32 reference, in the
metrics they read (file-level top-1, macro F1, cmAP, top-1 agreement), on the validation
split? Losses are in metric points (percentage points; cmAP x 100). The float-vs-INT8 output
cosine stays a diagnostic.

The gate is its own step (``gate_candidate``, rule ``gate_int8``): the conversion writes a
candidate and its measurements, the gate judges them and publishes the model under its
deliverable name only if it passes. So the QAT model's conversion does not wait for the
PTQ baseline's, which only its gate needs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from n6qat.atomic import write_bytes, write_text
from n6qat.config import with_schema_defaults
from n6qat.errors import N6QATError
from n6qat.evaluate import pool_files, validation_metrics

log = logging.getLogger(__name__)

QUALITY_METRICS = ("file_top1", "file_macro_f1", "file_cmap")
METRIC_NAMES = {
    "file_top1": "file-level top-1",
    "file_macro_f1": "file-level macro F1",
    "file_cmap": "file-level cmAP",
}


@dataclass(frozen=True)
@with_schema_defaults("convert", metrics="gate_metrics")
class GateSettings:
    """Limits of the INT8 gate (config keys ``convert.*``; defaults: the schema's)."""

    min_simulation_cosine: float
    max_loss_vs_fp32: float
    max_loss_vs_ptq: float
    metrics: tuple[str, ...]

    @classmethod
    def from_config(cls, convert: dict) -> GateSettings:
        return cls(
            min_simulation_cosine=convert["min_simulation_cosine"],
            max_loss_vs_fp32=convert["max_loss_vs_fp32"],
            max_loss_vs_ptq=convert["max_loss_vs_ptq"],
            metrics=tuple(convert["gate_metrics"]),
        )


def quality(
    int8_scores: np.ndarray,
    fp32_scores: np.ndarray,
    chunks: pd.DataFrame,
    labels: list[str],
    pooling: str = "mean",
    threshold: float = 0.5,
) -> dict:
    """INT8 and FP32 validation metrics side by side, the INT8 loss in points, top-1 agreement."""
    int8 = validation_metrics(int8_scores, chunks, labels, pooling, threshold)
    fp32 = validation_metrics(fp32_scores, chunks, labels, pooling, threshold)
    int8_files, file_labels, _ = pool_files(int8_scores, chunks, pooling)
    fp32_files, *_ = pool_files(fp32_scores, chunks, pooling)
    return {
        "int8": int8,
        "fp32": fp32,
        # File top-1 counts only these (negatives have no class to be right about).
        "labelled_files": int(np.sum(file_labels >= 0)),
        "loss_vs_fp32_points": {m: 100.0 * (fp32[m] - int8[m]) for m in QUALITY_METRICS},
        "file_top1_agreement": float(np.mean(int8_files.argmax(1) == fp32_files.argmax(1))),
        "chunk_top1_agreement": float(np.mean(int8_scores.argmax(1) == fp32_scores.argmax(1))),
    }


def gate_checks(
    name: str,
    fidelity: dict | None,
    measured: dict,
    settings: GateSettings,
    ptq: dict | None = None,
) -> list[dict]:
    """Every check of the gate with what was measured, the limit and a hint on failure.

    ``fidelity``: the INT8-vs-simulation agreement (None: not measured); ``measured``:
    this model's ``quality``; ``ptq``: the PTQ baseline's ``quality``, for a QAT model.
    """
    checks = []
    if fidelity is not None:
        cosine = fidelity["cosine"]
        checks.append({
            "check": "simulation_fidelity",
            "measured": cosine,
            "limit": settings.min_simulation_cosine,
            "passed": bool(cosine >= settings.min_simulation_cosine),
            "message": (
                f"the {name} INT8 TFLite (TFLite's built-in kernels) agrees with its INT8 "
                "simulation (the QAT twin with fake-quantized weights and activations on the "
                f"converter's calibration ranges) with output cosine {cosine:.4f} on "
                f"{fidelity['samples']} validation chunks, below "
                f"convert.min_simulation_cosine={settings.min_simulation_cosine}"
                f" (top-1 agreement {100 * fidelity['top1_agreement']:.1f} %). QAT trained on "
                "a simulation that does not predict the deployed model: a simulation bug (one "
                "tensor far off while its inputs agree), or rare 1-LSB rounding differences "
                "that this model amplifies; `python benchmarks/simulation_divergence.py "
                "<run folder> --seed <seed>` shows which, tensor by tensor. Report it with the "
                "model."
            ),
        })
    for metric in settings.metrics:
        loss = measured["loss_vs_fp32_points"][metric]
        checks.append(_loss_check(
            name, metric, "fp32", loss, settings.max_loss_vs_fp32, measured["fp32"][metric],
            measured["int8"][metric], _files(measured, metric), "convert.max_loss_vs_fp32",
        ))
        if ptq is not None:
            loss = 100.0 * (ptq["int8"][metric] - measured["int8"][metric])
            checks.append(_loss_check(
                name, metric, "ptq", loss, settings.max_loss_vs_ptq, ptq["int8"][metric],
                measured["int8"][metric], _files(measured, metric), "convert.max_loss_vs_ptq",
            ))
    return checks


def _files(measured: dict, metric: str) -> str:
    """How many validation files a metric counts, and for top-1 what one file is worth."""
    files = int(measured["int8"]["files"])
    labelled = measured.get("labelled_files")
    if metric != "file_top1" or not labelled:
        return f"{files} files"
    return (
        f"top-1 over the {labelled} labelled of {files} files: "
        f"one file is {100 / labelled:.2f} points"
    )


def _loss_check(name, metric, against, loss, limit, reference, value, files, key) -> dict:
    what = {"fp32": "the FP32 reference model", "ptq": "the PTQ-INT8 baseline"}[against]
    hints = {
        "fp32": "more QAT epochs (qat.epochs) or a lower qat.learning_rate, per-channel "
                "weights (convert.per_channel: true, qat.per_channel: true), a larger "
                "calibration set (convert.calibration_size); with few validation files one "
                "file is several points: raise the limit if the validation split is small",
        "ptq": "QAT keeps the best epoch that loses nothing to epoch 0 (the PTQ weights) "
               "on validation, or one within this gate's limits; scored with the "
               "converted TFLite (qat.select_with: tflite) this cannot happen unless "
               "qat.selection is 'last' or the QAT rule saw "
               "other calibration or validation data than this conversion; scored with "
               "the simulation, the two can differ by a validation file or two: use "
               "qat.select_with: tflite",
    }[against]
    scale = 100.0
    return {
        "check": f"{metric}_loss_vs_{against}",
        "measured": loss,
        "limit": limit,
        "passed": bool(loss <= limit + 1e-9),
        "message": (
            f"the {name} INT8 model loses {loss:.1f} points of {METRIC_NAMES[metric]} to {what} "
            f"on the validation split ({scale * reference:.1f} -> {scale * value:.1f}, "
            f"{files}), more than {key}={limit:g}. What to try: {hints}."
        ),
    }


def failures(checks: list[dict]) -> list[str]:
    """The messages of the failed checks."""
    return [check["message"] for check in checks if not check["passed"]]


def without_passed_messages(checks: list[dict]) -> list[dict]:
    """The checks as the report stores them: a message only where a check failed."""
    return [
        {k: v for k, v in check.items() if k != "message" or not check["passed"]}
        for check in checks
    ]


def judged(
    report: dict, convert: dict, ptq_report: dict | None = None
) -> tuple[dict, list[str]]:
    """A conversion's report (``n6qat.convert.convert_and_measure``) with the gate's verdict,
    and the messages of the checks that failed.

    ``convert``: the config's ``convert`` section; ``ptq_report``: the PTQ baseline's
    report, for a QAT model (its quality is the baseline the QAT model must not lose to).
    """
    name = report["model"]
    checks = gate_checks(
        name,
        report["simulation_fidelity"],
        report["quality"],
        GateSettings.from_config(convert),
        ptq=None if ptq_report is None else ptq_report["quality"],
    )
    failed = failures(checks)
    published = {k: v for k, v in report.items() if k != "int8_problems"}
    published["gate"] = {
        "gated": name in convert["gate_models"],
        "passed": not failed,
        "checks": without_passed_messages(checks),
    }
    published["int8_problems"] = report["int8_problems"]  # last, where reports had it
    return published, failed


def gate_candidate(
    candidate_tflite: Path,
    candidate_report: Path,
    convert: dict,
    out_tflite: Path,
    out_report: Path,
    ptq_report: Path | None = None,
) -> dict:
    """Judge a converted model and publish it under its deliverable name if it passes.

    A model in ``convert.gate_models`` that fails a check raises N6QATError with every
    failed check's message, and nothing is written; any other model is published with
    the failures logged as warnings. The published report is the candidate's with a
    ``gate`` section: each check's measurement and limit (a message where it failed).
    """
    report = json.loads(Path(candidate_report).read_text())
    baseline = None if ptq_report is None else json.loads(Path(ptq_report).read_text())
    report, failed = judged(report, convert, baseline)
    name = report["model"]
    log.info("%s INT8 gate:\n%s", name, json.dumps(report["gate"], indent=1, default=float))
    if failed and report["gate"]["gated"]:
        raise N6QATError("\n".join(failed))
    for message in failed:
        log.warning("%s (not gated: %s is not in convert.gate_models)", message, name)
    write_bytes(out_tflite, Path(candidate_tflite).read_bytes())
    write_text(out_report, json.dumps(report, indent=2, default=float) + "\n")
    return report


def gate_table(reports: dict[str, dict]) -> pd.DataFrame:
    """One column per INT8 model: the gate's checks and the validation numbers behind them."""
    columns = {}
    for name, report in reports.items():
        measured = report["quality"]
        column = {
            "gated": report["gate"]["gated"],
            "passed": report["gate"]["passed"],
            "simulation fidelity (cosine)": report["simulation_fidelity"]["cosine"],
            "validation files": int(measured["int8"]["files"]),
        }
        if "labelled_files" in measured:  # reports written before it existed lack it
            column["labelled validation files (file top-1 counts these)"] = (
                measured["labelled_files"]
            )
        for metric in QUALITY_METRICS:
            column[f"{METRIC_NAMES[metric]}: FP32"] = measured["fp32"][metric]
            column[f"{METRIC_NAMES[metric]}: INT8"] = measured["int8"][metric]
            column[f"{METRIC_NAMES[metric]}: loss vs FP32 (points)"] = (
                measured["loss_vs_fp32_points"][metric]
            )
        for check in report["gate"]["checks"]:
            if check["check"].endswith("_vs_ptq"):
                metric = check["check"].removesuffix("_loss_vs_ptq")
                column[f"{METRIC_NAMES[metric]}: loss vs PTQ-INT8 (points)"] = check["measured"]
        column["file top-1 agreement with FP32"] = measured["file_top1_agreement"]
        column["chunk top-1 agreement with FP32"] = measured["chunk_top1_agreement"]
        column["output cosine vs its float model (diagnostic)"] = report["agreement"]["cosine"]
        if "host_runtime_spread" in report:  # reports written before it existed lack it
            column["output cosine, XNNPACK vs built-in kernels (diagnostic)"] = (
                report["host_runtime_spread"]["cosine"]
            )
        columns[name] = column
    return pd.DataFrame(columns)
