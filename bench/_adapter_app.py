"""Fallback ASGI factory for bench/find.py, used only when ``sched-adapter serve`` cannot start.

``sched-adapter serve`` exports ``SCHED_CONFIG_FILE`` for its workers, and ``adapter.asgi.app_factory``
then passes the whole environment to ``load_settings``, which reads every ``SCHED_*`` variable as a
setting override and rejects ``config_file`` (extra="forbid"). Until that is fixed this factory does
the same as ``adapter.asgi.app_factory`` without handing that one variable to the settings loader.

Run as ``uvicorn _adapter_app:app_factory --factory --app-dir bench`` with ``BENCH_ADAPTER_CONFIG`` set.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette

from adapter.server import build_app
from adapter.settings import load_settings


def app_factory() -> Starlette:
    env = {k: v for k, v in os.environ.items() if k != "SCHED_CONFIG_FILE"}
    return build_app(load_settings(os.environ["BENCH_ADAPTER_CONFIG"], env))
