"""Loss and validation metrics per epoch: pretraining (when this run trained) then QAT."""

import pandas as pd

from n6qat.report_figures import plot_training_curves, save_figure
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]) as log:
    histories = {}
    if snakemake.input.get("pretrain"):
        histories["pretraining"] = pd.read_csv(snakemake.input.pretrain)
    else:
        log.info("no pretraining history: the FP32 model is the user's checkpoint")
    histories["QAT"] = pd.read_csv(snakemake.input.qat)
    save_figure(plot_training_curves(histories), snakemake.output.figure)
