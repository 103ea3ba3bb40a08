"""Where the converted TFLite and the QAT twin's INT8 simulation part, tensor by tensor.

For a finished run folder this builds the twin in full simulation of the run's QAT (or
pretrained) model on the converter's calibration set, converts the same model, and runs
both on validation chunks. For every quantization point of the twin (an activation
range) it finds the TFLite int8 tensor with the same scale whose first fused op is the
range's layer, and prints how many values differ and by how many int8 steps (LSB).

A simulation bug shows as a tensor that differs a lot while its inputs agree; rounding
at ties shows as a small share of 1-LSB differences that the later layers amplify.

    python benchmarks/simulation_divergence.py /tmp/n6qat_seeds_*/seed-7 --seed 7
    python benchmarks/simulation_divergence.py RUN --model ptq --seed 7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from selection_rules import resolved_config  # noqa: E402 (the same seeded config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", choices=("qat", "ptq"), default="qat")
    parser.add_argument("--seed", type=int, required=True, help="the run's seed")
    parser.add_argument("--configfile", type=Path, default=ROOT / "config/config.yaml")
    parser.add_argument("--chunks", type=int, default=48, help="validation chunks to run")
    args = parser.parse_args(argv)

    from n6qat.train import configure_runtime, load_split

    config = resolved_config(args.configfile, args.seed)
    configure_runtime(config["compute"]["threads"], args.seed)
    from n6qat.convert import calibration_set, convert_int8
    from n6qat.fake_quant import ActivationRange
    from n6qat.int8_twin import simulated_int8, twin_layers
    from n6qat.litert import load_interpreter
    from n6qat.model import load_model

    results = args.folder / "results"
    model = load_model(results / ("model/qat.keras" if args.model == "qat"
                                  else "model/pretrained.keras"))  # fmt: skip
    train = load_split(results / "features/train.npy", results / "features/train_chunks.csv")
    x = np.asarray(np.load(results / "features/val.npy", mmap_mode="r")[: args.chunks],
                   dtype=np.float32)  # fmt: skip
    calibration = calibration_set(*train, config["convert"])
    twin = simulated_int8(model, calibration, config["convert"]["per_channel"])
    ranges = [q for q in twin_layers(twin) if isinstance(q, ActivationRange)]

    seen: dict[str, np.ndarray] = {}
    original_call, original_after_relu = ActivationRange.call, ActivationRange.after_relu

    def recording(method):  # a range's int8 output, by name (after_relu: fused in its ReLU)
        def record(self, *args, **kwargs):
            seen[self.name] = np.asarray(out := method(self, *args, **kwargs))
            return out

        return record

    interpreter = load_interpreter(  # the kernels the gate runs
        convert_int8(model, calibration, config["convert"]["per_channel"]),
        preserve_all_tensors=True,
    )
    tensors = [d for d in interpreter.get_tensor_details() if d["dtype"] == np.int8]
    source = interpreter.get_input_details()[0]["index"]

    def tensor_of(quantizer) -> dict | None:
        low, high = float(quantizer.range_min.numpy()), float(quantizer.range_max.numpy())
        scale = (high - low) / 255.0
        layer = quantizer.name.removesuffix("_range")
        for suffix in ("_folded", "_logit", "_input"):
            layer = layer.removesuffix(suffix)
        if quantizer.name not in seen:
            return None
        shape = tuple(seen[quantizer.name].shape[1:])
        same_scale = [d for d in tensors if abs(d["quantization"][0] - scale) <= 1e-6 * scale
                      and tuple(d["shape"][1:]) == shape]  # fmt: skip
        for d in same_scale:
            if f"/{layer}_" in d["name"].split(";")[0] + "_":
                return d
        if quantizer.name.endswith("_input_range"):  # the model input, quantized by QUANTIZE
            return next((d for d in same_scale if d["name"].startswith("tfl.quantize")), None)
        return None

    ActivationRange.call = recording(original_call)
    ActivationRange.after_relu = recording(original_after_relu)
    try:
        twin(x[:1], training=False)  # the shapes of the twin's int8 tensors
        matched = {q.name: tensor_of(q) for q in ranges}
        counts = {name: [0, 0, 0.0] for name, d in matched.items() if d is not None}
        for i in range(len(x)):
            twin(x[i : i + 1], training=False)
            interpreter.set_tensor(source, x[i : i + 1])
            interpreter.invoke()
            for name, d in matched.items():
                if d is None:
                    continue
                scale, zero_point = d["quantization"]
                tflite = (interpreter.get_tensor(d["index"]).astype(np.float32) - zero_point)
                steps = np.abs(tflite * scale - seen[name]) / scale
                count = counts[name]
                count[0] += steps.size
                count[1] += int((steps > 0.5).sum())
                count[2] = max(count[2], float(steps.max()))
    finally:
        ActivationRange.call = original_call
        ActivationRange.after_relu = original_after_relu
    print(f"{args.folder.name} {args.model}: {len(x)} validation chunks")
    print("| quantization point | values that differ | largest difference (LSB) |")
    print("|---|---|---|")
    for name, d in matched.items():
        if d is None:
            print(f"| {name} | no TFLite tensor found | |")
            continue
        total, differ, largest = counts[name]
        print(f"| {name} | {100 * differ / total:.2f} % | {largest:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
