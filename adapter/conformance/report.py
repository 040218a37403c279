"""Conformance reports: JSON (schema in ``docs/conformance-kit.md``) and a self-contained HTML page.

One row per requirement: its status is ``fail`` when any of its checks failed, ``pass`` when at
least one passed and none failed, ``skip`` when all were skipped.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from collections.abc import Sequence
from typing import Any

from adapter.conformance.kit import FAIL, PASS, SKIP, CheckResult
from adapter.conformance.requirements import level, summary

REPORT_VERSION = 1


def requirement_rows(results: Sequence[CheckResult]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for result in results:
        row = rows.setdefault(
            result.requirement,
            {
                "id": result.requirement,
                "level": level(result.requirement),
                "summary": summary(result.requirement),
                "status": SKIP,
                "checks": [],
            },
        )
        row["checks"].append(result.to_json())
    for row in rows.values():
        statuses = {c["status"] for c in row["checks"]}
        row["status"] = FAIL if FAIL in statuses else PASS if PASS in statuses else SKIP
    return sorted(rows.values(), key=lambda r: _order(r["id"]))


def _order(req: str) -> tuple[int, str, int]:
    group, _, number = req[4:].rpartition("-")
    groups = ["GEN", "115", "116", "117", "118", "APPT", "BNDL"]
    return (groups.index(group) if group in groups else len(groups), group, int(number) if number.isdigit() else 0)


def to_json(results: Sequence[CheckResult], *, base_url: str, software: Any = None) -> dict[str, Any]:
    rows = requirement_rows(results)
    counts = {status: sum(1 for r in rows if r["status"] == status) for status in (PASS, FAIL, SKIP)}
    return {
        "reportVersion": REPORT_VERSION,
        "tool": "sched-adapter conformance",
        "server": {"base": base_url, "software": software},
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "summary": {
            "requirements": counts,
            "checks": {status: sum(1 for r in results if r.status == status) for status in (PASS, FAIL, SKIP)},
        },
        "requirements": rows,
    }


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1b1b}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ccc;padding:.4rem;text-align:left;vertical-align:top}
.pass{color:#0a6b2c;font-weight:bold}.fail{color:#b00020;font-weight:bold}.skip{color:#6b6b6b}
pre{white-space:pre-wrap;word-break:break-all;background:#f5f5f5;padding:.5rem;max-height:30rem;overflow:auto}
summary{cursor:pointer}
"""


def to_html(report: dict[str, Any]) -> str:
    e = html.escape
    counts = report["summary"]["requirements"]
    rows = []
    for row in report["requirements"]:
        details = []
        for check in row["checks"]:
            inner = [f"<p><span class='{e(check['status'])}'>{e(check['status'].upper())}</span> {e(check['title'])}"]
            if check["message"]:
                inner.append(f": {e(check['message'])}")
            inner.append("</p>")
            for ev in check["evidence"]:
                req, resp = ev["request"], ev["response"]
                inner.append(f"<p><code>{e(req['method'])} {e(req['url'])}</code> &rarr; {e(str(resp['status']))}</p>")
                if req.get("body"):
                    inner.append(f"<pre>{e(str(req['body']))}</pre>")
                if resp.get("body"):
                    inner.append(f"<pre>{e(str(resp['body']))}</pre>")
            details.append("".join(inner))
        evidence = f"<details><summary>{len(row['checks'])} check(s)</summary>{''.join(details)}</details>"
        rows.append(
            f"<tr id='{e(row['id'])}'><td><strong>{e(row['id'])}</strong></td><td>{e(row['level'])}</td>"
            f"<td>{e(row['summary'])}</td><td class='{e(row['status'])}'>{e(row['status'].upper())}</td>"
            f"<td>{evidence}</td></tr>"
        )
    server = report["server"]
    software = server.get("software") or {}
    name = f"{software.get('name', '')} {software.get('version', '')}".strip() if isinstance(software, dict) else ""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>IHE ITI Scheduling conformance: {e(server['base'])}</title><style>{_STYLE}</style></head><body>"
        f"<h1>IHE ITI Scheduling conformance report</h1>"
        f"<p>Server <code>{e(server['base'])}</code> {e(name)}; generated {e(report['generated'])} by "
        f"{e(report['tool'])}.</p>"
        f"<p><span class='pass'>{counts['pass']} passed</span>, <span class='fail'>{counts['fail']} failed</span>, "
        f"<span class='skip'>{counts['skip']} skipped</span> requirements.</p>"
        "<table><thead><tr><th scope='col'>Requirement</th><th scope='col'>Level</th><th scope='col'>What</th>"
        "<th scope='col'>Result</th><th scope='col'>Evidence</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></body></html>\n"
    )


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"
