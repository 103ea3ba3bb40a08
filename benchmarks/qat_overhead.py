"""Cost of a QAT train step against a plain float fine-tuning step, measured side by side.

The workflow's default DS-CNN (`n6qat.model.build_dscnn` on the default features),
random batch, batch size and optimizer (Adam); each step is a
compiled Keras train step (`train_on_batch`). Two float baselines: plain fine-tuning
(BatchNormalization in training mode, the default) and fine-tuning with BN frozen in
inference mode as QAT runs it (BN folded into the convs by the twin). The variants run
in alternating blocks within one process so that load from other jobs hits them alike;
medians over many steps are compared.
Run: `.venv/bin/python benchmarks/qat_overhead.py [--threads N] [--jit]`.
"""

import argparse
import time

import numpy as np
import tensorflow as tf

from n6qat.features import FeatureSettings
from n6qat.model import build_dscnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="TF intra-op threads")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    parser.add_argument(
        "--jit", action="store_true", help="XLA-compile every variant (about 7x slower on CPU)"
    )
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    import keras

    from n6qat import int8_twin

    keras.utils.set_random_seed(0)
    settings = FeatureSettings()
    model = build_dscnn(settings, n_classes=8)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(32, *settings.input_shape)).astype(np.float32) ** 4)
    y = tf.constant((rng.uniform(size=(32, 8)) < 0.3).astype(np.float32))

    # Float fine-tuning with BatchNormalization frozen (inference mode, as in QAT):
    # a separate copy, since trainable=False on shared BN layers would affect the twins.
    frozen_bn = keras.models.clone_model(model)
    frozen_bn.set_weights(model.get_weights())
    for layer in frozen_bn.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    variants = {
        "float": model,
        "float-bn-frozen": frozen_bn,
        "qat": int8_twin.build_qat_model(model),
        "qat+act": int8_twin.build_qat_model(model, simulate_activations=True),
    }
    int8_twin.calibrate_activation_ranges(variants["qat+act"], [x])
    for net in variants.values():
        net.compile(
            optimizer=keras.optimizers.Adam(1e-4, clipnorm=1.0),
            loss="binary_crossentropy",
            jit_compile=args.jit,
        )
        for _ in range(3):  # trace, compile, warm up
            net.train_on_batch(x, y)

    times: dict[str, list[float]] = {name: [] for name in variants}
    while len(times["float"]) < args.steps:
        for name, net in variants.items():
            for _ in range(args.block):
                start = time.perf_counter()
                net.train_on_batch(x, y)  # returns host values: the step has finished
                times[name].append(time.perf_counter() - start)

    medians = {name: float(np.median(t)) for name, t in times.items()}
    print(f"threads={args.threads} jit={args.jit} steps/variant={len(times['float'])}")
    print(f"{'variant':16s} {'median ms':>9s}  {'/ float':>9s}  {'/ float-bn-frozen':>19s}")
    for name, median in medians.items():
        print(
            f"{name:16s} {1000 * median:9.1f}  {median / medians['float']:9.3f}"
            f"  {median / medians['float-bn-frozen']:19.3f}"
        )


if __name__ == "__main__":
    main()
