"""ASGI entry point for uvicorn workers: ``uvicorn --factory adapter.asgi:app_factory``.

Reads the settings file named by ``SCHED_CONFIG_FILE`` (set by ``sched-adapter serve``) plus
``SCHED_*`` overrides: the one place besides the CLI that touches the environment.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette

from adapter.server import build_app
from adapter.settings import CONFIG_FILE_VARIABLE, load_settings


def app_factory() -> Starlette:
    config = os.environ.get(CONFIG_FILE_VARIABLE)
    return build_app(load_settings(config))
