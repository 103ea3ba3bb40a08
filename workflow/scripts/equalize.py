"""Cross-layer equalization of the pretrained model (thin adapter over n6qat.equalize)."""

from n6qat.atomic import atomic_path
from n6qat.convert import calibration_set
from n6qat.equalize import equalize_pairs
from n6qat.model import load_model, save_model
from n6qat.rulelog import rule_logging
from n6qat.train import configure_runtime, load_split

with rule_logging(snakemake.log[0]) as log:
    configure_runtime(snakemake.params.threads)
    calibration = calibration_set(
        *load_split(snakemake.input.train, snakemake.input.train_chunks),
        snakemake.params.calibration,
    )
    model, table = equalize_pairs(
        load_model(snakemake.input.model), calibration, relu6=snakemake.params.mode
    )
    log.info("equalization (relu6=%s):\n%s", snakemake.params.mode, table.to_string())
    save_model(model, snakemake.output.model)
    with atomic_path(snakemake.output.table) as tmp:
        table.to_csv(tmp, index=False)
