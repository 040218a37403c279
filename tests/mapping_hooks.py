"""Functions for the ``python:`` converter in tests (tests/ is on the Python path, see pyproject.toml)."""

from __future__ import annotations

from typing import Any


def bracket(value: Any, ctx: Any) -> str:
    """A converter the closed set lacks: wrap the text in brackets."""
    return f"[{value}]"
