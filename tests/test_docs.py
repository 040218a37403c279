"""The documentation inside the project (issue 13, item 6): the three docs exist, every cited decision and
requirement has its entry, and nothing points outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
ANCHOR = re.compile(r'<a id="(d\d+[a-z]?)"></a>')


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    suffixes = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".txt", ".lock", ".cfg", ".ini", ""}
    files = [REPO / line for line in out.splitlines() if line and Path(line).suffix in suffixes]
    return [f for f in files if f.is_file() and not f.is_symlink() and f.stat().st_size < 2_000_000]


def _decision_anchors() -> set[str]:
    return set(ANCHOR.findall((DOCS / "conformance.md").read_text(encoding="utf-8")))


def test_issue13_6_readme_links_the_three_docs() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in ("architecture.md", "conformance.md", "requirements.md"):
        assert (DOCS / name).is_file()
        assert f"](docs/{name})" in readme


def test_issue13_6_every_decision_the_code_cites_has_a_numbered_section() -> None:
    anchors = _decision_anchors()
    cited: set[str] = set()
    for path in (REPO / "adapter").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        # "DESIGN 9", "DESIGN 9a", "DESIGN 4-10", "DESIGN 9, 13", "DESIGN 11-13"
        for group in re.findall(r"DESIGN ((?:\d+[a-z]?(?:-\d+)?(?:, )?)+)", text):
            for part in re.findall(r"\d+[a-z]?(?:-\d+)?", group):
                if "-" in part:
                    lo, hi = part.split("-")
                    cited.update(f"d{n}" for n in range(int(lo), int(hi) + 1))
                else:
                    cited.add(f"d{part}")
        cited.update(re.findall(r"docs/conformance\.md#(d\d+[a-z]?)", text))
    assert cited - anchors == set()
    # The numbering is the project's D1-D28 (with 9a and 15a-c), none skipped.
    assert {f"d{n}" for n in range(1, 29)} | {"d9a", "d15a", "d15b", "d15c"} == anchors


def test_issue13_6_every_link_into_conformance_md_resolves() -> None:
    anchors = _decision_anchors()
    for path in _tracked_text_files():
        for target in re.findall(r"conformance\.md#(d\d+[a-z]?)\b", path.read_text(encoding="utf-8", errors="replace")):
            assert target in anchors, f"{path.relative_to(REPO)}: conformance.md#{target} does not exist"


def test_issue13_6_requirement_ids_used_by_tests_are_in_the_catalogue() -> None:
    catalogue = set(re.findall(r"^\| (REQ-[A-Z0-9]+-\d+) \|", (DOCS / "requirements.md").read_text(), re.M))
    used: set[str] = set()
    for path in (REPO / "tests").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        used.update(re.findall(r"REQ-[A-Z0-9]+-\d+", text))
        used.update(
            "REQ-" + m.group(1).upper() + "-" + m.group(2) for m in re.finditer(r"test_req_([a-z0-9]+)_(\d+)", text)
        )
    assert used - catalogue == set()


def test_issue13_6_no_file_points_outside_the_repository() -> None:
    # Bracketed characters keep this file's own source from spelling the paths it looks for.
    outside = re.compile(r"/w[o]rk/|\.\.[/]shared|shared[/](DESIGN|REQUIREMENTS|IMPLEMENTER-NOTES|ANCHOR-PATTERNS)")
    offenders = [
        str(path.relative_to(REPO))
        for path in _tracked_text_files()
        if path != Path(__file__).resolve() and outside.search(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert offenders == []
