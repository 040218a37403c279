"""FHIR XML codec (adapter/fhir/xml.py): round trips, hand-written XML, hostile input, speed.

Measured on the 2-core dev machine (Python 3.11, pure-Python codec, noisy shared box):
a 50-Appointment searchset Bundle in the IHE ``$find`` shape (~69 KB of XML) serialises in
~3.2 ms (``resource_to_xml``) and parses back in ~10-11 ms (``xml_to_resource``); orjson needs
~0.1 ms for the same Bundle as JSON. 500 entries: ~40 ms to serialise, ~110-150 ms to parse.
``test_perf_50_appointment_bundle`` prints the figure of the current run.
"""

from __future__ import annotations

import copy
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from adapter.fhir.xml import FHIR_NS, XHTML_NS, FhirXmlError, resource_to_xml, xml_to_resource

IG_DIR = Path(__file__).resolve().parents[1] / "data" / "ig"
F = f"{{{FHIR_NS}}}"
H = f"{{{XHTML_NS}}}"


def _load(name: str) -> dict[str, Any]:
    return json.loads((IG_DIR / name).read_text(encoding="utf-8"))


def _round_trip(resource: dict[str, Any]) -> dict[str, Any]:
    return xml_to_resource(resource_to_xml(resource))


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "example-iti-scheduling-bundle.json",
        "example-appointment.json",
        "example-patient.json",
        "example-practitioner.json",
    ],
)
def test_ig_examples_round_trip(name: str) -> None:
    resource = _load(name)
    assert _round_trip(resource) == resource


def test_bundle_xml_structure_nests_resources_and_embeds_narrative() -> None:
    xml = resource_to_xml(_load("example-iti-scheduling-bundle.json"))
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?><Bundle xmlns="http://hl7.org/fhir">')
    root = ET.fromstring(xml)
    entries = root.findall(f"{F}entry")
    assert len(entries) == 4
    appointment = entries[0].find(f"{F}resource/{F}Appointment")
    assert appointment is not None
    assert appointment.find(f"{F}id").get("value") == "proposed-appt1a-1"
    div = appointment.find(f"{F}text/{H}div")  # real XHTML element, not an escaped string
    assert div is not None and div.find(f"{H}p/{H}b").text == "Generated Narrative with Details"
    outcome = entries[3].find(f"{F}resource/{F}OperationOutcome/{F}issue/{F}severity")
    assert outcome.get("value") == "information"
    # definition order: fullUrl, resource, search inside entry
    assert [child.tag for child in entries[0]] == [f"{F}fullUrl", f"{F}resource", f"{F}search"]


def test_output_is_deterministic_and_in_definition_order() -> None:
    appt = _load("example-appointment.json")
    shuffled = dict(reversed(list(appt.items())))
    shuffled["participant"] = [dict(reversed(list(p.items()))) for p in appt["participant"]]
    assert resource_to_xml(shuffled) == resource_to_xml(appt)
    tags = [child.tag.removeprefix(F) for child in ET.fromstring(resource_to_xml(appt))]
    assert tags == ["id", "meta", "status", "serviceType", "appointmentType", "start", "end"] + ["participant"] * 3 + [
        "requestedPeriod"
    ]


def _parameters() -> dict[str, Any]:
    return {
        "resourceType": "Parameters",
        "id": "find-1",
        "parameter": [
            {"name": "start", "valueDateTime": "2026-01-05T00:00:00+01:00"},
            {"name": "end", "valueDateTime": "2026-01-19T00:00:00+01:00"},
            {"name": "specialty", "valueString": "394814009"},
            {"name": "practitioner", "valueReference": {"reference": "Practitioner/dr-y", "display": "Dr Y"}},
            {"name": "_count", "valueInteger": 10},
            {"name": "patient-resource", "resource": _load("example-patient.json")},
        ],
    }


def test_parameters_round_trip_with_nested_patient() -> None:
    params = _parameters()
    xml = resource_to_xml(params)
    assert _round_trip(params) == params
    root = ET.fromstring(xml)
    last = root.findall(f"{F}parameter")[-1]
    assert last.find(f"{F}resource/{F}Patient/{F}id").get("value") == "pat1"
    assert root.findall(f"{F}parameter")[4].find(f"{F}valueInteger").get("value") == "10"


