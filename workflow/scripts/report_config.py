"""The run's configuration, defaults filled in, as an HTML table."""

from n6qat.atomic import write_text
from n6qat.report import config_html
from n6qat.rulelog import rule_logging

with rule_logging(snakemake.log[0]):
    write_text(snakemake.output.page, config_html(snakemake.params.config))
