"""n6qat: a pretrained Keras audio classifier -> QAT -> INT8 TFLite for the STM32N6 NPU."""

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/npu.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "results/model_qat_int8.tflite",
        "results/model_ptq_int8.tflite",
        expand("results/convert/{model}.json", model=INT8_MODELS),
        "results/npu/summary.json",
        "results/eval/summary.csv",
        REPORT_OUTPUTS,
