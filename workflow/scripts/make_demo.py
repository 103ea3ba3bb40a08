"""Generate the synthetic demo dataset (thin adapter over n6qat.demo)."""

from pathlib import Path

from n6qat.demo import generate_demo_dataset
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]) as log:
    out_dir = Path(snakemake.output.manifest).parent
    manifest = generate_demo_dataset(
        out_dir, seed=snakemake.params.seed, scale=snakemake.params.scale,
        workers=snakemake.threads,
    )
    log.info("demo dataset: %d files in %s", len(manifest), out_dir)
