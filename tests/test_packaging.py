"""The product as a user installs it (issue 13, items 1-3): a wheel, a fresh virtualenv, an empty directory.

Nothing is downloaded: the wheel is built with the setuptools of the test environment (``--no-build-isolation``),
installed with ``--no-deps --no-index``, and the fresh virtualenv sees the already installed dependencies through
a ``.pth`` line naming this environment's site-packages (a plain path line: the editable install's own ``.pth``
hooks there are not run, so ``adapter`` can only come from the wheel).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serverutil import ProcessServers, free_port

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CLEAN_ENV: dict[str, str | None] = {"PYTHONPATH": None, "SCHED_CONFIG_FILE": None}


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def script(self) -> Path:
        return self.venv / "bin" / "sched-adapter"


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{args}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def _start_demo(servers: ProcessServers, installed: Installed, cwd: Path, *extra: str | Path) -> tuple[str, int]:
    """``sched-adapter demo`` of the installed wheel, started in ``cwd``; (base URL, port)."""
    port = free_port()
    argv = [str(installed.script), "demo", "--port", str(port), *(str(e) for e in extra)]
    servers.start(argv, env=CLEAN_ENV, port=port, cwd=cwd)
    return f"http://127.0.0.1:{port}", port


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # a copy, so the build leaves no build/ or *.egg-info in the working tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "adapter", src / "adapter", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src)
    (wheel,) = dist.glob("sched_adapter-*.whl")
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)
    site = Path(
        _run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n", encoding="utf-8")
    return Installed(venv, wheel)


def test_issue13_1_wheel_carries_the_package_data(installed: Installed) -> None:
    import zipfile

    names = set(zipfile.ZipFile(installed.wheel).namelist())
    demo = ("config.toml", "mapping.yaml", "hl7v2-mapping.yaml", "schema.sql")
    for data in (f"adapter/demo/{name}" for name in demo):
        assert data in names
    assert "adapter/fhir/r4_elements.json" in names
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)


def test_issue13_1_adapter_is_imported_from_the_wheel(installed: Installed, tmp_path: Path) -> None:
    out = _run(installed.python, "-c", "import adapter, adapter.cli; print(adapter.__file__)", cwd=tmp_path)
    assert Path(out.stdout.strip()).is_relative_to(installed.venv), out.stdout


def test_issue13_1_installed_demo_serves_metadata_from_an_empty_directory(
    installed: Installed, tmp_path: Path, live_server_process: ProcessServers
) -> None:
    here = tmp_path / "empty"
    here.mkdir()
    base, _ = _start_demo(live_server_process, installed, here)
    r = httpx.get(f"{base}/fhir/metadata", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["resourceType"] == "CapabilityStatement"
    # The demo's data lands under the working directory, nothing next to the installed package.
    assert (here / "var" / "demo" / "clinicware.sqlite").is_file()
    assert (here / "var" / "demo" / "signing-secret").is_file()
    found = httpx.get(f"{base}/fhir/Practitioner/SPEARSB", timeout=30)
    assert found.status_code == 200, found.text


def test_issue13_1_installed_hl7v2_demo_serves_metadata_from_an_empty_directory(
    installed: Installed, tmp_path: Path, live_server_process: ProcessServers
) -> None:
    """The HL7v2 demo reads its mapping from the wheel's package data, not from a source tree."""
    here = tmp_path / "empty"
    here.mkdir()
    base, _ = _start_demo(live_server_process, installed, here, "--backend", "hl7v2", "--mllp-port", str(free_port()))
    r = httpx.get(f"{base}/fhir/metadata", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["resourceType"] == "CapabilityStatement"
    assert (here / "var" / "demo-hl7v2" / "adapter-state.sqlite").is_file()
    shipped = _run(
        installed.python,
        "-c",
        "from adapter.testing.hl7_demo import MAPPING_RESOURCE; print(MAPPING_RESOURCE)",
        cwd=here,
    ).stdout.strip()
    assert Path(shipped).is_relative_to(installed.venv)
    # The documented place in the source tree is the same file.
    assert (REPO / "mappings" / "hl7v2-demo.yaml").read_bytes() == Path(shipped).read_bytes()


def test_issue13_1_demo_data_dir_option(
    installed: Installed, tmp_path: Path, live_server_process: ProcessServers
) -> None:
    data = tmp_path / "elsewhere"
    base, _ = _start_demo(live_server_process, installed, tmp_path, "--data-dir", data)
    assert httpx.get(f"{base}/fhir/metadata", timeout=30).status_code == 200
    assert {"adapter-state.sqlite", "clinicware.sqlite", "signing-secret"} <= {f.name for f in data.iterdir()}
    assert not (tmp_path / "var").exists()


def test_issue13_1_check_mapping_of_the_shipped_mapping(installed: Installed, tmp_path: Path) -> None:
    shipped = _run(
        installed.python,
        "-c",
        "from importlib import resources; print(resources.files('adapter.demo') / 'mapping.yaml')",
        cwd=tmp_path,
    ).stdout.strip()
    assert Path(shipped).is_relative_to(installed.venv)
    out = _run(installed.script, "check-mapping", shipped, cwd=tmp_path)
    assert "OK" in out.stdout
    # The documented place in the source tree is the same file.
    assert (REPO / "mappings" / "demo.yaml").read_bytes() == Path(shipped).read_bytes()


# --------------------------------------------------------------------------- Docker (issue 13, item 3)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def test_issue13_3_dockerfile_copies_only_existing_files() -> None:
    copies = [args for word, args in _instructions() if word == "COPY" and not args.startswith("--from")]
    assert copies
    for args in copies:
        *sources, _dest = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            assert not source.startswith(("tests", "bench")), "tests do not belong in the image"


def test_issue13_3_dockerfile_base_user_healthcheck_entrypoint(installed: Installed) -> None:
    rows = _instructions()
    args = dict(a.split("=", 1) for w, a in rows if w == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    stages = [a for w, a in rows if w == "FROM"]
    assert len(stages) >= 2 and all(a.startswith("${PYTHON_IMAGE}") for a in stages)
    runtime = rows[max(i for i, (w, _) in enumerate(rows) if w == "FROM") :]
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    installs = " ".join(a for w, a in runtime if w == "RUN")
    for package in ("unixodbc", "odbc-postgresql", "odbc-mariadb"):
        assert package in installs
    (health,) = [a for w, a in runtime if w == "HEALTHCHECK"]
    assert "/fhir/metadata" in health and "curl" not in health
    (entry,) = [a for w, a in runtime if w == "ENTRYPOINT"]
    (cmd,) = [a for w, a in runtime if w == "CMD"]
    import json

    argv = json.loads(entry) + json.loads(cmd)
    assert argv == ["sched-adapter", "serve", "--config", "/etc/sched-adapter/config.toml"]
    # The entry point resolves in a non-editable install and takes exactly these arguments.
    out = subprocess.run([str(installed.venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "/etc/sched-adapter/config.toml: cannot read settings file" in out.stderr


def test_issue13_3_healthcheck_command_passes_against_the_installed_demo(
    installed: Installed, tmp_path: Path, live_server_process: ProcessServers
) -> None:
    import json

    (health,) = [a for w, a in _instructions() if w == "HEALTHCHECK"]
    argv = json.loads(health[health.index("CMD") + 3 :].strip())
    assert argv[0] == "python"
    _, port = _start_demo(live_server_process, installed, tmp_path)
    env = {"PATH": "/usr/bin:/bin", "SCHED_SERVER__PORT": str(port)}
    ok = subprocess.run([str(installed.python), *argv[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    live_server_process.stop_all()
    down = subprocess.run([str(installed.python), *argv[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode != 0