def test_primitive_extensions_ids_and_null_alignment() -> None:
    patient = _load("example-patient.json")
    patient["_birthDate"] = {
        "id": "bd",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                "valueDateTime": "1978-03-22T10:00:00+01:00",
            }
        ],
    }
    patient["name"][0]["given"] = ["Meiko", None, "Jo"]
    patient["name"][0]["_given"] = [
        None,
        {"extension": [{"url": "http://example.org/nick", "valueString": "Mei"}]},
        {"id": "g3"},
    ]
    patient["_gender"] = {"extension": [{"url": "http://example.org/x", "valueCode": "f"}]}
    del patient["gender"]  # extension only, no value
    patient["telecom"][0]["id"] = "tel-1"
    assert _round_trip(patient) == patient
    root = ET.fromstring(resource_to_xml(patient))
    birth = root.find(f"{F}birthDate")
    assert birth.get("value") == "1978-03-22" and birth.get("id") == "bd"
    assert birth.find(f"{F}extension").get("url") == "http://hl7.org/fhir/StructureDefinition/patient-birthTime"
    given = root.findall(f"{F}name/{F}given")
    assert [g.get("value") for g in given] == ["Meiko", None, "Jo"] and given[2].get("id") == "g3"
    assert root.find(f"{F}gender").get("value") is None
    assert root.find(f"{F}telecom").get("id") == "tel-1"  # Element.id is an attribute


def test_booleans_integers_and_decimals_keep_json_types() -> None:
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "t", "valueBoolean": True},
            {"name": "f", "valueBoolean": False},
            {"name": "i", "valueInteger": -7},
            {"name": "u", "valueUnsignedInt": 0},
            {"name": "d1", "valueDecimal": 1.5},
            {"name": "d2", "valueDecimal": 100},
            {"name": "d3", "valueDecimal": 0.1},
            {"name": "d4", "valueDecimal": Decimal("1.50")},  # trailing zero is precision
            {"name": "d5", "valueDecimal": Decimal("12345678901234567890.123456789")},
            {"name": "d6", "valueDecimal": -0.000123},
            {"name": "q", "valueQuantity": {"value": 72.25, "unit": "kg"}},
        ],
    }
    back = _round_trip(params)
    assert back == params
    values = [next(v for k, v in p.items() if k.startswith("value")) for p in back["parameter"]]
    assert [type(v) for v in values] == [bool, bool, int, int, float, int, float, Decimal, Decimal, float, dict]
    assert str(values[7]) == "1.50"
    xml = resource_to_xml(params).decode()
    assert '<valueDecimal value="1.50"/>' in xml and '<valueBoolean value="false"/>' in xml


def test_xml_decimal_text_is_kept_exactly() -> None:
    xml = (
        b'<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="x"/>'
        b'<valueDecimal value="3.0"/></parameter><parameter><name value="y"/>'
        b'<valueDecimal value="3.10"/></parameter><parameter><name value="z"/>'
        b'<valueDecimal value="1e3"/></parameter></Parameters>'
    )
    values = [p["valueDecimal"] for p in xml_to_resource(xml)["parameter"]]
    assert values == [3.0, Decimal("3.10"), Decimal("1e3")]
    assert [type(v) for v in values] == [float, Decimal, Decimal]
    assert b'value="3.10"' in resource_to_xml(xml_to_resource(xml))


def test_special_characters_survive() -> None:
    patient = {
        "resourceType": "Patient",
        "name": [
            {"text": "A & B <c> \"d\" 'e'", "family": "line1\nline2\ttab\r\ncrlf", "given": ["Zoë", "名前", "😀"]}
        ],
    }
    assert _round_trip(patient) == patient


def test_issue7_4_characters_xml_cannot_carry_are_written_as_replacement_characters() -> None:
    patient = {"resourceType": "Patient", "name": [{"family": "bell\x07", "given": ["a\x01b\ufffec", "\x00"]}]}
    back = xml_to_resource(resource_to_xml(patient))
    assert back["name"] == [{"family": "bell\ufffd", "given": ["a\ufffdb\ufffdc", "\ufffd"]}]


def test_narrative_with_entities_and_empty_elements_round_trips() -> None:
    div = '<div xmlns="http://www.w3.org/1999/xhtml"><p lang="en" xml:lang="en">a &amp; b &lt; c<br/>d</p><table class="grid"><tr><td>1</td></tr></table></div>'
    patient = {"resourceType": "Patient", "text": {"status": "generated", "div": div}, "active": True}
    assert _round_trip(patient) == patient


def test_contained_resources_and_bundle_response_outcome() -> None:
    appt = _load("example-appointment.json")
    appt["contained"] = [{"resourceType": "Location", "id": "napa", "name": "Napa Office"}]
    appt["participant"][1]["actor"] = {"reference": "#napa", "display": "Napa Office"}
    bundle = {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [
            {"resource": appt, "response": {"status": "201 Created"}},
            {
                "response": {
                    "status": "404 Not Found",
                    "outcome": {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "not-found"}],
                    },
                }
            },
        ],
    }
    assert _round_trip(bundle) == bundle
    root = ET.fromstring(resource_to_xml(bundle))
    assert (
        root.find(f"{F}entry/{F}resource/{F}Appointment/{F}contained/{F}Location/{F}name").get("value") == "Napa Office"
    )


