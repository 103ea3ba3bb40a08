"""Score the test chunks with one model; time single-chunk host inference for TFLite models."""

import numpy as np

from n6qat.evaluate import host_latency_ms, predict, save_scores
from n6qat.rulelog import rule_logging
from n6qat.train import configure_runtime, load_split

with rule_logging(snakemake.log[0]) as log:
    tflite = snakemake.input.model.endswith(".tflite")
    if not tflite:  # LiteRT alone scores a .tflite: no TensorFlow import (some 7 s of CPU)
        configure_runtime(snakemake.threads)
    features, chunks = load_split(snakemake.input.test, snakemake.input.test_chunks)
    x = np.asarray(features, dtype=np.float32)
    scores = predict(snakemake.input.model, x)
    latency = {}
    if tflite:
        latency = host_latency_ms(snakemake.input.model, x, snakemake.params.latency_runs)
        log.info("host latency per chunk: %s", latency)
    save_scores(snakemake.output.scores, scores, **latency)
