"""Index the audio trees: files.csv, labels.txt, rejected.csv (thin adapter over n6qat.dataset)."""

from pathlib import Path

import pandas as pd

from n6qat.atomic import write_csv, write_text
from n6qat.dataset import check_trees, class_labels, index_tree
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]) as log:
    roots = {s: Path(snakemake.input[s]) for s in ("train", "test") if s in snakemake.input.keys()}
    found, rejected = [], []
    for source, root in roots.items():
        files, bad = index_tree(
            root,
            source,
            negatives=snakemake.params.negatives,
            min_duration=snakemake.params.min_duration,
            config_key=f"data.{source}",
        )
        log.info("%s tree: %d usable files, %d rejected", source, len(files), len(bad))
        found.append(files)
        rejected.append(bad)
    files = pd.concat(found, ignore_index=True)
    rejected = pd.concat(rejected, ignore_index=True)
    for row in rejected.itertuples():
        log.warning("rejected %s/%s: %s", row.source, row.path, row.reason)
    check_trees(files, rejected, roots)
    labels = class_labels(files)
    log.info("%d classes: %s", len(labels), ", ".join(labels))
    write_csv(snakemake.output.files, files)
    write_csv(snakemake.output.rejected, rejected)
    write_text(snakemake.output.labels, "".join(f"{name}\n" for name in labels))
