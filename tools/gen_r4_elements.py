#!/usr/bin/env python3
"""Generate ``adapter/fhir/r4_elements.json`` from HL7's official FHIR R4 JSON Schema.

Why: FHIR XML cannot be read or written without knowing, for every element, its position in the
definition (XML is ordered), whether it repeats (XML has no arrays), and whether it is a primitive
(``<x value=".."/>`` plus JSON type), a complex type, a wrapped resource or the XHTML narrative. The
official schema (``fhir.schema.json``, id ``http://hl7.org/fhir/json-schema/4.0``) carries exactly that:
its ``properties`` are listed in FHIR element order. Deriving the table from it, instead of writing it
by hand, keeps the codec complete for every resource and datatype of R4 4.0.1.

Output format (kept compact because the file is committed and loaded at run time)::

    {
      "fhir": "4.0.1",
      "resources": ["Account", ...],             # definitions that are resources
      "types": {                                 # every definition with properties
        "Appointment": [["id", "s", 0], ["meta", "Meta", 0], ["contained", "R", 1], ...],
        ...
      }
    }

Each element is ``[name, kind, repeats]`` where ``kind`` is one of ``b`` (boolean), ``i`` (integer),
``d`` (decimal), ``s`` (any other primitive, a JSON string), ``x`` (xhtml ``div``), ``R`` (a resource
wrapped in an element: ``contained``, ``Bundle.entry.resource``, ...) or the name of the complex /
backbone definition (``CodeableConcept``, ``Appointment_Participant``). ``repeats`` is 0 or 1.

Usage: ``python tools/gen_r4_elements.py path/to/fhir.schema.json [out.json]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "adapter" / "fhir" / "r4_elements.json"

#: Primitive definitions whose JSON representation is not a string.
_NUMBER_KINDS = {"decimal": "d", "integer": "i", "positiveInt": "i", "unsignedInt": "i"}

PRIMITIVE_KINDS = frozenset({"b", "i", "d", "s"})


def _ref_name(prop: dict[str, Any]) -> str | None:
    """Return the definition name of a ``$ref`` (``#/definitions/X`` -> ``X``), or None."""
    ref = prop.get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _inline_kind(prop: dict[str, Any]) -> str:
    """Kind of a property the schema spells inline (``pattern``/``type``/``enum``) instead of ``$ref``.

    The schema inlines primitives in a few places (e.g. ``Extension.valueDecimal``); integers and
    decimals are both ``"type": "number"`` there, told apart only by the decimal point in the pattern.
    """
    json_type = prop.get("type")
    if json_type == "boolean":
        return "b"
    if json_type == "number":
        return "d" if "\\." in prop.get("pattern", "") else "i"
    return "s"  # strings and code enums


def _kind(prop: dict[str, Any], definitions: dict[str, Any]) -> str:
    """Classify one (non-array) property schema."""
    name = _ref_name(prop)
    if name is None:
        return _inline_kind(prop)
    if name == "ResourceList":
        return "R"
    if name == "xhtml":
        return "x"
    target = definitions[name]
    if "properties" in target:
        return name
    if target.get("type") == "boolean":
        return "b"
    return _NUMBER_KINDS.get(name, "s")


def element_table(schema: dict[str, Any]) -> dict[str, Any]:
    """Build the compact element table (see module docstring) from the parsed schema."""
    definitions: dict[str, Any] = schema["definitions"]
    resources = sorted(schema["discriminator"]["mapping"])
    types: dict[str, list[list[Any]]] = {}
    for def_name, definition in definitions.items():
        props = definition.get("properties")
        if not props:
            continue  # primitives, ResourceList, xhtml
        elements: list[list[Any]] = []
        for prop_name, prop in props.items():
            if prop_name.startswith("_") or prop_name == "resourceType":
                continue
            repeats = prop.get("type") == "array"
            item = prop["items"] if repeats else prop
            elements.append([prop_name, _kind(item, definitions), int(repeats)])
        types[def_name] = elements
    return {"fhir": "4.0.1", "source": schema.get("id", ""), "resources": resources, "types": types}


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    schema = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    out = Path(argv[2]) if len(argv) == 3 else DEFAULT_OUT
    table = element_table(schema)
    # One definition per line: compact, yet diffs stay readable when the table is regenerated.
    lines = [f"{json.dumps(name)}:{json.dumps(els, separators=(',', ':'))}" for name, els in table["types"].items()]
    head = {k: v for k, v in table.items() if k != "types"}
    text = json.dumps(head, separators=(",", ":"))[:-1] + ',"types":{\n' + ",\n".join(lines) + "\n}}\n"
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text.encode()) / 1024:.0f} KiB, {len(table['types'])} definitions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
