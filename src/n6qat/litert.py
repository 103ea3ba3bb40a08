"""Running a .tflite with LiteRT: the one place that loads an interpreter for inference
and maps float data to and from the model's (possibly int8) input and output tensors.
LiteRT is imported inside the functions, so importing this module stays cheap.

Which kernels run an INT8 model matters at the 1-LSB level, and a sensitive model
amplifies that. LiteRT's default on x86 hands int8 ops to the XNNPACK delegate, which
requantizes in float32 (rounding to nearest even); TFLite's built-in kernels requantize
in fixed point, as its reference kernels define the int8 arithmetic of a .tflite. On the
demo's seed 7 the two runtimes' outputs for one QAT model agree with cosine 0.977 only,
while the built-in and reference kernels agree at 0.9999 and the QAT twin matches both
at 0.9994. So every score, gate and selection here runs the built-in kernels
(``KERNELS["builtin"]``, the default); the XNNPACK numbers are a diagnostic
(``convert.py``'s ``host_runtime_spread``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from n6qat.errors import N6QATError
from n6qat.tool_output import native_stderr_captured

KERNELS = {
    "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
    "xnnpack": "AUTO",
    "reference": "BUILTIN_REF",
}
"""Kernel sets by name -> LiteRT ``OpResolverType`` member (see the module docstring)."""


def load_interpreter(
    model_bytes_or_path: bytes | str | Path, num_threads: int = 1, kernels: str = "builtin",
    preserve_all_tensors: bool = False,
):  # fmt: skip
    """A LiteRT interpreter with its tensors allocated, on the named ``KERNELS``."""
    import warnings

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if kernels not in KERNELS:
        raise N6QATError(f"unknown TFLite kernels {kernels!r}; choose one of {sorted(KERNELS)}")
    label = "<bytes>" if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
    source = (
        {"model_content": model_bytes_or_path} if isinstance(model_bytes_or_path, bytes)
        else {"model_path": str(model_bytes_or_path)}
    )
    with native_stderr_captured(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        try:
            interpreter = Interpreter(
                **source,
                num_threads=num_threads,
                experimental_op_resolver_type=getattr(OpResolverType, KERNELS[kernels]),
                experimental_preserve_all_tensors=preserve_all_tensors,
            )
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            failure = err
        else:
            failure = None
    if failure is not None:
        raise N6QATError(f"LiteRT cannot load TFLite model {label}: {failure}") from failure
    return interpreter


def run_tflite(
    model_bytes_or_path: bytes | str | Path, x: np.ndarray, num_threads: int = 1,
    kernels: str = "builtin",
) -> np.ndarray:  # fmt: skip
    """Run every sample of `x` through a single-input, single-output .tflite; float32 out.

    Int8 inputs are quantized and int8 outputs dequantized with the tensors' own
    scale/zero point, so callers always work in float. A batch-N model gets chunks of N
    (the last one zero-padded). ``kernels``: a name in ``KERNELS``.
    """
    label = "<bytes>" if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
    interpreter = load_interpreter(model_bytes_or_path, num_threads, kernels)
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise N6QATError(
            f"TFLite model {label} has {len(inputs)} inputs and {len(outputs)} outputs; "
            "run_tflite handles one of each"
        )
    inp, out = inputs[0], outputs[0]
    batch, sample_shape = int(inp["shape"][0]), tuple(int(d) for d in inp["shape"][1:])
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1:] != sample_shape:
        raise N6QATError(
            f"inputs of shape {x.shape} do not fit TFLite model {label} "
            f"(expects (N, {', '.join(map(str, sample_shape))}))"
        )
    results = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        filled = len(chunk)
        if filled < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - filled, *sample_shape), np.float32)])
        interpreter.set_tensor(inp["index"], to_tensor(chunk, inp))
        interpreter.invoke()
        results.append(from_tensor(interpreter.get_tensor(out["index"]), out)[:filled])
    if not results:
        return np.zeros((0, *(int(d) for d in out["shape"][1:])), np.float32)
    return np.concatenate(results)


def to_tensor(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float data in the input tensor's dtype: int8 quantized as TFLite does."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zero_point = detail["quantization"]
    scaled = x / scale
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)  # TFLite rounds half away
    info = np.iinfo(dtype)
    return np.clip(rounded + zero_point, info.min, info.max).astype(dtype)


def from_tensor(y: np.ndarray, detail: dict) -> np.ndarray:
    """An output tensor's values as float32, int8 dequantized with its scale/zero point."""
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)
