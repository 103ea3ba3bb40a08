"""Metrics of every model side by side: summary.csv, per_class.csv, confusion matrices."""

import numpy as np

from n6qat.atomic import write_csv
from n6qat.dataset import read_table
from n6qat.evaluate import evaluate_scores
from n6qat.model import read_labels
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]) as log:
    names = snakemake.params.names
    loaded = {name: np.load(path) for name, path in zip(names, snakemake.input.scores, strict=True)}
    summary, per_class, confusions = evaluate_scores(
        {name: data["scores"] for name, data in loaded.items()},
        read_table(snakemake.input.test_chunks),
        read_labels(snakemake.input.labels),
        pooling=snakemake.params.pooling,
        threshold=snakemake.params.threshold,
    )
    for key in ("host_latency_ms_median", "host_latency_ms_p95"):
        summary[key] = [float(d[key]) if key in d else np.nan for d in loaded.values()]
    log.info("summary:\n%s", summary.to_string(index=False))
    write_csv(snakemake.output.summary, summary)
    write_csv(snakemake.output.per_class, per_class)
    for name, path in zip(names, snakemake.output.confusion, strict=True):
        write_csv(path, confusions[name], index=True)
