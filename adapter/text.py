"""Text rules every layer shares: accent- and case-insensitive folding, and named SQL binds.

One implementation each, so the mapping's ``fold`` converter, the SQLite ``SCHED_FOLD`` function, the
backend's in-memory name matching and the service agree character for character.
"""

from __future__ import annotations

import re
import unicodedata

# A quoted SQL literal (skipped) or a ``:name`` bind; ``::cast`` and ``a:b`` inside words are not binds.
SQL_NAMED_BIND = re.compile(r"'(?:[^']|'')*'|(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")


def fold(text: str) -> str:
    """Case- and accent-insensitive form for FHIR string matching: NFKD without combining marks, case-folded."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def sql_bind_names(sql: str) -> list[str]:
    """Named ``:binds`` in SQL text, in order, ignoring quoted literals and ``::casts``."""
    return [m.group(1) for m in SQL_NAMED_BIND.finditer(sql) if m.group(1)]