# --- hand-written XML ----------------------------------------------------------------------------

HAND_WRITTEN_FIND = """<?xml version="1.0" encoding="UTF-8"?>
<!-- an ITI-115 $find request body, written by hand -->
<Parameters xmlns="http://hl7.org/fhir"
            xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
            xsi:schemaLocation="http://hl7.org/fhir ../../schema/parameters.xsd">
  <parameter>
    <name value="start"/>
    <valueDateTime value="2026-01-05T08:00:00+01:00"/>
  </parameter>
  <parameter>
    <valueDateTime value="2026-01-19T18:00:00+01:00"/>
    <name value="end"/>  <!-- out of order: accepted, re-ordered -->
  </parameter>
  <parameter>
    <name value="practitioner"/>
    <valueReference>
      <reference value="Practitioner/dr-y"/>
      <display value="Dr Y &amp; partners"/>
    </valueReference>
  </parameter>
  <parameter id="p4">
    <name value="_count"/>
    <valueInteger value="5"/>
  </parameter>
  <parameter>
    <name value="patient-resource"/>
    <resource>
      <Patient>
        <id value="pat1"/>
        <active value="true"/>
        <name>
          <family value="Lufhir"/>
          <given value="Meiko"/>
          <given value="M."/>
        </name>
        <birthDate value="1978-03-22">
          <extension url="http://hl7.org/fhir/StructureDefinition/patient-birthTime">
            <valueDateTime value="1978-03-22T10:00:00+01:00"/>
          </extension>
        </birthDate>
      </Patient>
    </resource>
  </parameter>
</Parameters>
"""


def test_hand_written_xml_parameters_body() -> None:
    assert xml_to_resource(HAND_WRITTEN_FIND.encode()) == {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "start", "valueDateTime": "2026-01-05T08:00:00+01:00"},
            {"name": "end", "valueDateTime": "2026-01-19T18:00:00+01:00"},
            {
                "name": "practitioner",
                "valueReference": {"reference": "Practitioner/dr-y", "display": "Dr Y & partners"},
            },
            {"id": "p4", "name": "_count", "valueInteger": 5},
            {
                "name": "patient-resource",
                "resource": {
                    "resourceType": "Patient",
                    "id": "pat1",
                    "active": True,
                    "name": [{"family": "Lufhir", "given": ["Meiko", "M."]}],
                    "birthDate": "1978-03-22",
                    "_birthDate": {
                        "extension": [
                            {
                                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                "valueDateTime": "1978-03-22T10:00:00+01:00",
                            }
                        ]
                    },
                },
            },
        ],
    }


def test_other_encodings_and_str_input() -> None:
    latin1 = '<?xml version="1.0" encoding="ISO-8859-1"?><Patient xmlns="http://hl7.org/fhir"><name><family value="Zoë"/></name></Patient>'
    expected = {"resourceType": "Patient", "name": [{"family": "Zoë"}]}
    assert xml_to_resource(latin1.encode("latin-1")) == expected
    utf16 = latin1.replace("ISO-8859-1", "UTF-16").encode("utf-16")
    assert xml_to_resource(utf16) == expected
    assert xml_to_resource(latin1) == expected


@pytest.mark.parametrize(
    "name",
    [
        "example-iti-scheduling-bundle.json",
        "example-appointment.json",
        "example-patient.json",
        "example-practitioner.json",
    ],
)
def test_cross_check_with_fhir_resources_r4b(name: str) -> None:
    """An independent implementation (fhir.resources R4B XML over lxml) reads our XML and vice versa.

    lxml is a test dependency, so this runs on every test run rather than being skipped when it is missing.
    """
    import lxml.etree  # noqa: F401  (fhir.resources' XML support needs it; a missing install must fail here)
    from fhir.resources.R4B import get_fhir_model_class

    resource = _load(name)
    model = get_fhir_model_class(resource["resourceType"])
    theirs = model.model_validate(resource)
    assert model.model_validate_xml(resource_to_xml(resource)).model_dump_xml() == theirs.model_dump_xml()
    # fhir.resources rewrites "Z" as "+00:00"; compare through its own model
    assert model.model_validate(xml_to_resource(theirs.model_dump_xml())).model_dump_xml() == theirs.model_dump_xml()


