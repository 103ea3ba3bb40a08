"""The whole workflow on the tiny config, then `snakemake --report`: one self-contained HTML."""

import base64
import json
import re
from pathlib import Path

import pytest
from conftest import snakemake

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["summary", "training_curves", "confusion", "per_class_ap", "output_scatter",
           "weight_sqnr", "class_counts", "npu"]  # fmt: skip
TABLES = ["summary", "rejected", "npu", "config"]
REPORT_RULES = ["summary", "curves", "confusion", "output_scatter", "int8_gate", "layer_fidelity",
                "weight_sqnr", "data", "npu", "config"]  # fmt: skip

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def report(tiny_run):
    """The workflow's folder and the report's embedded results, by path."""
    assert "workflow/rules/report.smk" in SNAKEFILE.read_text(), (
        "the Snakefile must include workflow/rules/report.smk, name workflow/report/workflow.rst "
        "in its report: directive and list REPORT_OUTPUTS in rule all"
    )
    workdir = tiny_run
    made = snakemake(workdir, "--report", "results/report.html")
    assert made.returncode == 0, made.stderr[-4000:]
    text = (workdir / "results/report.html").read_text()
    results = re.search(r'<script id="results">\s*var results = (.*?);\s*</script>', text, re.S)
    return workdir, text, json.loads(results.group(1))


def embedded(entry: dict) -> bytes:
    header, data = entry["data_uri"].split(",", 1)
    assert header.startswith("data:") and header.endswith(";base64")
    return base64.b64decode(data)


def test_report_is_one_self_contained_file(report):
    _, text, results = report
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="https?:', text)
    assert all(entry["data_uri"].startswith("data:") for entry in results.values())
    for name in ("1. Summary", "2. Training", "4. Quantization", "6. STM32N6"):
        assert json.dumps(name)[1:-1] in text


def test_report_holds_the_summary_table(report):
    _, _, results = report
    table = embedded(results["results/report/summary.html"]).decode()
    for row in ("FP32", "QAT-FP32", "PTQ-INT8", "QAT-INT8", "Δ QAT-INT8 − PTQ-INT8",
                "Δ QAT-INT8 − FP32", "Δ PTQ-INT8 − FP32"):  # fmt: skip
        assert f"<th>{row}</th>" in table
    assert re.search(r"<tr><th>QAT-INT8</th><td>[01]\.\d{3}</td>", table)
    for name in TABLES:
        assert embedded(results[f"results/report/{name}.html"]).startswith(b"<!DOCTYPE html>")


def test_report_holds_every_figure_with_a_caption(report):
    _, _, results = report
    for name in FIGURES:
        entry = results[f"results/report/{name}.png"]
        assert entry["mime_type"] == "image/png"
        assert embedded(entry).startswith(PNG_SIGNATURE)
        assert len(entry["caption"]) > 100
    assert "10·log10" in results["results/report/weight_sqnr.png"]["caption"]


def test_report_rules_log_and_benchmark_and_sqnr_is_plausible(report):
    workdir, _, _ = report
    for rule in REPORT_RULES:
        assert (workdir / f"logs/report/{rule}.log").exists()
        assert (workdir / f"benchmarks/runs/report_{rule}.tsv").exists()
    sqnr = (workdir / "results/report/weight_sqnr.csv").read_text().splitlines()
    rows = [line.split(",") for line in sqnr[1:]]
    assert {row[-1] for row in rows} == {"PTQ-INT8", "QAT-INT8"}
    assert all(float(row[-2]) > 25 for row in rows)  # per-channel int8 weights


def test_curves_skip_pretraining_for_a_user_checkpoint(report):
    workdir, _, _ = report
    checkpoint = '{"pretrained": "results/model/fp32_trained.keras"}'
    plan = snakemake(workdir, "-n", "--forcerun", "report_curves", "--rerun-triggers", "mtime",
                     "--config", f"model={checkpoint}")  # fmt: skip
    assert plan.returncode == 0, plan.stderr[-2000:]
    job = (plan.stdout + plan.stderr).split("rule report_curves:")[1].split("\n\n")[0]
    assert "qat_history.csv" in job and "pretrain_history.csv" not in job
