"""Index the audio trees: files.csv, labels.txt, rejected.csv (thin adapter over n6qat.dataset)."""

from pathlib import Path

import pandas as pd

from n6qat.dataset import check_usable, class_labels, index_tree
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]) as log:
    found, rejected = [], []
    for source in ("train", "test"):
        if source not in snakemake.input.keys():
            continue
        files, bad = index_tree(
            Path(snakemake.input[source]),
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
    check_usable(files)
    labels = class_labels(files)
    log.info("%d classes: %s", len(labels), ", ".join(labels))
    files.to_csv(snakemake.output.files, index=False)
    rejected.to_csv(snakemake.output.rejected, index=False)
    Path(snakemake.output.labels).write_text("".join(f"{name}\n" for name in labels))
