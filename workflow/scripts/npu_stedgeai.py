"""One stedgeai step (analyze, generate or validate) for one model, when the tool is found
(thin adapter over n6qat.stedgeai.run_step)."""

from pathlib import Path

from n6qat.rulelog import rule_logging
from n6qat.stedgeai import StedgeaiSettings, run_step

with rule_logging(snakemake.log[0]):
    validation = snakemake.input.get("validation")
    run_step(
        snakemake.params.step,
        model=Path(snakemake.input.model),
        settings=StedgeaiSettings.from_dict(snakemake.params.stedgeai),
        folder=Path(snakemake.output.folder),
        validation_npz=Path(validation) if validation else None,
        timeout_s=snakemake.resources.runtime * 60,
    )
