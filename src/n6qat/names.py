"""The names the workflow shares: its models (one list, one set of display names), NPU steps.

``INT8_MODELS`` are the converted models (``results/model_<name>_int8.tflite``): PTQ from
the pretrained model, QAT from the QAT model. ``EVAL_MODELS`` are the four models the
evaluation scores side by side (``results/eval/scores/<name>.npz``).
"""

from __future__ import annotations

INT8_MODELS = ("ptq", "qat")
EVAL_MODELS = ("fp32", "qat_fp32", "ptq_int8", "qat_int8")
STEDGEAI_STEPS = ("analyze", "generate", "validate")
"""The `stedgeai` steps the NPU stage can run (results/npu/stedgeai/<model>/<step>)."""

SHORT_NAMES = dict(zip(EVAL_MODELS, ("FP32", "QAT-FP32", "PTQ-INT8", "QAT-INT8"), strict=True))
LONG_NAMES = dict(zip(EVAL_MODELS, (
    "pretrained FP32 (Keras)", "QAT FP32 (Keras)", "PTQ INT8 (TFLite)", "QAT INT8 (TFLite)"
), strict=True))  # fmt: skip


def short_name(model: str) -> str:
    """Display name of an evaluation or INT8 model: "qat_int8" or "qat" -> "QAT-INT8"."""
    if model in INT8_MODELS:
        model = f"{model}_int8"
    return SHORT_NAMES.get(model, model)
