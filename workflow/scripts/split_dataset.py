"""Split train/val/test and upsample minority classes (thin adapter over n6qat.dataset)."""

from n6qat.atomic import write_csv
from n6qat.dataset import assign_splits, check_val_split, read_table, upsample_minority
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]) as log:
    p = snakemake.params
    files = read_table(snakemake.input.files)
    split = assign_splits(files, p.val_fraction, p.test_fraction, p.seed)
    check_val_split(split, p.roots["train"])
    upsampled, counts = upsample_minority(split[split["split"] == "train"], p.ratio, p.seed)
    log.info("files per split: %s", split["split"].value_counts().to_dict())
    log.info("class counts before/after upsampling:\n%s", counts.to_string(index=False))
    write_csv(snakemake.output.split, split)
    write_csv(snakemake.output.upsampled, upsampled)
    write_csv(snakemake.output.counts, counts)
