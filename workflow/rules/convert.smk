rule convert_int8:
    input:
        model=keras_model_for,
        reference="results/model/pretrained.keras",
        labels="results/index/labels.txt",
        train="results/features/train.npy",
        train_chunks="results/features/train_chunks.csv",
        val="results/features/val.npy",
        val_chunks="results/features/val_chunks.csv",
    output:
        tflite="results/convert/{model}_candidate.tflite",
        validation="results/model_{model}_int8_validation.npz",
        report="results/convert/{model}_candidate.json",
        layers="results/convert/{model}_layers.csv",
        weights="results/convert/{model}_weight_sqnr.csv",
    log:
        "logs/convert_{model}.log",
    benchmark:
        "benchmarks/runs/convert_{model}.tsv"
    priority: PRIORITY_CONVERT
    conda:
        "../../envs/tf.yaml"
    threads: CONVERT_THREADS
    resources:
        mem_mb=4000,
        runtime=45,
    params:
        convert=config["convert"],
        evaluate=config["evaluate"],
        layer_samples=64,
        threads=CONVERT_THREADS,
    script:
        "../scripts/convert_int8.py"


rule gate_int8:
    input:
        unpack(gate_inputs),
    output:
        tflite="results/model_{model}_int8.tflite",
        report="results/convert/{model}.json",
    log:
        "logs/gate_{model}.log",
    benchmark:
        "benchmarks/runs/gate_{model}.tsv"
    priority: PRIORITY_CONVERT
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        convert=config["convert"],
    script:
        "../scripts/gate_int8.py"
