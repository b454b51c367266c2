"""How the report turns JSON values into cells: tolerant readers of dicts and lists that may be
absent or of another type, and the one cell format."""

from __future__ import annotations

from typing import Any

from app.report import charts
from app.report.charts import finite


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def text_of(value: Any) -> str:
    """Any JSON value as compact text: numbers as cells, dicts as `key: value` pairs, lists
    joined with commas."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {text_of(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(text_of(v) for v in value)
    return cell(value, "plain")


def cell(value: Any, unit: str) -> str:
    """A table cell: the formatted number, the text as is, or an em dash when absent."""
    number = finite(value)
    if number is None:
        return "—" if value is None or isinstance(value, int | float) else str(value)
    if unit == "plain":
        return f"{number:.4g}"
    return charts.format_value(number, unit)
