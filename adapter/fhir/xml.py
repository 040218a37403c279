"""FHIR R4 XML <-> JSON codec (``application/fhir+xml``), generic over every resource type.

Why a hand-written codec: FHIR XML is not a mechanical mapping of the JSON form. Element order
matters, repeats have no array, primitives are ``<name value=".."/>`` with their id/extensions (the
JSON ``_name`` companion) folded into the same element, ``Element.id`` and ``Extension.url`` are XML
attributes, nested resources are wrapped in an element named after their type, and ``Narrative.div``
is raw XHTML. Which element is which comes from ``r4_elements.json``, generated from HL7's official
R4 JSON Schema by ``tools/gen_r4_elements.py``, loaded lazily on first use (~5 ms; each
definition's lookup tables are built the first time it is met).

Rules follow http://hl7.org/fhir/R4/xml.html. Choices made where the spec leaves room:

* Output is deterministic: elements in definition order, no indentation, UTF-8 with an XML
  declaration, attributes ``id`` before ``value``. Narrative XHTML is re-serialised canonically
  (``xmlns`` on the ``div``, double-quoted attributes, ``<br/>`` for empty elements).
* Input must be in the FHIR namespace and every element must be known; element *order* is not
  enforced (the data is unambiguous without it, and rejecting it helps no client). Attributes in
  other namespaces (``xsi:schemaLocation``) and comments/processing instructions are ignored.
* Security: DOCTYPE declarations are refused outright, so no entity can be declared and neither
  XXE nor entity expansion ("billion laughs") is possible; nesting depth is bounded.
* Every problem with the input, in either direction, raises :class:`FhirXmlError` (a ``ValueError``)
  with a message naming the line (XML input) or the element path (JSON input).
* Decimals read from XML become ``float`` when the float prints back to the same digits,
  ``int`` when written without point or exponent, and :class:`decimal.Decimal` otherwise (e.g.
  ``1.50``), so precision is never lost. JSON encoders need a ``default`` hook for ``Decimal``.

Measured on the 2-core dev machine: a 50-Appointment searchset Bundle in the ``$find`` shape
(~69 KB of XML) serialises in ~3.2 ms and parses back in ~10-11 ms; 500 entries take ~40 ms and
~110-150 ms (linear). JSON stays the hot path (orjson: ~0.1 ms for the same Bundle). See
``test_perf_50_appointment_bundle`` in tests/fhir/test_xml_codec.py.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any
from xml.parsers import expat

__all__ = ["FHIR_NS", "XHTML_NS", "FhirXmlError", "resource_to_xml", "xml_to_resource"]

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
XML_NS = "http://www.w3.org/XML/1998/namespace"

#: Deepest element nesting accepted in either direction. Real resources stay far below it (a
#: Bundle of Appointments with narrative is ~12 deep); the bound keeps recursion safe.
MAX_DEPTH = 200

_ELEMENTS_FILE = resources.files(__package__) / "r4_elements.json"
_PRIMITIVE_KINDS = frozenset({"b", "i", "d", "s"})
_KIND_NAMES = {"b": "a boolean", "i": "an integer", "d": "a decimal number", "s": "a string"}
_XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
_FHIR_EXTENSION_TAG = f"{FHIR_NS} extension"


class FhirXmlError(ValueError):
    """The only exception the codec raises for bad input (malformed, unsafe or non-FHIR content).

    ``line`` is set for XML input; ``path`` collects element names (innermost first) while an error
    in JSON input unwinds, so the message says where in the resource the problem is.
    ``element`` (internal) is the document-order index of the offending element, turned into
    ``line`` before the error leaves the module.
    """

    def __init__(self, message: str, *, line: int | None = None, element: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.element = element
        self.path: list[str] = []

    def __str__(self) -> str:
        where = ".".join(reversed(self.path)).replace(".[", "[") + ": " if self.path else ""
        if self.line is not None:
            where += f"line {self.line}: "
        return where + self.message


# --------------------------------------------------------------------------------------------------
# Element metadata
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)  # identity hash: used as a dict key when parsing
class _Element:
    """One element of a definition: JSON name, kind (see tools/gen_r4_elements.py), repeats, order."""

    name: str
    kind: str
    repeats: bool
    position: int
    attribute: bool  # written as an XML attribute (Element.id, Extension.url)
    primitive: bool  # kind is b/i/d/s: ``<name value=".."/>`` plus the JSON ``_name`` companion


@dataclass(slots=True)
class _Type:
    """A resource, datatype or backbone definition with lookup tables for both directions."""

    name: str
    is_resource: bool
    by_name: dict[str, _Element] = field(default_factory=dict)
    json_keys: dict[str, _Element] = field(default_factory=dict)  # includes ``_name`` companions
    by_tag: dict[str, _Element] = field(default_factory=dict)  # expat "namespace name" of children
    attributes: tuple[str, ...] = ()

    def members(self, obj: dict[str, Any]) -> list[_Element]:
        """Non-attribute elements present in ``obj``, in definition order; unknown keys are errors."""
        found: dict[int, _Element] = {}
        for key in obj:
            el = self.json_keys.get(key)
            if el is None:
                if key == "resourceType" and self.is_resource:
                    continue
                raise FhirXmlError(f"unknown element '{key}' in {self.name}")
            if not el.attribute:
                found[el.position] = el
        return [found[p] for p in sorted(found)]


class _Model:
    """The element table; each definition is turned into a :class:`_Type` on first use only."""

    def __init__(self, rows: dict[str, list[list[Any]]], resources: frozenset[str]) -> None:
        self._rows = rows
        self._types: dict[str, _Type] = {}
        self.resources = resources

    def type(self, name: str) -> _Type:
        typ = self._types.get(name)
        if typ is None:  # a racing thread may build it twice; both results are identical
            typ = self._types[name] = _build_type(name, self._rows[name], name in self.resources)
        return typ

    def resource(self, name: object, element: int | None = None) -> _Type:
        if not isinstance(name, str) or name not in self.resources:
            raise FhirXmlError(f"unknown resource type {name!r}", element=element)
        return self.type(name)


def _build_type(name: str, rows: list[list[Any]], is_resource: bool) -> _Type:
    typ = _Type(name=name, is_resource=is_resource)
    attribute_names = set() if is_resource else {"id"}
    if name == "Extension":
        attribute_names.add("url")
    for position, (el_name, kind, repeats) in enumerate(rows):
        primitive = kind in _PRIMITIVE_KINDS
        el = _Element(el_name, kind, bool(repeats), position, el_name in attribute_names, primitive)
        typ.by_name[el_name] = el
        typ.json_keys[el_name] = el
        if el.attribute:
            continue
        if primitive:
            typ.json_keys["_" + el_name] = el
        typ.by_tag[f"{XHTML_NS if kind == 'x' else FHIR_NS} {el_name}"] = el
    typ.attributes = tuple(n for n in typ.by_name if typ.by_name[n].attribute)
    return typ


@functools.cache
def _model() -> _Model:
    """Load the generated element table once (lazily, so importing the module stays cheap)."""
    raw = json.loads(_ELEMENTS_FILE.read_text(encoding="utf-8"))
    return _Model(raw["types"], frozenset(raw["resources"]))


# --------------------------------------------------------------------------------------------------
# Safe XML parsing into a light tree
# --------------------------------------------------------------------------------------------------


class _Node:
    """An XML element: expat tag ("namespace localname"), attributes, mixed children, and its
    document-order ``index`` (kept instead of a line number: see :func:`_line_of_element`)."""

    __slots__ = ("attrs", "children", "index", "tag")

    def __init__(self, tag: str, attrs: dict[str, str], index: int) -> None:
        self.tag = tag
        self.attrs = attrs
        self.index = index
        self.children: list[_Node | str] = []

    @property
    def ns(self) -> str:
        return self.tag.rpartition(" ")[0]

    @property
    def name(self) -> str:
        return self.tag.rpartition(" ")[2]

    @property
    def label(self) -> str:
        """The name for messages: bare in the FHIR namespace, ``{ns}name`` elsewhere."""
        ns, _, name = self.tag.rpartition(" ")
        return name if ns in ("", FHIR_NS) else f"{{{ns}}}{name}"


def _refuse(what: str, parser: expat.XMLParserType) -> Any:
    def handler(*_args: Any) -> None:
        raise FhirXmlError(f"{what} are not allowed in FHIR XML", line=parser.CurrentLineNumber)

    return handler


def _parse_tree(data: bytes | bytearray | memoryview | str) -> _Node:
    """Parse XML with expat into a :class:`_Node` tree, refusing DTDs (hence all entities)."""
    if not isinstance(data, (bytes, bytearray, memoryview, str)):
        raise FhirXmlError(f"XML input must be bytes, not {type(data).__name__}")
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.buffer_text = True
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse("DOCTYPE declarations (DTDs, entities)", parser)
    parser.EntityDeclHandler = _refuse("entity declarations", parser)
    parser.ExternalEntityRefHandler = _refuse("external entities", parser)
    stack: list[_Node] = []
    roots: list[_Node] = []
    next_index = itertools.count().__next__

    def start(tag: str, attrs: dict[str, str]) -> None:
        node = _Node(tag, attrs, next_index())
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)
        if len(stack) > MAX_DEPTH:
            raise FhirXmlError(f"elements nested deeper than {MAX_DEPTH} levels", line=parser.CurrentLineNumber)

    def end(_tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        stack[-1].children.append(data)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(bytes(data) if isinstance(data, memoryview) else data, True)
    except expat.ExpatError as exc:
        raise FhirXmlError(
            f"malformed XML (column {exc.offset + 1}): {expat.ErrorString(exc.code)}", line=exc.lineno
        ) from None
    return roots[0]


class _Found(Exception):
    pass


def _line_of_element(data: bytes | bytearray | memoryview | str, index: int) -> int | None:
    """Line of the ``index``-th element (document order), found by parsing ``data`` again.

    Reading expat's ``CurrentLineNumber`` for every element made parsing ~40% slower, and line
    numbers are only needed for error messages, so the fast path records an index instead.
    """
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    count = itertools.count().__next__
    line: list[int] = []

    def start(_tag: str, _attrs: dict[str, str]) -> None:
        if count() == index:
            line.append(parser.CurrentLineNumber)
            raise _Found

    parser.StartElementHandler = start
    try:
        parser.Parse(bytes(data) if isinstance(data, memoryview) else data, True)
    except (_Found, expat.ExpatError):
        pass
    return line[0] if line else None


def _locate(exc: FhirXmlError, data: bytes | bytearray | memoryview | str) -> FhirXmlError:
    if exc.element is not None and exc.line is None:
        exc.line = _line_of_element(data, exc.element)
    return exc


# --------------------------------------------------------------------------------------------------
# Escaping and primitive values
# --------------------------------------------------------------------------------------------------

_INVALID_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ATTR_SPECIAL = re.compile('[&<>"\n\r\t\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]')
# Newlines and tabs are escaped in attributes because XML attribute-value normalisation would
# otherwise turn them into spaces; a CR in text would be normalised to LF.
_ATTR_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}
)
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})

_INTEGER_RE = re.compile(r"-?(0|[1-9][0-9]*)")
_DECIMAL_RE = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _escape_attr(value: str) -> str:
    if _ATTR_SPECIAL.search(value) is None:
        return value
    # A character XML 1.0 cannot carry (a control character stored in a legacy comment, U+FFFE)
    # is written as U+FFFD: refusing it would make that row unreadable as XML for every client.
    return _INVALID_XML_CHARS.sub("\ufffd", value).translate(_ATTR_ESCAPES)


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _format_primitive(kind: str, value: object) -> str:
    """JSON primitive value -> escaped XML ``value`` attribute text; wrong JSON types are errors."""
    if kind == "s" and isinstance(value, str):
        return _escape_attr(value)
    if kind == "b" and isinstance(value, bool):
        return "true" if value else "false"
    if kind in ("i", "d") and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if kind == "d" and isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if kind == "d" and isinstance(value, Decimal) and value.is_finite():
        return str(value)
    raise FhirXmlError(f"expected {_KIND_NAMES[kind]}, got {_json_type(value)} {value!r:.40}")


def _parse_decimal(text: str) -> int | float | Decimal:
    """XML decimal text -> int, float, or Decimal when a float would drop digits (``1.50``)."""
    if not _DECIMAL_RE.fullmatch(text):
        raise ValueError(text)
    if not any(c in text for c in ".eE"):
        return int(text)
    as_float = float(text)
    if math.isfinite(as_float) and Decimal(repr(as_float)).as_tuple() == Decimal(text).as_tuple():
        return as_float
    return Decimal(text)


def _parse_primitive(kind: str, text: str) -> object:
    """XML ``value`` attribute -> JSON value of the element's kind; bad lexical forms raise ValueError."""
    if kind == "s":
        return text
    if kind == "b":
        if text not in ("true", "false"):
            raise ValueError(text)
        return text == "true"
    if kind == "i":
        if not _INTEGER_RE.fullmatch(text):
            raise ValueError(text)
        return int(text)
    try:
        return _parse_decimal(text)
    except InvalidOperation:
        raise ValueError(text) from None


