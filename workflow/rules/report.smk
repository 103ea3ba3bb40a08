# Report stage: figures and tables for `snakemake --report results/report.html`, each
# wrapped in report() with a caption from workflow/report/.

from types import SimpleNamespace

REPORT_CONFUSION_MODELS = ["fp32", "qat_int8"]
REPORT_AP_MODELS = ["fp32", "ptq_int8", "qat_int8"]
REPORT_SCATTER_PAIRS = [["fp32", "ptq_int8"], ["qat_fp32", "qat_int8"]]
REPORT_OUTPUTS = [
    "results/report/summary.html",
    "results/report/summary.png",
    "results/report/training_curves.png",
    "results/report/confusion.png",
    "results/report/per_class_ap.png",
    "results/report/output_scatter.png",
    "results/report/int8_gate.html",
    "results/report/layer_fidelity.png",
    "results/report/weight_sqnr.png",
    "results/report/class_counts.png",
    "results/report/rejected.html",
    "results/report/npu.png",
    "results/report/npu.html",
    "results/report/config.html",
]


# Each INT8 model's .tflite and the float .keras it was converted from.
CONVERTED_MODELS = {
    "keras": [keras_model_for(SimpleNamespace(model=m)) for m in INT8_MODELS],
    "tflite": expand("results/model_{model}_int8.tflite", model=INT8_MODELS),
}
# QAT's history, and pretraining's when this run trained the FP32 model itself.
TRAINING_HISTORIES = {"qat": "results/model/qat_history.csv"}
if not config["model"]["pretrained"]:
    TRAINING_HISTORIES["pretrain"] = "results/model/pretrain_history.csv"


rule report_summary:
    input:
        summary="results/eval/summary.csv",
    output:
        table=report(
            "results/report/summary.html",
            caption="../report/summary_table.rst",
            category="1. Summary",
            labels={"content": "metrics and differences (table)"},
        ),
        figure=report(
            "results/report/summary.png",
            caption="../report/summary_figure.rst",
            category="1. Summary",
            labels={"content": "metrics per model (bars)"},
        ),
        csv="results/report/summary_deltas.csv",
    log:
        "logs/report/summary.log",
    benchmark:
        "benchmarks/runs/report_summary.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/report_summary.py"


rule report_int8_gate:
    input:
        reports=expand("results/convert/{model}.json", model=INT8_MODELS),
    output:
        table=report(
            "results/report/int8_gate.html",
            caption="../report/int8_gate.rst",
            category="4. Quantization",
            labels={"content": "INT8 gate (table)"},
        ),
    log:
        "logs/report/int8_gate.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        models=INT8_MODELS,
    script:
        "../scripts/report_int8_gate.py"


rule report_layer_fidelity:
    input:
        csv=expand("results/convert/{model}_layers.csv", model=INT8_MODELS),
    output:
        figure=report(
            "results/report/layer_fidelity.png",
            caption="../report/layer_fidelity.rst",
            category="4. Quantization",
            labels={"content": "INT8 fidelity per tensor"},
        ),
    log:
        "logs/report/layer_fidelity.log",
    benchmark:
        "benchmarks/runs/report_layer_fidelity.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        models=[short_name(model) for model in INT8_MODELS],
    script:
        "../scripts/report_layer_fidelity.py"


rule report_curves:
    input:
        **TRAINING_HISTORIES,
    output:
        figure=report(
            "results/report/training_curves.png",
            caption="../report/training_curves.rst",
            category="2. Training",
            labels={"content": "loss and metrics per epoch"},
        ),
    log:
        "logs/report/curves.log",
    benchmark:
        "benchmarks/runs/report_curves.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/report_curves.py"


rule report_confusion:
    input:
        confusion=expand(
            "results/eval/confusion_{name}.csv", name=REPORT_CONFUSION_MODELS
        ),
        per_class="results/eval/per_class.csv",
    output:
        confusion=report(
            "results/report/confusion.png",
            caption="../report/confusion.rst",
            category="3. Accuracy per class",
            labels={"content": "confusion matrices"},
        ),
        ap=report(
            "results/report/per_class_ap.png",
            caption="../report/per_class_ap.rst",
            category="3. Accuracy per class",
            labels={"content": "average precision per class"},
        ),
    log:
        "logs/report/confusion.log",
    benchmark:
        "benchmarks/runs/report_confusion.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        confusion_models=REPORT_CONFUSION_MODELS,
        ap_models=REPORT_AP_MODELS,
    script:
        "../scripts/report_confusion.py"


rule report_output_scatter:
    input:
        scores=expand("results/eval/scores/{name}.npz", name=EVAL_MODELS),
    output:
        figure=report(
            "results/report/output_scatter.png",
            caption="../report/output_scatter.rst",
            category="4. Quantization",
            labels={"content": "float vs INT8 outputs"},
        ),
    log:
        "logs/report/output_scatter.log",
    benchmark:
        "benchmarks/runs/report_output_scatter.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=5,
    params:
        models=EVAL_MODELS,
        pairs=REPORT_SCATTER_PAIRS,
    script:
        "../scripts/report_output_scatter.py"


rule report_weight_sqnr:
    input:
        **CONVERTED_MODELS,
    output:
        figure=report(
            "results/report/weight_sqnr.png",
            caption="../report/weight_sqnr.rst",
            category="4. Quantization",
            labels={"content": "weight SQNR per layer"},
        ),
        csv="results/report/weight_sqnr.csv",
    log:
        "logs/report/weight_sqnr.log",
    benchmark:
        "benchmarks/runs/report_weight_sqnr.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=15,
    params:
        models=[short_name(model) for model in INT8_MODELS],
    script:
        "../scripts/report_weight_sqnr.py"


rule report_data:
    input:
        counts="results/index/class_counts.csv",
        rejected="results/index/rejected.csv",
    output:
        counts=report(
            "results/report/class_counts.png",
            caption="../report/class_counts.rst",
            category="5. Data",
            labels={"content": "class counts"},
        ),
        rejected=report(
            "results/report/rejected.html",
            caption="../report/rejected.rst",
            category="5. Data",
            labels={"content": "rejected files"},
        ),
    log:
        "logs/report/data.log",
    benchmark:
        "benchmarks/runs/report_data.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        negatives=config["data"]["negatives"],
    script:
        "../scripts/report_data.py"


rule report_npu:
    input:
        host=expand("results/npu/{model}_host_check.json", model=INT8_MODELS),
        stedgeai=expand("results/npu/{model}_stedgeai.json", model=INT8_MODELS),
    output:
        figure=report(
            "results/report/npu.png",
            caption="../report/npu_figure.rst",
            category="6. STM32N6",
            labels={"content": "NPU placement and memory"},
        ),
        table=report(
            "results/report/npu.html",
            caption="../report/npu_table.rst",
            category="6. STM32N6",
            labels={"content": "host check and stedgeai (table)"},
        ),
    log:
        "logs/report/npu.log",
    benchmark:
        "benchmarks/runs/report_npu.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        models=INT8_MODELS,
    script:
        "../scripts/report_npu.py"


rule report_config:
    output:
        report(
            "results/report/config.html",
            caption="../report/config.rst",
            category="7. Configuration",
            labels={"content": "configuration"},
        ),
    log:
        "logs/report/config.log",
    benchmark:
        "benchmarks/runs/report_config.tsv"
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        config=config,
    script:
        "../scripts/report_config.py"
