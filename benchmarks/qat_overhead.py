"""Cost of a QAT train step against a float fine-tuning step, measured side by side.

The workflow's default DS-CNN (`n6qat.model.build_dscnn` on the default features), a
random batch of 32, Adam; each step is a compiled Keras train step (`train_on_batch`).
Variants, all on copies of the same model:

- float: plain fine-tuning (BatchNormalization in training mode);
- float-bn-frozen: BN in inference mode, as QAT runs it (the baseline to beat);
- float-bn-folded: the QAT twin with float weights and no activation quantizers: float
  fine-tuning with every foldable BN folded into its conv, as the twin computes it
  (fewer ops than float-bn-frozen; the ratio to it is printed too);
- qat-weights: the int8 twin with fake-quantized weights only;
- qat+act-tracked: weights and activations, ranges tracked as moving averages of batches;
- qat+act: weights and activations on calibrated ranges (the workflow's default: ranges
  re-derived from the calibration set at each epoch start, not in the step);
- callback: a shadow-weight QAT like the reference system's early one, written here
  from its description: per batch a numpy copy of the kernels, the kernels set to an
  asymmetric min/max 255-level grid, a float (BN-frozen) step, then the float kernels
  restored plus the step's delta.

Every thread count runs in its own process (TF fixes its thread pools at start). Blocks
of steps alternate between the variants, in an order rotated every round, so that load
from other jobs hits them alike; medians over all steps are compared.

    .venv/bin/python benchmarks/qat_overhead.py              # threads 1 and 2
    .venv/bin/python benchmarks/qat_overhead.py --threads 1 --steps 80
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "float-bn-frozen"
FOLDED = "float-bn-folded"


def callback_step(net, kernels, x, y) -> None:
    """One step of shadow-weight QAT: quantize a numpy copy, train, restore plus delta."""
    floats = [kernel.numpy() for kernel in kernels]
    quantized = []
    for kernel, w in zip(kernels, floats, strict=True):
        low, high = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
        scale = (high - low) / 255.0 or 1.0
        zero = np.round(-low / scale)
        q = (np.clip(np.round(w / scale) + zero, 0, 255) - zero) * scale
        kernel.assign(q.astype(w.dtype))
        quantized.append(q)
    net.train_on_batch(x, y)
    for kernel, w, q in zip(kernels, floats, quantized, strict=True):
        kernel.assign((w + (kernel.numpy() - q)).astype(w.dtype))


def measure(threads: int, steps: int, block: int) -> dict[str, float]:
    """Median seconds per step of every variant, at ``threads`` intra-op threads."""
    import keras
    import tensorflow as tf

    from n6qat.train import configure_runtime

    configure_runtime(threads)  # the thread pools and op determinism of the workflow's jobs

    from n6qat import int8_twin
    from n6qat.fake_quant import ActivationRange, QuantizedLayer
    from n6qat.features import FeatureSettings
    from n6qat.model import build_dscnn

    keras.utils.set_random_seed(0)
    settings = FeatureSettings()
    model = build_dscnn(settings, n_classes=8)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(32, *settings.input_shape)).astype(np.float32) ** 4)
    y = tf.constant((rng.uniform(size=(32, 8)) < 0.3).astype(np.float32))

    def copy(frozen_bn: bool):
        # A separate copy each: trainable=False on shared BN layers would affect the twins.
        net = keras.models.clone_model(model)
        net.set_weights(model.get_weights())
        for layer in net.layers:
            if frozen_bn and isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        return net

    tracked = int8_twin.build_qat_model(copy(True), simulate_activations=True)
    calibrated = int8_twin.build_qat_model(copy(True), simulate_activations=True)
    for twin in (tracked, calibrated):
        int8_twin.calibrate_activation_ranges(twin, [x])
    for quantizer in int8_twin.twin_layers(calibrated):
        if isinstance(quantizer, ActivationRange):
            quantizer.tracking = False
    shadow = copy(True)
    kernels = [layer.kernel for layer in shadow.layers if hasattr(layer, "kernel")]
    folded = int8_twin.build_qat_model(copy(True))
    for layer in int8_twin.twin_layers(folded):
        if isinstance(layer, QuantizedLayer):
            layer.float_weights = True
    nets = {
        "float": copy(False),
        BASELINE: copy(True),
        FOLDED: folded,
        "qat-weights": int8_twin.build_qat_model(copy(True)),
        "qat+act-tracked": tracked,
        "qat+act": calibrated,
        "callback": shadow,
    }
    steps_of = {name: (lambda net=net: net.train_on_batch(x, y)) for name, net in nets.items()}
    steps_of["callback"] = lambda: callback_step(shadow, kernels, x, y)
    for net in nets.values():
        net.compile(optimizer=keras.optimizers.Adam(1e-4, clipnorm=1.0),
                    loss="binary_crossentropy")
    for step in steps_of.values():
        for _ in range(3):  # trace, compile, warm up
            step()

    names = list(steps_of)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = 0
    while len(times[BASELINE]) < steps:
        order = names[rounds % len(names):] + names[: rounds % len(names)]
        for name in order:
            for _ in range(block):
                start = time.perf_counter()
                steps_of[name]()  # returns host values: the step has finished
                times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.threads[0], args.steps, args.block)))
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for threads in args.threads:
        cmd = [sys.executable, __file__, "--child", "--threads", str(threads),
               "--steps", str(args.steps), "--block", str(args.block)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            sys.exit(result.stderr[-3000:])
        medians = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"threads={threads}, {args.steps} steps per variant, medians")
        print(f"| variant | ms per step | / float | / {BASELINE} | / {FOLDED} |")
        print("|---|---:|---:|---:|---:|")
        for name, median in medians.items():
            print(f"| {name} | {1000 * median:.1f} | {median / medians['float']:.3f} "
                  f"| {median / medians[BASELINE]:.3f} | {median / medians[FOLDED]:.3f} |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
