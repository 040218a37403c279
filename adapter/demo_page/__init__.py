"""The demo booking page (static HTML + JavaScript) served at ``/demo``; it uses only the public FHIR API."""

from __future__ import annotations

from pathlib import Path

PAGE_DIR = Path(__file__).resolve().parent
