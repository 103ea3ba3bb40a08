"""Per-layer SQNR of each INT8 model's weights against the float kernels it was converted from."""

from pathlib import Path

import pandas as pd

from n6qat.atomic import atomic_path
from n6qat.model import load_model
from n6qat.report_figures import plot_weight_sqnr, save_figure
from n6qat.report_tables import folded_float_kernels, weight_sqnr
from n6qat.rulelog import rule_logging
from n6qat.tflite_inspect import tflite_weights
from n6qat.train import configure_runtime

with rule_logging(snakemake.log[0]) as log:
    configure_runtime(snakemake.threads)
    tables = {}
    for name, keras_path, tflite_path in zip(
        snakemake.params.models, snakemake.input.keras, snakemake.input.tflite, strict=True
    ):
        kernels = folded_float_kernels(load_model(keras_path))
        table = weight_sqnr(kernels, tflite_weights(Path(tflite_path).read_bytes()))
        log.info(
            "%s: %d of %d float kernels paired\n%s",
            name,
            len(table),
            len(kernels),
            table.to_string(index=False),
        )
        tables[name] = table
    with atomic_path(snakemake.output.csv) as tmp:
        pd.concat([t.assign(model=n) for n, t in tables.items()]).to_csv(tmp, index=False)
    save_figure(plot_weight_sqnr(tables), snakemake.output.figure)