# --------------------------------------------------------------------------------------------------
# JSON -> XML
# --------------------------------------------------------------------------------------------------


def resource_to_xml(resource: dict[str, Any]) -> bytes:
    """Serialise a FHIR R4 resource in JSON form (a dict) to FHIR XML (UTF-8 bytes).

    Raises :class:`FhirXmlError` when the dict is not representable: unknown resource type or
    element, wrong JSON type for an element, misaligned ``_name`` arrays, malformed narrative.
    """
    out: list[str] = [_XML_DECLARATION]
    try:
        _write_resource(out, resource, 0, f' xmlns="{FHIR_NS}"')
    except FhirXmlError as exc:
        if exc.path:  # name the root resource type in front of the element path
            exc.path.append(resource["resourceType"])
        raise
    return "".join(out).encode("utf-8")


def _write_resource(out: list[str], resource: object, depth: int, xmlns: str = "") -> None:
    if not isinstance(resource, dict):
        raise FhirXmlError(f"a resource must be a JSON object, not {_json_type(resource)}")
    rt = resource.get("resourceType")
    typ = _model().resource(rt)
    out.append(f"<{rt}{xmlns}>")
    _write_members(out, resource, typ, depth)
    out.append(f"</{rt}>")


def _write_object(out: list[str], obj: object, typ: _Type, tag: str, depth: int) -> None:
    """Write a datatype/backbone element; ``id`` (and ``Extension.url``) become attributes."""
    if not isinstance(obj, dict):
        raise FhirXmlError(f"expected a JSON object ({typ.name}), got {_json_type(obj)}")
    attrs = ""
    for name in typ.attributes:
        if name in obj:
            value = obj[name]
            if not isinstance(value, str):
                raise FhirXmlError(f"'{name}' must be a string, got {_json_type(value)}")
            attrs += f' {name}="{_escape_attr(value)}"'
    start = len(out)
    out.append(f"<{tag}{attrs}>")
    _write_members(out, obj, typ, depth)
    if len(out) == start + 1:
        out[start] = f"<{tag}{attrs}/>"
    else:
        out.append(f"</{tag}>")


