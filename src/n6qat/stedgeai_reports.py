"""Parse what `stedgeai` writes: its text reports and console output (the older v2.x and
newer v3.x layouts) and network_c_info.json, into plain dicts.

Parsing is tolerant: a block the report does not hold gives None (or an empty list),
never an exception.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def error_lines(text: str) -> list[dict]:
    """The tool's `E<nnn>(<Class>): message` lines and validation timeouts."""
    found = []
    for line in text.splitlines():
        match = re.search(r"\b(E\d{3})\((\w+)\):?\s*(.*)", line)
        if match:
            found.append(
                {
                    "code": match[1],
                    "kind": match[2],
                    "message": match[3].strip(),
                    "line": line.strip(),
                }
            )
        elif re.search(r"\bTimeout\b.*\bduring validation\b", line, re.IGNORECASE):
            found.append(
                {"code": "Timeout", "kind": "", "message": line.strip(), "line": line.strip()}
            )
    return found


def parse_version(text: str) -> str | None:
    """`3.0.0-20426 123672867`, `2.0.0-20049`, ... from a header or `--version` output."""
    match = re.search(r"(?<![\w.])v?(\d+\.\d+\.\d+[\w.-]*(?:[ \t]+[0-9a-f]{6,}\b)?)", text)
    return match[1] if match else None


def parse_header(text: str) -> dict:
    """Tool name and version, creation date and the command line from a report's header."""
    lines = [line.strip() for line in text.splitlines() if line.strip()][:5]
    tool = next(
        (line for line in lines if re.match(r"[A-Za-z]", line) and parse_version(line)), None
    )
    return {
        "tool": tool,
        "version": parse_version(tool) if tool else None,
        "created": _field(text, r"Created date"),
        "parameters": _field(text, r"Parameters"),
    }


def _field(text: str, name: str) -> str | None:
    match = re.search(rf"^\s*{name}\s*:\s*(.*?)\s*$", text, re.MULTILINE)
    return match[1] if match else None


def _first_int(text: str | None) -> int | None:
    """The first integer of a field ("4,210,944", "231,104 B (225.69 KiB) ...")."""
    if text is None:
        return None
    match = re.search(r"-?\d[\d,]*", text)
    return int(match[0].replace(",", "")) if match else None


def parse_summary(text: str) -> dict:
    """The summary block (model_fmt, params, macc, weights, activations, ram); None-filled."""
    params = _field(text, r"params #")
    return {
        "model_fmt": _field(text, r"model_fmt"),
        "params": _first_int(params),
        "macc": _first_int(_field(text, r"macc")),
        "weights_bytes": _first_int(_field(text, r"weights \(ro\)")),
        "activations_bytes": _first_int(_field(text, r"activations \(rw\)")),
        "ram_total_bytes": _first_int(_field(text, r"ram \(total\)")),
    }


