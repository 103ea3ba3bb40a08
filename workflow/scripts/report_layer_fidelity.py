"""Where the INT8 error enters: per-tensor cosine and SQNR of each INT8 model, one figure."""

import pandas as pd

from n6qat.report_figures import plot_layer_fidelity, save_figure
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    tables = {
        name: pd.read_csv(path)
        for name, path in zip(snakemake.params.models, snakemake.input.csv, strict=True)
    }
    save_figure(plot_layer_fidelity(tables), snakemake.output.figure)
