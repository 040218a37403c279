"""The handful of MSH/MSA fields the transport needs, read without parsing the message.

Reading MSH-10 and the ack-mode fields costs a few microseconds; the inbox stores and acknowledges a message with
only these, and parses it fully after the ACK (a full parse costs milliseconds and would cap the ACK rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

_SEGMENT_SEPARATORS = (b"\r\n", b"\n")


def _first_segment(message: bytes, name: bytes) -> bytes | None:
    for sep in _SEGMENT_SEPARATORS:
        if sep in message:
            message = message.replace(sep, b"\r")
    for segment in message.split(b"\r"):
        if segment[:3] == name:
            return segment
    return None


@dataclass(frozen=True, slots=True)
class MshInfo:
    """MSH fields by their HL7 number (``fields[10]`` is MSH-10). Components are left unsplit."""

    field_sep: str
    encoding_chars: str
    fields: tuple[str, ...]

    def get(self, number: int) -> str:
        return self.fields[number] if number < len(self.fields) else ""

    def component(self, number: int, index: int = 1) -> str:
        parts = self.get(number).split(self.encoding_chars[:1] or "^")
        return parts[index - 1] if index <= len(parts) else ""

    @property
    def sending_application(self) -> str:
        return self.get(3)

    @property
    def sending_facility(self) -> str:
        return self.get(4)

    @property
    def sender(self) -> str:
        """The de-duplication scope: sending application and facility (MSH-3 + MSH-4), as sent."""
        return f"{self.get(3)}|{self.get(4)}"

    @property
    def control_id(self) -> str:
        return self.get(10)

    @property
    def message_type(self) -> str:
        return self.component(9, 1)

    @property
    def trigger(self) -> str:
        return self.component(9, 2)

    @property
    def version(self) -> str:
        return self.component(12, 1)

    @property
    def accept_ack_type(self) -> str:
        """MSH-15 (AL, NE, ER, SU); empty means original acknowledgement mode."""
        return self.get(15)

    @property
    def application_ack_type(self) -> str:
        return self.get(16)

    @property
    def enhanced_mode(self) -> bool:
        return bool(self.accept_ack_type or self.application_ack_type)


def read_msh(message: bytes) -> MshInfo:
    """MSH of ``message``; ``ValueError`` when the message does not start with a usable MSH segment."""
    segment = _first_segment(message, b"MSH")
    if segment is None or len(segment) < 8:
        raise ValueError("no MSH segment")
    text = segment.decode("utf-8", errors="replace")
    sep = text[3]
    parts = text.split(sep)
    # MSH-1 is the separator itself, so parts[1] (the encoding characters) is MSH-2.
    fields = ("MSH", sep, *parts[1:])
    return MshInfo(field_sep=sep, encoding_chars=parts[1], fields=tuple(fields))


@dataclass(frozen=True, slots=True)
class AckInfo:
    """MSA-1 (AA/AE/AR, CA/CE/CR) and MSA-2 (the acknowledged MSH-10), with MSA-3 text if any."""

    code: str
    control_id: str
    text: str

    @property
    def is_commit(self) -> bool:
        return self.code.startswith("C")

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


def read_msa(message: bytes) -> AckInfo | None:
    segment = _first_segment(message, b"MSA")
    if segment is None or len(segment) < 4:
        return None
    text = segment.decode("utf-8", errors="replace")
    parts = text.split(text[3])
    return AckInfo(
        code=parts[1] if len(parts) > 1 else "",
        control_id=parts[2] if len(parts) > 2 else "",
        text=parts[3] if len(parts) > 3 else "",
    )


def hl7_timestamp(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%d%H%M%S%z")


def build_ack(
    msh: MshInfo,
    code: str,
    *,
    control_id: str,
    text: str = "",
    message_type: str = "ACK",
    error: str | None = None,
) -> bytes:
    """A general acknowledgement for ``msh``: sender and receiver swapped, MSA-2 = the original MSH-10.

    ``code`` is AA/AE/AR (original mode, or the application ack in enhanced mode) or CA/CE/CR (the enhanced-mode
    commit acknowledgement). ``error`` adds an ERR segment (ERR-3 code, HL7 table 0357) with ``text``.
    """
    sep = msh.field_sep
    comp = msh.encoding_chars[:1] or "^"
    trigger = msh.trigger
    msg_type = f"{message_type}{comp}{trigger}" if trigger else message_type
    fields = [
        "MSH",
        msh.encoding_chars,
        msh.get(5),
        msh.get(6),
        msh.get(3),
        msh.get(4),
        hl7_timestamp(),
        "",
        msg_type,
        control_id,
        msh.get(11) or "P",
        msh.get(12) or "2.5.1",
    ]
    segments = [sep.join(fields), sep.join(["MSA", code, msh.control_id, text])]
    if error is not None:
        segments.append(sep.join(["ERR", "", "", f"{error}", "E", "", "", "", text]))
    return ("\r".join(segments) + "\r").encode("utf-8")
