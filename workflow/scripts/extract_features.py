"""Compute one split's cached features (thin adapter over n6qat.features)."""

from pathlib import Path

from n6qat.dataset import read_table
from n6qat.features import FeatureSettings, extract_features
from n6qat.model import read_labels
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    split = read_table(snakemake.input.split)
    files = split[split["split"] == snakemake.wildcards.split].reset_index(drop=True)
    extract_features(
        files,
        roots={source: Path(root) for source, root in snakemake.params.roots.items()},
        labels=read_labels(snakemake.input.labels),
        settings=FeatureSettings.from_dict(snakemake.params.settings),
        out_npy=Path(snakemake.output.features),
        out_chunks=Path(snakemake.output.chunks),
        workers=snakemake.threads,
    )
