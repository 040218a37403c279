"""uvicorn's HTTP protocol with a FHIR answer for requests it cannot even parse.

A request line with raw non-ASCII bytes, a malformed header or a broken chunk never reaches the
application: uvicorn answers it itself with a plain-text 400. FHIR clients expect an
OperationOutcome for every error, so these subclasses write one instead (still 400, still
``Connection: close``: after a parse error the rest of the byte stream cannot be trusted).

``cli.py`` passes :data:`PROTOCOL` to uvicorn as its ``http`` implementation.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

from adapter.fhir.outcome import operation_outcome

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional in uvicorn; h11 is always there
    HttpToolsProtocol = None  # type: ignore[assignment,misc]  # the fallback below is chosen instead


def _outcome_bytes() -> bytes:
    oo = operation_outcome(
        [
            {
                "severity": "fatal",
                "code": "structure",
                "details": {"text": "Bad Request"},
                "diagnostics": "the HTTP request could not be parsed (the request line and headers must be "
                "ASCII; percent-encode other characters in the URL)",
            }
        ]
    )
    return orjson.dumps(oo)


def _raw_400() -> bytes:
    body = _outcome_bytes()
    return (
        b"HTTP/1.1 400 Bad Request\r\n"
        b"content-type: application/fhir+json; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )


class FhirH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        self.transport.write(_raw_400())
        self.transport.close()


if HttpToolsProtocol is not None:

    class FhirHttpToolsProtocol(HttpToolsProtocol):  # optional base class
        def send_400_response(self, msg: str) -> None:
            self.transport.write(_raw_400())
            self.transport.close()

    PROTOCOL: type = FhirHttpToolsProtocol
else:
    PROTOCOL = FhirH11Protocol
