"""The workflow report's HTML pages: tables as standalone pages, the rejected files, the config.

Tables become small self-contained HTML pages (inline CSS): Snakemake's report shows
HTML in a frame, while it offers CSV only as a download. The tables themselves are
computed in `n6qat.report_tables`; the figures are drawn in `n6qat.report_figures`.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping

import pandas as pd

from n6qat.report_tables import DELTA_MARK, MISSING

_CSS = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em; color: #222; }
h2 { font-size: 16px; margin: 1em 0 0.5em 0; }
p.note { color: #555; max-width: 60em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr.delta td, tr.delta th { background: #eef2ff; font-style: italic; }
pre { background: #f7f7f7; padding: 0.8em; }
"""


def html_page(title: str, body: str, note: str = "") -> str:
    """A standalone HTML page (inline CSS): the title, an optional note, then `body`."""
    note = f'<p class="note">{html.escape(note)}</p>' if note else ""
    title = html.escape(title)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head>\n<body><h2>{title}</h2>{note}\n{body}\n</body></html>\n"
    )


def html_table(table: pd.DataFrame, title: str, note: str = "", index: bool = True) -> str:
    """`table` as a standalone HTML page."""
    return html_page(title, table_html(table, index), note)


def table_html(table: pd.DataFrame, index: bool = True) -> str:
    """An HTML table: floats with three decimals (signed in "Δ " rows), missing as a dash."""
    head = ([str(table.index.name or "")] if index else []) + [str(c) for c in table.columns]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for name, values in zip(table.index, table.itertuples(index=False), strict=True):
        delta = str(name).startswith(DELTA_MARK)
        first = f"<th>{html.escape(str(name))}</th>" if index else ""
        cells = "".join(f"<td>{_cell(v, delta)}</td>" for v in values)
        shade = ' class="delta"' if delta else ""
        rows.append(f"<tr{shade}>{first}{cells}</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _cell(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:+.3f}" if signed and round(value, 3) != 0 else f"{abs(value):.3f}"
    return html.escape(str(value))


# --- data ----------------------------------------------------------------------------------


def rejected_html(rejected: pd.DataFrame, max_rows: int = 500) -> str:
    """The rejected files with their reasons, counted by reason first."""
    if rejected.empty:
        return html_page("Rejected files", "<p>No file was rejected: every file was used.</p>")
    by_reason = rejected["reason"].value_counts().rename_axis("reason").reset_index(name="files")
    note = f"{len(rejected)} files could not be used; the run left them out."
    if len(rejected) > max_rows:
        note += f" The first {max_rows} are listed; results/index/rejected.csv has all."
    body = (
        table_html(by_reason, index=False)
        + "<h2>Files</h2>"
        + table_html(rejected.head(max_rows), index=False)
    )
    return html_page("Rejected files", body, note)


# --- config --------------------------------------------------------------------------------


def flatten_config(config: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config as {"section.key": text}: strings as they are, the rest as JSON."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat |= flatten_config(value, f"{prefix}{key}.")
        else:
            text = value if isinstance(value, str) and value else json.dumps(value, default=str)
            flat[f"{prefix}{key}"] = text
    return flat


def config_html(config: Mapping) -> str:
    """The run's configuration (defaults filled in): a key/value table, then as YAML."""
    import yaml

    table = pd.DataFrame(flatten_config(config).items(), columns=["key", "value"])
    plain = json.loads(json.dumps(config, default=str))
    as_yaml = html.escape(yaml.safe_dump(plain, sort_keys=False))
    body = f"{table_html(table, index=False)}<h2>As YAML</h2><pre>{as_yaml}</pre>"
    return html_page(
        "Configuration of this run", body, "Every key, with the defaults of the schema filled in."
    )
