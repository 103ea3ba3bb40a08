# STM32N6 NPU stage: the host-side check (always) and ST Edge AI's stedgeai (when found).
# Whether stedgeai exists is decided inside the step scripts, so the jobs are the same
# with or without it; without it each step records {"available": false}.

# The stedgeai steps each model's report reads: validate only with a board attached.
STEDGEAI_STEPS = ["analyze", "generate"]
if config["stedgeai"]["board"]:
    STEDGEAI_STEPS.append("validate")
# Minutes one step may take: validate runs the model on the board.
STEDGEAI_RUNTIME = {"analyze": 30, "generate": 30, "validate": 60}


rule npu_host_check:
    input:
        model="results/model_{model}_int8.tflite",
        validation="results/model_{model}_int8_validation.npz",
    output:
        json="results/npu/{model}_host_check.json",
        txt="results/npu/{model}_host_check.txt",
    log:
        "logs/npu/{model}_host_check.log",
    benchmark:
        "benchmarks/runs/npu_host_check_{model}.tsv"
    conda:
        "../../envs/tf.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        strict=config["npu"]["strict"],
    script:
        "../scripts/npu_host_check.py"


rule npu_stedgeai:
    input:
        model="results/model_{model}_int8.tflite",
        # validate also sends the validation data to the board
        validation=branch(
            evaluate("{step} == 'validate'"),
            then="results/model_{model}_int8_validation.npz",
        ),
    output:
        folder=directory("results/npu/stedgeai/{model}/{step}"),
    log:
        "logs/npu/{model}_stedgeai_{step}.log",
    benchmark:
        "benchmarks/runs/npu_stedgeai_{step}_{model}.tsv"
    wildcard_constraints:
        step="|".join(ALL_STEDGEAI_STEPS),
    conda:
        "../../envs/tf.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lookup(dpath="{step}", within=STEDGEAI_RUNTIME),
    params:
        step="{step}",
        stedgeai=config["stedgeai"],
    script:
        "../scripts/npu_stedgeai.py"


rule npu_stedgeai_report:
    input:
        expand("results/npu/stedgeai/{{model}}/{step}", step=STEDGEAI_STEPS),
    output:
        "results/npu/{model}_stedgeai.json",
    log:
        "logs/npu/{model}_stedgeai_report.log",
    conda:
        "../../envs/tf.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/npu_stedgeai_report.py"


rule npu_summary:
    input:
        host=expand("results/npu/{model}_host_check.json", model=INT8_MODELS),
        stedgeai=expand("results/npu/{model}_stedgeai.json", model=INT8_MODELS),
    output:
        "results/npu/summary.json",
    log:
        "logs/npu/summary.log",
    conda:
        "../../envs/tf.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        models=INT8_MODELS,
    script:
        "../scripts/npu_summary.py"
