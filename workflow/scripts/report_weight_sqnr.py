"""Per-layer SQNR of each INT8 model's weights against the float kernels it was converted from
(the tables convert_int8 measured), as one table and a figure."""

import pandas as pd

from n6qat.atomic import atomic_path
from n6qat.report_figures import plot_weight_sqnr, save_figure
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    tables = {
        name: pd.read_csv(path, float_precision="round_trip")
        for name, path in zip(snakemake.params.models, snakemake.input.tables, strict=True)
    }
    with atomic_path(snakemake.output.csv) as tmp:
        pd.concat([t.assign(model=n) for n, t in tables.items()]).to_csv(tmp, index=False)
    save_figure(plot_weight_sqnr(tables), snakemake.output.figure)