def size_bytes(text: str) -> int | None:
    """ "294.000 kB" -> 301056 (the tool's kB and MB are 1024-based)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kKMG]?)i?B\s*", text or "")
    if not match:
        return None
    return int(round(float(match[1]) * _UNITS[match[2].upper()]))


_SIZE = r"[\d.]+\s*[kKMG]?i?B"
_POOL_LINE = re.compile(
    rf"^\s*(?P<name>[A-Za-z][\w.]*)\s+\[(?P<start>0x[0-9A-Fa-f]+)\s*-\s*(?P<end>0x[0-9A-Fa-f]+)\]:"
    rf"\s*(?P<used>{_SIZE})\s*/\s*(?P<size>{_SIZE})\s*\(\s*(?P<percent>[\d.]+)\s*%\s*used\)"
    rf"(?:.*?weights:\s*(?P<weights>{_SIZE}).*?activations:\s*(?P<activations>{_SIZE}))?"
)
_TOTAL_LINE = re.compile(
    rf"^\s*Total:\s*(?P<used>{_SIZE})\s*--\s*weights:\s*(?P<weights>{_SIZE})"
    rf"\s*activations:\s*(?P<activations>{_SIZE})"
)


def parse_memory_pools(text: str) -> list[dict]:
    """Rows of "Memory usage information": name, address range, size, use, weights and
    activations in bytes."""
    pools = []
    for line in text.splitlines():
        match = _POOL_LINE.match(line)
        if match:
            pools.append(
                {
                    "name": match["name"],
                    "address": match["start"],
                    "end": match["end"],
                    "size_bytes": size_bytes(match["size"]),
                    "used_bytes": size_bytes(match["used"]),
                    "used_percent": float(match["percent"]),
                    "weights_bytes": size_bytes(match["weights"] or ""),
                    "activations_bytes": size_bytes(match["activations"] or ""),
                }
            )
    return pools


def parse_memory_total(text: str) -> dict | None:
    match = next(filter(None, map(_TOTAL_LINE.match, text.splitlines())), None)
    if match is None:
        return None
    return {key: size_bytes(match[key]) for key in ("used", "weights", "activations")}


def parse_epochs(text: str) -> dict | None:
    """Epoch counts and the ops that run in software, in either report layout."""
    rows = _epoch_rows(text)
    newer = re.search(r"^\s*Total number of epochs\s+(\d+)", text, re.MULTILINE)
    older = re.search(
        r"Total number of epochs:\s*(\d+)(?:\s+of which\s+(\d+)\s+implemented in software)?",
        text,
    )
    if newer:
        counts = {
            "total": int(newer[1]),
            "software": _int_after(text, r">>\s*pure software \(SW\) epochs"),
            "hybrid": _int_after(text, r">>\s*hybrid epochs[^\n]*?\)"),
            "hardware": _int_after(text, r">>\s*pure hardware \(HW or EC\) epochs"),
            "layout": "v3",
        }
    elif older:
        total = int(older[1])
        software = int(older[2]) if older[2] else _kind_count(rows, "SW")
        hybrid = _kind_count(rows, "HYBRID") if rows else None
        counts = {
            "total": total,
            "software": software,
            "hybrid": hybrid,
            "hardware": total - software - (hybrid or 0) if software is not None else None,
            "layout": "v2",
        }
    elif rows:
        counts = {"total": None, "software": _kind_count(rows, "SW"), "hybrid": None}
        counts.update(hardware=None, layout=None)
    else:
        return None
    counts["software_ops"] = [r for r in rows if r["kind"] == "SW"]
    counts["hybrid_ops"] = [r for r in rows if r["kind"] == "HYBRID"]
    return counts


def _int_after(text: str, label: str) -> int | None:
    match = re.search(label + r"\s+(\d+)", text)
    return int(match[1]) if match else None


def _kind_count(rows: list[dict], kind: str) -> int:
    return sum(r["kind"] == kind for r in rows)


def _epoch_rows(text: str) -> list[dict]:
    """`| epoch_31 |  SW  | Softmax |` (v3) and `epoch 31  -SW-  ( Softmax )` (v2) rows."""
    rows = []
    for line in text.splitlines():
        match = re.match(r"^\s*\|\s*epoch_(\d+)\s*\|\s*([A-Za-z/+ ]+?)\s*\|\s*(.*?)\s*\|", line)
        match = match or re.match(
            r"^\s*epoch\s+(\d+)\s+-([A-Za-z/+]+)-\s*(?:\(\s*(.*?)\s*\))?", line
        )
        if match:
            kind = _epoch_kind(match[2])
            rows.append({"epoch": int(match[1]), "kind": kind, "op": match[3] or None})
    return rows


def _epoch_kind(tag: str) -> str:
    tag = tag.strip().upper()
    if tag.startswith("HY") or ("SW" in tag and ("HW" in tag or "EC" in tag)):
        return "HYBRID"
    return tag


def _metric_value(token: str) -> float | None:
    token = token.strip().rstrip("%")
    if token.lower() in {"n.a.", "n.a", "na", "nan", "-", ""}:
        return None
    try:
        return float(token)
    except ValueError:
        return None


def parse_validation_table(text: str) -> list[dict]:
    """Every row of every "Evaluation report" table (TARGET/HOST c-model, original model,
    X-cross, ...): metrics by column name, `acc` in percent, `n.a.` as None."""
    rows: list[dict] = []
    columns, in_rows = None, False
    for line in text.splitlines():
        tokens = line.split()
        if tokens[:1] == ["Output"] and "rmse" in tokens:
            end = tokens.index("tensor") if "tensor" in tokens else len(tokens)
            columns, in_rows = tokens[1:end], False
        elif columns is None or (tokens and set(line.strip()) <= {"-", "="}):
            continue  # outside a table, or a rule line inside one
        elif not tokens:
            columns = None if in_rows else columns  # a blank line after the rows ends them
        else:
            row = _table_row(line, columns)
            if row is None:
                columns = None
            else:
                rows.append(row)
                in_rows = True
    return rows


def _table_row(line: str, columns: list[str]) -> dict | None:
    match = re.match(r"^\s*(?P<name>[A-Za-z][\w .-]*?)\s*#(?P<index>\d+)\s+(?P<rest>.*)$", line)
    if not match:
        return None
    cells = match["rest"].split(None, len(columns))
    values = cells[: len(columns)]
    row = {
        "row": f"{match['name']} #{match['index']}",
        "kind": match["name"],
        "output": int(match["index"]),
    }
    row.update({name: _metric_value(v) for name, v in zip(columns, values, strict=False)})
    row.update({name: None for name in columns[len(values) :]})
    row["tensor"] = cells[len(columns)] if len(cells) > len(columns) else None
    return row


def parse_compact_metrics(text: str) -> list[dict]:
    """The one-line form `acc=n.a. rmse=... cos=...`, one dict per line that has it."""
    found = []
    for line in text.splitlines():
        if "rmse=" not in line:
            continue
        pairs = re.findall(r"\b(acc|rmse|mae|l2r|mean|std|nse|cos)=(\S+)", line)
        label = line.split(pairs[0][0] + "=", 1)[0].strip(" :-") if pairs else ""
        entry = {name: _metric_value(value.rstrip(",")) for name, value in pairs}
        found.append({"label": label or None, **entry})
    return found


def parse_profiling(text: str) -> dict | None:
    """Samples and duration per sample (mean, min, max, std) of an on-target run."""
    samples = _first_int(_field(text, r"nb sample\(s\)"))
    duration = re.search(
        r"^\s*duration\s*:\s*([\d.]+)\s*ms by sample(?:\s*\(([\d.]+)/([\d.]+)/([\d.]+)\))?",
        text,
        re.MULTILINE,
    )
    if samples is None and duration is None:
        return None
    groups = duration.groups() if duration else (None,) * 4
    mean, low, high, std = (float(v) if v else None for v in groups)
    return {"samples": samples, "ms_per_sample": mean, "ms_min": low, "ms_max": high, "ms_std": std}


def parse_report(text: str) -> dict:
    """Everything one text report (or the console output) holds."""
    return {
        "header": parse_header(text),
        "summary": parse_summary(text),
        "memory_pools": parse_memory_pools(text),
        "memory_total": parse_memory_total(text),
        "epochs": parse_epochs(text),
        "validation": parse_validation_table(text),
        "validation_compact": parse_compact_metrics(text),
        "profiling": parse_profiling(text),
        "errors": error_lines(text),
    }


def parse_c_info(data: dict) -> dict:
    """Version, memory footprint, pools and node mapping from network_c_info.json (2.0)."""
    graphs = data.get("graphs") or [{}]
    nodes = graphs[0].get("nodes") or [] if isinstance(graphs[0], dict) else []
    mapping: dict[str, int] = {}
    for node in nodes:
        kind = node.get("mapping", "NODE_UNDEF") if isinstance(node, dict) else "NODE_UNDEF"
        mapping[kind] = mapping.get(kind, 0) + 1
    return {
        "schema_version": data.get("json_schema_version"),
        "version": _c_info_version(data),
        "memory_footprint": data.get("memory_footprint"),
        "memory_pools": [
            _c_info_pool(p) for p in data.get("memory_pools") or [] if isinstance(p, dict)
        ],
        "node_mapping": mapping,
        "software_nodes": _node_names(nodes, "NODE_SW"),
        "hybrid_nodes": _node_names(nodes, "NODE_SW_HW"),
    }


def _node_names(nodes: list, mapping: str) -> list[str]:
    return [n.get("name") for n in nodes if isinstance(n, dict) and n.get("mapping") == mapping]


def _c_info_version(data: dict) -> str | None:
    try:
        version = data["environment"]["tools"][0]["version"]
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(version, dict):
        parts = [version.get(k) for k in ("major", "minor", "micro")]
        text = ".".join(str(p) for p in parts if p is not None)
        return text + (f"-{version['extra']}" if version.get("extra") else "") or None
    if isinstance(version, list):
        return ".".join(map(str, version))
    return str(version)


def _c_info_pool(pool: dict) -> dict:
    return {
        key: pool.get(key) for key in ("name", "size_bytes", "used_size_bytes", "address", "rights")
    }
