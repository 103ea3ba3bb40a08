rule convert_int8:
    input:
        model=keras_model_for,
        train="results/features/train.npy",
        train_chunks="results/features/train_chunks.csv",
        val="results/features/val.npy",
        val_chunks="results/features/val_chunks.csv",
    output:
        tflite="results/model_{model}_int8.tflite",
        validation="results/model_{model}_int8_validation.npz",
        report="results/convert/{model}.json",
    log:
        "logs/convert_{model}.log",
    benchmark:
        "benchmarks/runs/convert_{model}.tsv"
    wildcard_constraints:
        model="ptq|qat",
    conda:
        "../../envs/tf.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        convert=config["convert"],
    script:
        "../scripts/convert_int8.py"
