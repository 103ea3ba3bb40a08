rule make_demo:
    output:
        train=directory(f"{DEMO_ROOT}/train"),
        test=directory(f"{DEMO_ROOT}/test"),
        manifest=f"{DEMO_ROOT}/manifest.csv",
    log:
        "logs/make_demo.log",
    benchmark:
        "benchmarks/runs/make_demo.tsv"
    conda:
        "../../envs/data.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        seed=config["data"]["demo_seed"],
        scale=config["data"]["demo_scale"],
    script:
        "../scripts/make_demo.py"


rule index_dataset:
    input:
        unpack(data_trees),
    output:
        files="results/index/files.csv",
        labels="results/index/labels.txt",
        rejected="results/index/rejected.csv",
    log:
        "logs/index_dataset.log",
    benchmark:
        "benchmarks/runs/index_dataset.tsv"
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=15,
    params:
        negatives=config["data"]["negatives"],
        min_duration=config["data"]["min_duration"],
        fingerprints=data_fingerprints(),
    script:
        "../scripts/index_dataset.py"


rule split_dataset:
    input:
        files="results/index/files.csv",
    output:
        split="results/index/split.csv",
        upsampled="results/index/train_upsampled.csv",
        counts="results/index/class_counts.csv",
    log:
        "logs/split_dataset.log",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        val_fraction=config["split"]["val_fraction"],
        test_fraction=config["split"]["test_fraction"],
        ratio=config["split"]["upsample_ratio"],
        seed=config["split"]["seed"],
        roots=data_trees(),
    script:
        "../scripts/split_dataset.py"


rule extract_features:
    input:
        unpack(data_trees),
        split="results/index/split.csv",
        labels="results/index/labels.txt",
    output:
        features="results/features/{split}.npy",
        chunks="results/features/{split}_chunks.csv",
    log:
        "logs/extract_features_{split}.log",
    benchmark:
        "benchmarks/runs/extract_features_{split}.tsv"
    wildcard_constraints:
        split="train|val|test",
    conda:
        "../../envs/data.yaml"
    threads: 2
    resources:
        mem_mb=3000,
        runtime=30,
    params:
        settings=feature_settings(),
        roots=data_trees(),
    script:
        "../scripts/extract_features.py"
