"""``sched-adapter demo --backend hl7v2``: the legacy scheduler simulator and the adapter in one process.

NOT PRODUCTION CODE. The simulator (``hl7_simulator``) plays the legacy scheduler on an MLLP port of its own
(``peer_port``, default any free port); the adapter serves FHIR on ``port`` and listens for the simulator's SIU on
``mllp_port`` (default 2575), exactly as it would in front of a real HL7v2 scheduler. Both share one event loop.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from adapter.settings import Settings
from adapter.testing.hl7_simulator import LegacySchedulerSimulator, demo_templates

log = logging.getLogger("adapter.testing.hl7_demo")
# Package data (read with importlib.resources so an installed wheel has it); mappings/hl7v2-demo.yaml links to it.
MAPPING_RESOURCE = resources.files("adapter.demo") / "hl7v2-mapping.yaml"


def demo_settings(
    *,
    port: int,
    mllp_port: int,
    peer_port: int,
    data_dir: Path,
    mapping: Path,
    host: str = "127.0.0.1",
    **sections: dict[str, Any],
) -> Settings:
    """The adapter's settings for the HL7v2 demo (authorization off: for demonstrations only).

    ``mapping`` is a real path of the demo mapping (``resources.as_file(MAPPING_RESOURCE)``)."""
    data_dir = data_dir.resolve()
    data: dict[str, Any] = {
        "demo_page": True,
        "server": {"host": host, "port": port},
        "backend": {"kind": "hl7v2", "mapping": str(mapping)},
        "hl7v2": {"peer_port": peer_port, "listen_port": mllp_port, "inbox": str(data_dir / "hl7v2-inbox.sqlite")},
        "state": {"path": str(data_dir / "adapter-state.sqlite")},
        "audit": {"sinks": []},
        "security": {"auth": "off", "signing_secret_file": str(data_dir / "signing-secret")},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return Settings.model_validate(data)


async def run_demo(*, port: int, mllp_port: int, data_dir: Path, host: str = "127.0.0.1", peer_port: int = 0) -> None:
    import uvicorn

    from adapter.server import build_app

    data_dir.mkdir(parents=True, exist_ok=True)
    simulator = LegacySchedulerSimulator(demo_templates(), port=peer_port, siu_target=("127.0.0.1", mllp_port))
    await simulator.start()
    try:
        # A real path for the whole run; as_file copies only out of a zipped package.
        with resources.as_file(MAPPING_RESOURCE) as mapping:
            settings = demo_settings(
                port=port, mllp_port=mllp_port, peer_port=simulator.port, data_dir=data_dir, mapping=mapping, host=host
            )
            app = build_app(settings)
            print(
                f"sched-adapter: HL7v2 demo: FHIR base {settings.server.public_base()}, the adapter's SIU listener on "
                f"MLLP port {mllp_port}, the simulated legacy scheduler on MLLP port {simulator.port}",
                flush=True,
            )
            config = uvicorn.Config(
                app,
                host=host,
                port=port,
                lifespan="on",
                log_level="info",
                access_log=False,
                http="adapter.fhir.http_protocol:PROTOCOL",
            )
            await uvicorn.Server(config).serve()
    finally:
        await simulator.stop()
