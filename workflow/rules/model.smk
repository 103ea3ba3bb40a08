rule pretrain:
    input:
        train="results/features/train.npy",
        train_chunks="results/features/train_chunks.csv",
        val="results/features/val.npy",
        val_chunks="results/features/val_chunks.csv",
        upsampled="results/index/train_upsampled.csv",
        labels="results/index/labels.txt",
    output:
        **prepared_by_pretrain(),
        model="results/model/fp32_trained.keras",
        history="results/model/pretrain_history.csv",
    log:
        "logs/pretrain.log",
    benchmark:
        "benchmarks/runs/pretrain.tsv"
    conda:
        "../../envs/tf.yaml"
    threads: TF_THREADS
    resources:
        mem_mb=6000,
        runtime=120,
    params:
        settings=feature_settings(),
        model=config["model"],
        threads=TF_THREADS,
        backup="results/model/.backup/pretrain",
    script:
        "../scripts/pretrain.py"


# A workflow-trained model is prepared inside pretrain (prepared_by_pretrain).
if USER_CHECKPOINT:

    rule prepare_pretrained:
        input:
            checkpoint=USER_CHECKPOINT,
            labels="results/index/labels.txt",
            train="results/features/train.npy",
            train_chunks="results/features/train_chunks.csv",
            val="results/features/val.npy",
            val_chunks="results/features/val_chunks.csv",
            upsampled="results/index/train_upsampled.csv",
        output:
            model="results/model/pretrained.keras",
            info="results/model/pretrained.json",
        log:
            "logs/prepare_pretrained.log",
        benchmark:
            "benchmarks/runs/prepare_pretrained.tsv"
        conda:
            "../../envs/tf.yaml"
        threads: TF_THREADS
        resources:
            mem_mb=6000,
            runtime=60,
        params:
            settings=feature_settings(),
            model=config["model"],
            threads=TF_THREADS,
            backup="results/model/.backup/head",
        script:
            "../scripts/prepare_pretrained.py"


rule equalize:
    input:
        model="results/model/pretrained.keras",
        train="results/features/train.npy",
        train_chunks="results/features/train_chunks.csv",
    output:
        model="results/model/equalized.keras",
        table="results/model/equalization.csv",
    log:
        "logs/equalize.log",
    benchmark:
        "benchmarks/runs/equalize.tsv"
    conda:
        "../../envs/tf.yaml"
    threads: TF_THREADS
    resources:
        mem_mb=3000,
        runtime=15,
    params:
        mode=config["equalize"]["mode"],
        calibration=config["convert"],
        threads=TF_THREADS,
    script:
        "../scripts/equalize.py"


rule qat:
    input:
        model=quantization_start(),
        reference="results/model/pretrained.keras",
        train="results/features/train.npy",
        train_chunks="results/features/train_chunks.csv",
        val="results/features/val.npy",
        val_chunks="results/features/val_chunks.csv",
        upsampled="results/index/train_upsampled.csv",
        labels="results/index/labels.txt",
    output:
        model="results/model/qat.keras",
        history="results/model/qat_history.csv",
    log:
        "logs/qat.log",
    benchmark:
        "benchmarks/runs/qat.tsv"
    priority: PRIORITY_QAT
    conda:
        "../../envs/tf.yaml"
    threads: TF_THREADS
    resources:
        mem_mb=6000,
        runtime=120,
    params:
        qat=config["qat"],
        calibration=config["convert"],
        evaluate=config["evaluate"],
        threads=TF_THREADS,
        backup="results/model/.backup/qat",
    script:
        "../scripts/qat.py"
