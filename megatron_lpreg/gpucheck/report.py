"""The GPU check's report: one dict per section, written as ``report.json`` and a readable ``report.md``.

A section's dict always has ``"status"``: ``"ok"`` (every check passed), ``"failed"`` (with ``"error"``) or
``"skipped"`` (with ``"reason"``), next to the numbers it measured. ``report.json`` holds the sections at the top
level (``report["op_parity"]["status"]``), plus ``"environment"`` (what ran where) and ``"ok"`` (every section ok).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SECTION_NAMES = ("op_parity", "op_speed", "model_parity", "train_steps")
"""The default sections, in the order they run and are reported."""
OPTIONAL_SECTIONS = ("rollout",)
"""Sections that run only when named (``--sections``): ``rollout`` needs SGLang installed (gpucheck/rollout.py)."""
ALL_SECTIONS = SECTION_NAMES + OPTIONAL_SECTIONS
STATUSES = ("ok", "failed", "skipped")
RESERVED_KEYS = ("environment", "ok")


def section_ok(numbers: Mapping[str, Any]) -> dict[str, Any]:
    """A passed section: ``{"status": "ok", **numbers}``."""
    return {"status": "ok", **numbers}


def section_failed(error: str, numbers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A failed section, with the error text and whatever was measured before it failed."""
    return {"status": "failed", "error": error, **(numbers or {})}


def section_skipped(reason: str) -> dict[str, Any]:
    """A section that did not run, and why."""
    return {"status": "skipped", "reason": reason}


def _check_section(name: str, section: Mapping[str, Any]) -> None:
    status = section.get("status")
    if status not in STATUSES:
        raise ValueError(f"section {name!r}: status={status!r} must be one of {STATUSES}")
    needed = {"failed": "error", "skipped": "reason"}.get(status)
    if needed and not section.get(needed):
        raise ValueError(f"section {name!r} has status {status!r} but no {needed!r} text")


def _json_safe(value: Any) -> Any:
    """NaN/inf become strings (strict JSON has no such numbers); containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def build_report(sections: Mapping[str, Mapping[str, Any]], environment: Mapping[str, Any]) -> dict[str, Any]:
    """The report dict: sections at the top level, then ``environment`` and ``ok``.

    Raises:
        ValueError: a section name clashes with a reserved key, or a section's status is missing or unknown.
    """
    report: dict[str, Any] = {}
    for name, section in sections.items():
        if name in RESERVED_KEYS:
            raise ValueError(f"section name {name!r} is reserved (report keys {RESERVED_KEYS})")
        _check_section(name, section)
        report[name] = _json_safe(dict(section))
    report["environment"] = _json_safe(dict(environment))
    report["ok"] = bool(sections) and all(s["status"] == "ok" for s in sections.values())
    return report


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value).replace("\n", " ").replace("|", "\\|")


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: environment, a status table, then each section's numbers."""
    env = report.get("environment", {})
    sections = [name for name in report if name not in RESERVED_KEYS]
    lines = ["# GPU check report", "", f"Overall: **{'ok' if report.get('ok') else 'NOT ok'}**", "",
             "## Environment", ""]
    lines += [f"- {key}: {_format_value(value)}" for key, value in env.items()]
    lines += ["", "## Sections", "", "| section | status | detail |", "| --- | --- | --- |"]
    for name in sections:
        section = report[name]
        detail = section.get("error") or section.get("reason") or ""
        lines.append(f"| {name} | {section['status']} | {_format_value(detail)[:200]} |")
    for name in sections:
        lines += ["", f"### {name}", ""]
        lines += [f"- {key}: {_format_value(value)}" for key, value in report[name].items() if key != "status"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, sections: Mapping[str, Mapping[str, Any]],
                 environment: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``out_dir/report.json`` and ``out_dir/report.md`` (each atomically); return the report dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(sections, environment)
    for name, text in (("report.json", json.dumps(report, indent=2, allow_nan=False) + "\n"),
                       ("report.md", render_markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    logger.info("wrote %s and %s", out / "report.json", out / "report.md")
    return report
