"""The run's configuration, defaults filled in, as an HTML table."""

from pathlib import Path

from n6qat.report import config_html
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    Path(snakemake.output[0]).write_text(config_html(snakemake.params.config))
