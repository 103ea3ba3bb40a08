rule evaluate_model:
    input:
        model=model_file_for,
        test="results/features/test.npy",
        test_chunks="results/features/test_chunks.csv",
    output:
        scores="results/eval/scores/{name}.npz",
    log:
        "logs/evaluate_{name}.log",
    benchmark:
        "benchmarks/runs/evaluate_{name}.tsv"
    conda:
        "../../envs/tf.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        latency_runs=config["evaluate"]["latency_runs"],
    script:
        "../scripts/evaluate_model.py"


rule evaluate_summary:
    input:
        scores=expand("results/eval/scores/{name}.npz", name=EVAL_MODELS),
        test_chunks="results/features/test_chunks.csv",
        labels="results/index/labels.txt",
    output:
        summary="results/eval/summary.csv",
        per_class="results/eval/per_class.csv",
        confusion=expand("results/eval/confusion_{name}.csv", name=EVAL_MODELS),
    log:
        "logs/evaluate_summary.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        names=EVAL_MODELS,
        pooling=config["evaluate"]["pooling"],
        threshold=config["evaluate"]["threshold"],
    script:
        "../scripts/evaluate_summary.py"
