"""The README's 60-second tour, run exactly as written against a real server (only the port differs)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from apputil import REPO, write_server_config

SCRIPT = Path(sys.executable).parent / "sched-adapter"


@pytest.mark.skipif(shutil.which("curl") is None, reason="the tour uses curl")
def test_readme_tour_works_as_written(tmp_path: Path, live_server_process) -> None:
    from serverutil import free_port

    tour = re.search(r"## A 60-second tour.*?```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    port = free_port()
    config = write_server_config(tmp_path, port)
    live_server_process.start([str(SCRIPT), "serve", "--config", str(config)], port=port)
    script = tour.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{port}")
    out = subprocess.run(["bash", "-eu", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert '"resourceType": "CapabilityStatement",' in out.stdout
    assert re.match(r"\d+ options$", next(line for line in lines if line.endswith("options")))
    assert any(line.startswith("pending ") for line in lines)
    assert re.search(r"^booked \S+", out.stderr, re.M)
    assert '<Bundle xmlns="http://hl7.org/fhir">' in out.stdout
    assert lines[-2:] == ["cancelled", "400"]