def _write_members(out: list[str], obj: dict[str, Any], typ: _Type, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise FhirXmlError(f"elements nested deeper than {MAX_DEPTH} levels")
    for el in typ.members(obj):
        try:
            if el.primitive and not el.repeats and ("_" + el.name) not in obj:  # the common case
                out.append(f'<{el.name} value="{_format_primitive(el.kind, obj[el.name])}"/>')
            elif el.primitive:
                _write_primitive(out, el, obj.get(el.name), obj.get("_" + el.name), depth)
            else:
                _write_complex(out, el, obj[el.name], depth)
        except FhirXmlError as exc:
            exc.path.append(el.name)
            raise


def _write_complex(out: list[str], el: _Element, value: object, depth: int) -> None:
    items = _as_items(el, value)
    for index, item in enumerate(items):
        try:
            if el.kind == "x":
                _write_div(out, item)
            elif el.kind == "R":
                out.append(f"<{el.name}>")
                _write_resource(out, item, depth + 1)
                out.append(f"</{el.name}>")
            else:
                _write_object(out, item, _model().type(el.kind), el.name, depth + 1)
        except FhirXmlError as exc:
            if el.repeats:
                exc.path.append(f"[{index}]")
            raise


def _as_items(el: _Element, value: object) -> list[Any]:
    if el.repeats:
        if not isinstance(value, list):
            raise FhirXmlError(f"'{el.name}' repeats and must be a JSON array, got {_json_type(value)}")
        return value
    if isinstance(value, list):
        raise FhirXmlError(f"'{el.name}' does not repeat but is a JSON array")
    return [value]


def _write_primitive(out: list[str], el: _Element, value: object, ext: object, depth: int) -> None:
    """Write ``name``/``_name`` as one or more ``<name value=".." id="..">`` elements."""
    if not el.repeats:
        if isinstance(value, list) or isinstance(ext, list):
            raise FhirXmlError(f"'{el.name}' does not repeat but is a JSON array")
        _write_primitive_item(out, el, value, ext, depth)
        return
    values = [] if value is None else value
    exts = [] if ext is None else ext
    if not isinstance(values, list) or not isinstance(exts, list):
        raise FhirXmlError(f"'{el.name}' repeats: '{el.name}' and '_{el.name}' must be JSON arrays")
    if values and exts and len(values) != len(exts):
        raise FhirXmlError(f"'{el.name}' and '_{el.name}' arrays differ in length")
    for index in range(max(len(values), len(exts))):
        try:
            item_ext = exts[index] if exts else None
            _write_primitive_item(out, el, values[index] if values else None, item_ext, depth)
        except FhirXmlError as exc:
            exc.path.append(f"[{index}]")
            raise


def _write_primitive_item(out: list[str], el: _Element, value: object, ext: object, depth: int) -> None:
    attrs = ""
    extensions: list[Any] = []
    if ext is not None:
        if not isinstance(ext, dict) or not ext.keys() <= {"id", "extension"}:
            raise FhirXmlError(f"'_{el.name}' may only hold 'id' and 'extension'")
        if "id" in ext:
            if not isinstance(ext["id"], str):
                raise FhirXmlError(f"'_{el.name}.id' must be a string")
            attrs = f' id="{_escape_attr(ext["id"])}"'
        extensions = ext.get("extension") or []
        if not isinstance(extensions, list):
            raise FhirXmlError(f"'_{el.name}.extension' must be a JSON array")
    if value is not None:
        attrs += f' value="{_format_primitive(el.kind, value)}"'
    elif not attrs and not extensions:
        raise FhirXmlError(f"'{el.name}' has neither a value nor an id or extension")
    if not extensions:
        out.append(f"<{el.name}{attrs}/>")
        return
    out.append(f"<{el.name}{attrs}>")
    extension_type = _model().type("Extension")
    for index, item in enumerate(extensions):
        try:
            _write_object(out, item, extension_type, "extension", depth + 1)
        except FhirXmlError as exc:
            exc.path.append(f"extension[{index}]")
            raise
    out.append(f"</{el.name}>")


def _write_div(out: list[str], div: object) -> None:
    """Embed the narrative XHTML string as XML, after parsing it with the same safe parser."""
    if not isinstance(div, str):
        raise FhirXmlError(f"narrative div must be a string, got {_json_type(div)}")
    try:
        data = div.encode("utf-8")
    except UnicodeEncodeError:
        raise FhirXmlError("narrative div contains unpaired surrogates") from None
    root = _parse_tree(data)
    if root.ns != XHTML_NS or root.name != "div":
        raise FhirXmlError(f'narrative must be a <div xmlns="{XHTML_NS}">, found <{root.label}>')
    try:
        _write_xhtml(out, root, root=True)
    except FhirXmlError as exc:
        raise _locate(exc, data) from None


def _write_xhtml(out: list[str], node: _Node, *, root: bool = False) -> None:
    """Canonical XHTML: default namespace on the root div, source attribute order, ``<br/>``."""
    if node.ns != XHTML_NS:
        raise FhirXmlError(f"narrative may contain only XHTML elements, found <{node.label}>", element=node.index)
    parts = [f'<{node.name} xmlns="{XHTML_NS}"' if root else f"<{node.name}"]
    for key, value in node.attrs.items():
        ns, _, local = key.rpartition(" ")
        if ns and ns != XML_NS:
            raise FhirXmlError(f"narrative attribute '{{{ns}}}{local}' is not allowed", element=node.index)
        parts.append(f' {"xml:" if ns else ""}{local}="{_escape_attr(value)}"')
    if not node.children:
        out.append("".join(parts) + "/>")
        return
    out.append("".join(parts) + ">")
    for child in node.children:
        if isinstance(child, str):
            out.append(child.translate(_TEXT_ESCAPES))
        else:
            _write_xhtml(out, child)
    out.append(f"</{node.name}>")


# --------------------------------------------------------------------------------------------------
# XML -> JSON
# --------------------------------------------------------------------------------------------------


def xml_to_resource(data: bytes) -> dict[str, Any]:
    """Parse FHIR XML (bytes; the XML declaration's encoding is honoured) into FHIR JSON (a dict).

    Raises :class:`FhirXmlError` for malformed XML, DOCTYPE/entities, a root outside the FHIR
    namespace, unknown elements or attributes, repeated single elements and bad primitive values.
    """
    root = _parse_tree(data)
    try:
        if root.ns != FHIR_NS:
            found = f"'{root.ns}'" if root.ns else "missing"
            raise FhirXmlError(f"not FHIR XML: root namespace is {found}, expected '{FHIR_NS}'", element=root.index)
        return _read_resource(root)
    except FhirXmlError as exc:
        raise _locate(exc, data) from None


def _read_resource(node: _Node) -> dict[str, Any]:
    typ = _model().resource(node.name, node.index)
    return _read_members(node, typ, {"resourceType": node.name})


def _read_members(node: _Node, typ: _Type, result: dict[str, Any]) -> dict[str, Any]:
    """Group child elements by element, then convert them in definition order into ``result``."""
    attributes = _read_attributes(node, typ.attributes) if node.attrs else {}
    groups: dict[_Element, list[_Node]] = {}
    by_tag = typ.by_tag
    for child in node.children:
        if isinstance(child, str):
            if child.strip():
                raise FhirXmlError(f"unexpected text {child.strip()[:30]!r} in {node.label}", element=node.index)
            continue
        el = by_tag.get(child.tag)
        if el is None:
            raise _unknown_element(child, typ)
        group = groups.get(el)
        if group is None:
            groups[el] = [child]
        elif el.repeats:
            group.append(child)
        else:
            raise FhirXmlError(f"element '{el.name}' may appear only once in {typ.name}", element=child.index)
    members: list[_Element] = [typ.by_name[name] for name in attributes]
    members += groups
    if len(members) > 1:
        members.sort(key=_position)
    for el in members:
        if el.attribute:
            result[el.name] = attributes[el.name]
        else:
            _read_element(el, groups[el], result)
    return result


def _unknown_element(child: _Node, typ: _Type) -> FhirXmlError:
    known = typ.by_name.get(child.name)
    if known is not None and not known.attribute:  # right name, wrong namespace
        expected = XHTML_NS if known.kind == "x" else FHIR_NS
        return FhirXmlError(
            f"element '{child.label}' in {typ.name} must be in namespace '{expected}'", element=child.index
        )
    return FhirXmlError(f"unknown element '{child.label}' in {typ.name}", element=child.index)


def _position(el: _Element) -> int:
    return el.position


def _read_attributes(node: _Node, allowed: tuple[str, ...]) -> dict[str, str]:
    """FHIR attributes of ``node`` (only ``allowed`` ones); other-namespace attributes are skipped."""
    found: dict[str, str] = {}
    for key, value in node.attrs.items():
        if key in allowed:
            found[key] = value
        elif " " not in key:  # attributes in other namespaces (xsi:schemaLocation) are not FHIR data
            raise FhirXmlError(f"unexpected attribute '{key}' on {node.label}", element=node.index)
    return found


def _read_element(el: _Element, nodes: list[_Node], result: dict[str, Any]) -> None:
    if el.primitive:
        _read_primitive(el, nodes, result)
        return
    if el.kind == "x":
        values: list[Any] = [_xhtml_to_string(n) for n in nodes]
    elif el.kind == "R":
        values = [_read_wrapped_resource(n) for n in nodes]
    else:
        typ = _model().type(el.kind)
        values = [_read_members(n, typ, {}) for n in nodes]
    result[el.name] = values if el.repeats else values[0]


def _read_primitive(el: _Element, nodes: list[_Node], result: dict[str, Any]) -> None:
    """Fill ``name`` and, when any id/extension is present, the aligned ``_name`` companion."""
    if not el.repeats:
        value, extra = _read_primitive_item(el, nodes[0])
        if value is not None:
            result[el.name] = value
        if extra is not None:
            result["_" + el.name] = extra
        return
    pairs = [_read_primitive_item(el, node) for node in nodes]
    values = [value for value, _ in pairs]
    extras = [extra for _, extra in pairs]
    if any(v is not None for v in values):
        result[el.name] = values
    if any(e is not None for e in extras):
        result["_" + el.name] = extras


def _read_primitive_item(el: _Element, node: _Node) -> tuple[object, dict[str, Any] | None]:
    attrs = node.attrs
    if not node.children and len(attrs) == 1 and "value" in attrs:  # the common case
        return _parse_value(el, attrs["value"], node.index), None
    value: object = None
    extra: dict[str, Any] = {}
    for key, text in node.attrs.items():
        if key == "value":
            value = _parse_value(el, text, node.index)
        elif key == "id":
            extra["id"] = text
        elif " " not in key:
            raise FhirXmlError(f"unexpected attribute '{key}' on {el.name}", element=node.index)
    extensions = _read_primitive_extensions(el, node)
    if extensions:
        extra["extension"] = extensions
    if value is None and not extra:
        raise FhirXmlError(f"element '{el.name}' has no value attribute, id or extension", element=node.index)
    return value, extra or None


def _parse_value(el: _Element, text: str, index: int) -> object:
    if el.kind == "s":
        return text
    try:
        return _parse_primitive(el.kind, text)
    except ValueError:
        raise FhirXmlError(f"'{el.name}' value {text[:40]!r} is not {_KIND_NAMES[el.kind]}", element=index) from None


def _read_primitive_extensions(el: _Element, node: _Node) -> list[dict[str, Any]]:
    extension_type = _model().type("Extension")
    extensions: list[dict[str, Any]] = []
    for child in node.children:
        if isinstance(child, str):
            if child.strip():
                raise FhirXmlError(f"unexpected text in {el.name}", element=node.index)
        elif child.tag == _FHIR_EXTENSION_TAG:
            extensions.append(_read_members(child, extension_type, {}))
        else:
            raise FhirXmlError(f"unknown element '{child.label}' in primitive '{el.name}'", element=child.index)
    return extensions


def _read_wrapped_resource(node: _Node) -> dict[str, Any]:
    """``<resource><Patient>..</Patient></resource>`` -> the Patient; exactly one child allowed."""
    _read_attributes(node, ())
    elements = [c for c in node.children if not isinstance(c, str)]
    if any(isinstance(c, str) and c.strip() for c in node.children) or len(elements) != 1:
        raise FhirXmlError(f"'{node.name}' must contain exactly one resource", element=node.index)
    inner = elements[0]
    if inner.ns != FHIR_NS:  # an unknown resource type in the FHIR namespace is reported below
        raise FhirXmlError(f"unknown element '{inner.label}' in {node.name}", element=inner.index)
    return _read_resource(inner)


def _xhtml_to_string(node: _Node) -> str:
    out: list[str] = []
    _write_xhtml(out, node, root=True)
    return "".join(out)