# --- hostile and broken input --------------------------------------------------------------------

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE Patient [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Patient xmlns="http://hl7.org/fhir"><name><family value="&xxe;"/></name></Patient>"""

XXE_EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE Patient SYSTEM "file:///etc/passwd">
<Patient xmlns="http://hl7.org/fhir"/>"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Patient xmlns="http://hl7.org/fhir"><name><family value="&lol9;"/></name></Patient>"""


@pytest.mark.parametrize("payload", [XXE, XXE_EXTERNAL_DTD, BILLION_LAUGHS], ids=["xxe", "xxe-dtd", "billion-laughs"])
def test_dtd_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(FhirXmlError, match=r"^line 2: DOCTYPE declarations .* are not allowed"):
        xml_to_resource(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", r"^line 1: malformed XML .*no element found"),
        (b'<Patient xmlns="http://hl7.org/fhir"><name>', r"malformed XML"),
        (
            b'<Patient xmlns="http://hl7.org/fhir">\n<active value="true">\n</Patient>',
            r"^line 3: malformed XML .*mismatched tag",
        ),
        (b"\xff\xfe\x00garbage", r"malformed XML"),
        (b'<Patient xmlns="http://hl7.org/fhir"><name><family value="&nbsp;"/></name></Patient>', r"undefined entity"),
        (b"<Patient/>", r"^line 1: not FHIR XML: root namespace is missing"),
        (b'<Patient xmlns="urn:other"/>', r"not FHIR XML: root namespace is 'urn:other'"),
        (b'<Banana xmlns="http://hl7.org/fhir"/>', r"unknown resource type 'Banana'"),
        (
            b'<?xml version="1.0"?>\n<Appointment xmlns="http://hl7.org/fhir">\n  <foo value="x"/>\n</Appointment>',
            r"^line 3: unknown element 'foo' in Appointment$",
        ),
        (
            b'<Patient xmlns="http://hl7.org/fhir">\n<gender value="female"/>\n<gender value="male"/></Patient>',
            r"^line 3: element 'gender' may appear only once",
        ),
        (
            b'<Patient xmlns="http://hl7.org/fhir"><active value="yes"/></Patient>',
            r"'active' value 'yes' is not a boolean",
        ),
        (b'<Patient xmlns="http://hl7.org/fhir"><multipleBirthInteger value="2.5"/></Patient>', r"is not an integer"),
        (b'<Patient xmlns="http://hl7.org/fhir"><active/></Patient>', r"has no value attribute, id or extension"),
        (
            b'<Patient xmlns="http://hl7.org/fhir"><active value="true" colour="red"/></Patient>',
            r"unexpected attribute 'colour'",
        ),
        (b'<Patient xmlns="http://hl7.org/fhir">text</Patient>', r"unexpected text 'text' in Patient"),
        (b'<Patient xmlns="http://hl7.org/fhir" id="p1"/>', r"unexpected attribute 'id' on Patient"),
        (
            b'<Patient xmlns="http://hl7.org/fhir"><name><x:family xmlns:x="urn:x" value="a"/></name></Patient>',
            r"'\{urn:x\}family' in HumanName must be in namespace 'http://hl7.org/fhir'",
        ),
        (
            b'<Patient xmlns="http://hl7.org/fhir"><name><x:nick xmlns:x="urn:x" value="a"/></name></Patient>',
            r"unknown element '\{urn:x\}nick' in HumanName",
        ),
        (
            b'<Patient xmlns="http://hl7.org/fhir"><text><status value="generated"/><div/></text></Patient>',
            r"element 'div' in Narrative must be in namespace 'http://www.w3.org/1999/xhtml'",
        ),
        (
            b'<Patient xmlns="http://hl7.org/fhir"><text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml"><svg xmlns="http://www.w3.org/2000/svg"/></div></text></Patient>',
            r"narrative may contain only XHTML elements",
        ),
        (
            b'<Bundle xmlns="http://hl7.org/fhir"><entry><resource/></entry></Bundle>',
            r"'resource' must contain exactly one resource",
        ),
        (
            b'<Bundle xmlns="http://hl7.org/fhir"><entry><resource><Nope/></resource></entry></Bundle>',
            r"unknown resource type 'Nope'",
        ),
        (b"<a>" * 300 + b"</a>" * 300, r"nested deeper than 200"),
    ],
)
def test_bad_xml_is_rejected_with_fhir_xml_error(payload: bytes, message: str) -> None:
    with pytest.raises(FhirXmlError, match=message):
        xml_to_resource(payload)


def test_fhir_xml_error_is_a_value_error() -> None:
    assert issubclass(FhirXmlError, ValueError)
    with pytest.raises(ValueError):
        xml_to_resource(b"not xml")


