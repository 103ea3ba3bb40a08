import hashlib
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# Scripts import the n6qat package from this checkout, also inside --sdm conda envs.
PACKAGE_SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, PACKAGE_SRC)
from n6qat.config import SCHEMA_PATH, coerce_config, config_errors, input_path_errors
from n6qat.names import EVAL_MODELS, INT8_MODELS, short_name
from n6qat.names import STEDGEAI_STEPS as ALL_STEDGEAI_STEPS
from n6qat.sidecar import read_sidecar, sidecar_path

coerce_config(config)
_problems = config_errors(config)
if _problems:
    raise WorkflowError("invalid configuration:\n  " + "\n  ".join(_problems))
validate(config, schema=str(SCHEMA_PATH))  # fills in the defaults
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        filter(None, [PACKAGE_SRC, os.environ.get("PYTHONPATH")])
    )
)

if config["qat"]["per_channel"] != config["convert"]["per_channel"]:
    raise WorkflowError(
        f"invalid configuration: qat.per_channel ({config['qat']['per_channel']}) differs "
        f"from convert.per_channel ({config['convert']['per_channel']}): QAT would train on "
        "a weight grid the converter does not write; set both to the same value"
    )

# TensorFlow threads of the training and diagnostic jobs: from the config, never from
# --cores, so that the same config and seed give the same bytes (config/README.md).
TF_THREADS = config["compute"]["threads"]
# Conversion runs on one thread: its outputs were the same bytes at 1 and 2 threads (demo
# DS-CNN; it used one core either way), and the job then runs beside an evaluation or the
# other conversion. Its per-tensor diagnostic (results/convert/<model>_layers.csv) runs
# in the same job, so on one thread too: its cosines differ from 2 threads' by about
# 1e-13 (summation order) and do not depend on compute.threads.
CONVERT_THREADS = 1
# Scheduling priorities (larger first) along the critical path: QAT, then the two
# conversions (side by side: only QAT-INT8's gate reads PTQ's report) and their gates.
# Without them, on 2 cores the PTQ branch's evaluations ran before QAT, and QAT's 2
# threads waited for free cores.
PRIORITY_QAT = 2
PRIORITY_CONVERT = 1
DEMO_ROOT = "resources/demo"
SPLITS = ["train", "val", "test"]


# {model} is always one of the INT8 models (n6qat.names), {name} one of the evaluated.
wildcard_constraints:
    model="|".join(INT8_MODELS),
    name="|".join(EVAL_MODELS),


def uses_demo(key):
    """True when data.<key> points into the generated demo dataset."""
    return Path(config["data"][key]).as_posix().startswith(f"{DEMO_ROOT}/")


# Input paths checked before any job: the demo trees are made by the make_demo rule.
_missing = input_path_errors(
    config, {f"data.{key}" for key in ("train", "test") if uses_demo(key)}
)
if _missing:
    raise WorkflowError("invalid configuration:\n  " + "\n  ".join(_missing))


def data_trees(wildcards=None):
    """The audio trees the index reads; the demo's are made by the make_demo rule."""
    trees = {"train": config["data"]["train"]}
    if config["data"]["test"]:
        trees["test"] = config["data"]["test"]
    return trees


def tree_fingerprint(path):
    """Hash of every file's name, size and mtime: adding or changing audio re-runs the index."""
    if not Path(path).is_dir():
        return "missing"
    digest = hashlib.blake2b(digest_size=16)
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            digest.update(f"{root}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def data_fingerprints(wildcards=None):
    """Fingerprints of user trees (demo trees are tracked as rule outputs instead)."""
    return {
        key: "demo" if uses_demo(key) else tree_fingerprint(path)
        for key, path in data_trees().items()
    }


# The user's FP32 checkpoint, or "" when the pretrain rule trains the model QAT starts from.
USER_CHECKPOINT = config["model"]["pretrained"]


def checkpoint_sidecar():
    """The pretrained checkpoint's <stem>_model_config.json, when there is one."""
    if USER_CHECKPOINT and sidecar_path(USER_CHECKPOINT).is_file():
        return str(sidecar_path(USER_CHECKPOINT))
    return None


def feature_settings():
    """The features section, overridden by the checkpoint's sidecar JSON when present."""
    sidecar = checkpoint_sidecar()
    return {**config["features"], **(read_sidecar(sidecar) if sidecar else {})}


def prepared_by_pretrain():
    """pretrain's extra outputs when it trains the model QAT starts from (no USER_CHECKPOINT).

    It then checks and saves its model as prepare_pretrained does with a user's checkpoint
    (n6qat.train.prepare_rule, the same bytes), without a TensorFlow process of its own.
    """
    if USER_CHECKPOINT:
        return {}
    return {
        "pretrained": "results/model/pretrained.keras",
        "info": "results/model/pretrained.json",
    }


def quantization_start():
    """The float model PTQ converts and QAT starts from: pretrained, or its equalized copy."""
    if config["equalize"]["mode"] == "off":
        return "results/model/pretrained.keras"
    return "results/model/equalized.keras"


def keras_model_for(wildcards):
    """The float model an INT8 model is converted from: PTQ's start model, QAT's result."""
    return {"ptq": quantization_start(), "qat": "results/model/qat.keras"}[
        wildcards.model
    ]


def gate_inputs(wildcards):
    """What the gate judges: the candidate, its measurements and, for QAT, the PTQ
    baseline's published report (QAT-INT8 may not lose to PTQ-INT8)."""
    inputs = {
        "tflite": f"results/convert/{wildcards.model}_candidate.tflite",
        "report": f"results/convert/{wildcards.model}_candidate.json",
    }
    if wildcards.model == "qat":
        inputs["ptq_report"] = "results/convert/ptq.json"
    return inputs


def model_file_for(wildcards):
    """The model file behind an evaluation name."""
    return {
        "fp32": "results/model/pretrained.keras",
        "qat_fp32": "results/model/qat.keras",
        "ptq_int8": "results/model_ptq_int8.tflite",
        "qat_int8": "results/model_qat_int8.tflite",
    }[wildcards.name]
