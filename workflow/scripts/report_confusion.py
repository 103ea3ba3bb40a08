"""Confusion matrices and per-class average precision of the compared models."""

import pandas as pd

from n6qat.report_figures import plot_confusions, plot_per_class_ap, save_figure
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    confusions = {
        name: pd.read_csv(path, index_col=0)
        for name, path in zip(
            snakemake.params.confusion_models, snakemake.input.confusion, strict=True
        )
    }
    save_figure(plot_confusions(confusions), snakemake.output.confusion)
    per_class = pd.read_csv(snakemake.input.per_class)
    save_figure(plot_per_class_ap(per_class, snakemake.params.ap_models), snakemake.output.ap)
