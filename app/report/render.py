"""Render the job report with the Jinja2 template shipped in this package (autoescaped: every
string from a job, its configs or its warnings is text, never markup). The page's only inline
content is its stylesheet, allowed by hash in the page's Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from importlib.resources import files
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from app.report import view

TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"


@cache
def environment() -> Environment:
    return Environment(
        loader=PackageLoader("app.report", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@cache
def stylesheet() -> str:
    return files("app.report").joinpath("templates", STYLESHEET).read_text(encoding="utf-8")


def content_security_policy() -> str:
    """Nothing loads, nothing runs: only the page's own <style> element (by its sha256)."""
    digest = base64.b64encode(hashlib.sha256(stylesheet().encode()).digest()).decode()
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    )


def render_report(job: dict[str, Any]) -> str:
    """The report page of `job` (a JobRead as JSON)."""
    return (
        environment()
        .get_template(TEMPLATE)
        .render(
            report=view.build(job),
            css=Markup(stylesheet()),  # the package's own file, not job data
            step_columns=[header for header, _, _ in view.STEP_COLUMNS],
        )
    )
