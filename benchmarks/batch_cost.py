"""Cost per example of the pretraining and QAT train steps at several batch sizes.

The workflow's default DS-CNN (`n6qat.model.build_dscnn` on the default features), random
inputs, 8 classes. ``pretrain``: the fused-BN pretraining twin (`n6qat.fused_batch_norm`)
with the pretraining optimizer; ``qat``: the INT8 twin with activations on calibrated
ranges (the workflow's default QAT step). Blocks of steps alternate between the
(step, batch) pairs in an order rotated every round; medians of milliseconds per
example. Every thread count runs in its own process (TF fixes its thread pools at start).

A larger batch is cheaper per example on this CPU, but it is not a free speed-up: with
half the steps the pretraining's BatchNormalization statistics lag further behind (see
the README, "Batch 64").

    .venv/bin/python benchmarks/batch_cost.py                  # threads 2 and 1
    .venv/bin/python benchmarks/batch_cost.py --batches 32 64 --threads 2
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


def measure(threads: int, batches: list[int], rounds: int, block: int) -> dict[str, float]:
    """Median milliseconds per example of every (step, batch) pair."""
    from n6qat.train import compile_classifier, configure_runtime

    configure_runtime(threads)  # the thread pools and op determinism of the workflow's jobs

    import keras
    import tensorflow as tf

    from n6qat import int8_twin
    from n6qat.fake_quant import ActivationRange
    from n6qat.features import FeatureSettings
    from n6qat.fused_batch_norm import fused_trainer
    from n6qat.model import build_dscnn

    keras.utils.set_random_seed(0)
    settings = FeatureSettings()
    model = build_dscnn(settings, n_classes=8)
    frozen = keras.models.clone_model(model)
    frozen.set_weights(model.get_weights())
    for layer in frozen.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    trainer = fused_trainer(model)
    compile_classifier(model, 0.003, 1000)
    compile_classifier(trainer, 0.003, 1000, optimizer=model.optimizer)

    rng = np.random.default_rng(0)
    x = {b: tf.constant(rng.uniform(size=(b, *settings.input_shape)).astype(np.float32) ** 4)
         for b in batches}  # fmt: skip
    y = {b: tf.constant((rng.uniform(size=(b, 8)) < 0.3).astype(np.float32)) for b in batches}
    qat = int8_twin.build_qat_model(frozen, simulate_activations=True)
    int8_twin.calibrate_activation_ranges(qat, [x[batches[0]]])
    for quantizer in int8_twin.twin_layers(qat):
        if isinstance(quantizer, ActivationRange):
            quantizer.tracking = False
    qat.compile(optimizer=keras.optimizers.Adam(2e-5, clipnorm=1.0), loss="binary_crossentropy")

    pairs = [(name, net, b) for name, net in (("pretrain", trainer), ("qat", qat))
             for b in batches]  # fmt: skip
    for _, net, b in pairs:
        for _ in range(3):  # trace (one function per batch shape), warm up
            net.train_on_batch(x[b], y[b])
    times: dict[str, list[float]] = {f"{name} {b}": [] for name, _, b in pairs}
    for round_ in range(rounds):
        for name, net, b in pairs[round_ % len(pairs):] + pairs[: round_ % len(pairs)]:
            for _ in range(block):
                start = time.perf_counter()
                net.train_on_batch(x[b], y[b])  # returns host values: the step has finished
                times[f"{name} {b}"].append(1000 * (time.perf_counter() - start) / b)
    return {key: float(np.median(t)) for key, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--rounds", type=int, default=12, help="rotations of all pairs")
    parser.add_argument("--block", type=int, default=4, help="steps per alternating block")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.threads[0], args.batches, args.rounds, args.block)))
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    base = args.batches[0]
    for threads in args.threads:
        cmd = [sys.executable, __file__, "--child", "--threads", str(threads),
               "--rounds", str(args.rounds), "--block", str(args.block),
               "--batches", *map(str, args.batches)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            sys.exit(result.stderr[-3000:])
        medians = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"threads={threads}, medians of ms per example")
        print(f"| step | batch | ms per example | / batch {base} |")
        print("|---|---:|---:|---:|")
        for key, median in medians.items():
            name, batch = key.split()
            print(f"| {name} | {batch} | {median:.3f} | {median / medians[f'{name} {base}']:.2f} |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