@pytest.mark.parametrize(
    ("resource", "message"),
    [
        ({"resourceType": "Nope"}, r"^unknown resource type 'Nope'$"),
        ({"resourceType": "Patient", "colour": "red"}, r"unknown element 'colour' in Patient"),
        ({"resourceType": "Patient", "active": "true"}, r"^Patient\.active: expected a boolean, got string"),
        ({"resourceType": "Patient", "name": {"family": "x"}}, r"^Patient\.name: 'name' repeats"),
        ({"resourceType": "Patient", "gender": ["male"]}, r"^Patient\.gender: expected a string, got array"),
        ({"resourceType": "Patient", "gender": "male", "_gender": [{"id": "g"}]}, r"'gender' does not repeat"),
        (
            {"resourceType": "Patient", "contact": [{"gender": "male", "_gender": {"colour": 1}}]},
            r"^Patient\.contact\[0\]\.gender: '_gender' may only hold",
        ),
        (
            {"resourceType": "Patient", "name": [{"given": ["a", "b"], "_given": [None]}]},
            r"^Patient\.name\[0\]\.given: .*differ in length",
        ),
        ({"resourceType": "Patient", "multipleBirthInteger": 2.0}, r"expected an integer, got number"),
        ({"resourceType": "Observation", "valueQuantity": {"value": float("nan")}}, r"expected a decimal number"),
        (
            {"resourceType": "Patient", "_birthDate": {"extension": [{"url": "u", "valueFoo": 1}]}},
            r"^Patient\.birthDate\.extension\[0\]: unknown element 'valueFoo' in Extension",
        ),
        (
            {"resourceType": "Patient", "text": {"status": "generated", "div": "<div>no namespace</div>"}},
            r"^Patient\.text\.div: narrative must be a <div xmlns=",
        ),
        (
            {"resourceType": "Patient", "text": {"status": "generated", "div": f'<div xmlns="{XHTML_NS}"><p>x</div>'}},
            r"^Patient\.text\.div: line 1: malformed XML",
        ),
        (
            {
                "resourceType": "Patient",
                "text": {"status": "generated", "div": f'<!DOCTYPE div><div xmlns="{XHTML_NS}"/>'},
            },
            r"DOCTYPE",
        ),
        (
            {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "x": 1}}]},
            r"^Bundle\.entry\[0\]\.resource: unknown element 'x' in Patient",
        ),
    ],
)
def test_unrepresentable_json_is_rejected_with_fhir_xml_error(resource: dict[str, Any], message: str) -> None:
    with pytest.raises(FhirXmlError, match=message):
        resource_to_xml(resource)


# --- performance ------------------------------------------------------------------------------------


def _find_appointment(index: int) -> dict[str, Any]:
    appt = copy.deepcopy(_load("example-iti-scheduling-bundle.json")["entry"][0]["resource"])
    del appt["text"]  # $find results carry no narrative
    appt["id"] = f"find-{index}"
    appt["specialty"] = [
        {"coding": [{"system": "http://snomed.info/sct", "code": "394814009", "display": "General practice"}]}
    ]
    appt["minutesDuration"] = 15
    appt["participant"].append(
        {"actor": {"reference": "Patient/pat1"}, "required": "required", "status": "needs-action"}
    )
    return appt


def test_perf_50_appointment_bundle(capsys: pytest.CaptureFixture[str]) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 50,
        "entry": [
            {
                "fullUrl": f"http://localhost/fhir/Appointment/find-{i}",
                "resource": _find_appointment(i),
                "search": {"mode": "match"},
            }
            for i in range(50)
        ],
    }
    xml = resource_to_xml(bundle)
    assert xml_to_resource(xml) == bundle
    runs = 20
    started = time.perf_counter()
    for _ in range(runs):
        resource_to_xml(bundle)
    write_ms = (time.perf_counter() - started) / runs * 1000
    started = time.perf_counter()
    for _ in range(runs):
        xml_to_resource(xml)
    read_ms = (time.perf_counter() - started) / runs * 1000
    with capsys.disabled():
        print(
            f"\n50-Appointment Bundle ({len(xml) // 1024} KB XML): resource_to_xml {write_ms:.1f} ms, xml_to_resource {read_ms:.1f} ms"
        )
    # generous bounds: catch accidental quadratic behaviour, not machine noise
    assert write_ms < 100 and read_ms < 250
    big = dict(bundle, entry=bundle["entry"] * 10)
    started = time.perf_counter()
    resource_to_xml(big)
    assert (time.perf_counter() - started) * 1000 < 30 * max(write_ms, 1.0)
