# Report stage: figures and tables for `snakemake --report results/report.html`, each
# wrapped in report() with a caption from workflow/report/.

REPORT_CONFUSION_MODELS = ["fp32", "qat_int8"]
REPORT_AP_MODELS = ["fp32", "ptq_int8", "qat_int8"]
REPORT_SCATTER_PAIRS = [["fp32", "ptq_int8"], ["qat_fp32", "qat_int8"]]

# QAT's history, and pretraining's when this run trained the FP32 model itself.
TRAINING_HISTORIES = {"qat": "results/model/qat_history.csv"}
if not USER_CHECKPOINT:
    TRAINING_HISTORIES["pretrain"] = "results/model/pretrain_history.csv"

# One entry per rule report_<name>: it runs scripts/report_<name>.py, logs to
# logs/report/<name>.log and benchmarks to benchmarks/runs/report_<name>.tsv.
# "shown": the outputs in the report, as (path, caption in workflow/report/, label),
# all in the entry's category; "files": other outputs; mem_mb 1000, runtime 5 unless
# given. REPORT_OUTPUTS (rule all) is every shown output, in the table's order: adding a
# figure is one entry here (and its script and caption).
REPORT_RULES = {
    "summary": {
        "category": "1. Summary",
        "input": {"summary": "results/eval/summary.csv"},
        "shown": {
            "table": (
                "results/report/summary.html",
                "summary_table.rst",
                "metrics and differences (table)",
            ),
            "figure": (
                "results/report/summary.png",
                "summary_figure.rst",
                "metrics per model (bars)",
            ),
        },
        "files": {"csv": "results/report/summary_deltas.csv"},
    },
    "curves": {
        "category": "2. Training",
        "input": TRAINING_HISTORIES,
        "shown": {
            "figure": (
                "results/report/training_curves.png",
                "training_curves.rst",
                "loss and metrics per epoch",
            ),
        },
    },
    "confusion": {
        "category": "3. Accuracy per class",
        "input": {
            "confusion": expand(
                "results/eval/confusion_{name}.csv", name=REPORT_CONFUSION_MODELS
            ),
            "per_class": "results/eval/per_class.csv",
        },
        "shown": {
            "confusion": (
                "results/report/confusion.png",
                "confusion.rst",
                "confusion matrices",
            ),
            "ap": (
                "results/report/per_class_ap.png",
                "per_class_ap.rst",
                "average precision per class",
            ),
        },
        "params": {
            "confusion_models": REPORT_CONFUSION_MODELS,
            "ap_models": REPORT_AP_MODELS,
        },
    },
    "output_scatter": {
        "category": "4. Quantization",
        "input": {"scores": expand("results/eval/scores/{name}.npz", name=EVAL_MODELS)},
        "shown": {
            "figure": (
                "results/report/output_scatter.png",
                "output_scatter.rst",
                "float vs INT8 outputs",
            ),
        },
        "params": {"models": EVAL_MODELS, "pairs": REPORT_SCATTER_PAIRS},
        "mem_mb": 1500,
    },
    "int8_gate": {
        "category": "4. Quantization",
        "input": {"reports": expand("results/convert/{model}.json", model=INT8_MODELS)},
        "shown": {
            "table": (
                "results/report/int8_gate.html",
                "int8_gate.rst",
                "INT8 gate (table)",
            ),
        },
        "params": {"models": INT8_MODELS},
        "mem_mb": 500,
    },
    "layer_fidelity": {
        "category": "4. Quantization",
        "input": {
            "csv": expand("results/convert/{model}_layers.csv", model=INT8_MODELS)
        },
        "shown": {
            "figure": (
                "results/report/layer_fidelity.png",
                "layer_fidelity.rst",
                "INT8 fidelity per tensor",
            ),
        },
        "params": {"models": [short_name(model) for model in INT8_MODELS]},
    },
    "weight_sqnr": {
        "category": "4. Quantization",
        "input": {
            "tables": expand(
                "results/convert/{model}_weight_sqnr.csv", model=INT8_MODELS
            )
        },
        "shown": {
            "figure": (
                "results/report/weight_sqnr.png",
                "weight_sqnr.rst",
                "weight SQNR per layer",
            ),
        },
        "files": {"csv": "results/report/weight_sqnr.csv"},
        "params": {"models": [short_name(model) for model in INT8_MODELS]},
    },
    "data": {
        "category": "5. Data",
        "input": {
            "counts": "results/index/class_counts.csv",
            "rejected": "results/index/rejected.csv",
        },
        "shown": {
            "counts": (
                "results/report/class_counts.png",
                "class_counts.rst",
                "class counts",
            ),
            "rejected": (
                "results/report/rejected.html",
                "rejected.rst",
                "rejected files",
            ),
        },
        "params": {"negatives": config["data"]["negatives"]},
    },
    "npu": {
        "category": "6. STM32N6",
        "input": {
            "host": expand("results/npu/{model}_host_check.json", model=INT8_MODELS),
            "stedgeai": expand("results/npu/{model}_stedgeai.json", model=INT8_MODELS),
        },
        "shown": {
            "figure": (
                "results/report/npu.png",
                "npu_figure.rst",
                "NPU placement and memory",
            ),
            "table": (
                "results/report/npu.html",
                "npu_table.rst",
                "host check and stedgeai (table)",
            ),
        },
        "params": {"models": INT8_MODELS},
    },
    "config": {
        "category": "7. Configuration",
        "shown": {
            "page": (
                "results/report/config.html",
                "config.rst",
                "configuration",
            ),
        },
        "params": {"config": config},
        "mem_mb": 500,
    },
}
REPORT_OUTPUTS = [
    path for spec in REPORT_RULES.values() for path, _, _ in spec["shown"].values()
]


# Snakemake evaluates a rule's script path again when the job runs, where _name is the
# loop's last value (snakemake/snakemake#2832); there the job's `rule` (its name) is
# local, so the path takes it first.
for _name, _spec in REPORT_RULES.items():
    _shown = {
        key: report(
            path,
            caption=f"../report/{caption}",
            category=_spec["category"],
            labels={"content": content},
        )
        for key, (path, caption, content) in _spec["shown"].items()
    }

    rule:
        name:
            f"report_{_name}"
        input:
            **_spec.get("input", {}),
        output:
            **_shown,
            **_spec.get("files", {}),
        log:
            f"logs/report/{_name}.log",
        benchmark:
            f"benchmarks/runs/report_{_name}.tsv"
        conda:
            "../../envs/report.yaml"
        threads: 1
        resources:
            mem_mb=_spec.get("mem_mb", 1000),
            runtime=_spec.get("runtime", 5),
        params:
            **_spec.get("params", {}),
        script:
            f"../scripts/{locals().get('rule', f'report_{_name}')}.py"
