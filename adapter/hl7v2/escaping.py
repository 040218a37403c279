"""HL7v2 escape sequences (v2 chapter 2.7): ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` and ``\\Xhh..\\``.

Free text (names, reasons) is escaped when a message is built and unescaped after a received field has been split
into components, so ``O'Brien|^~\\&`` survives the round trip through SRM and SIU unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @classmethod
    def from_msh(cls, field_sep: str, encoding_chars: str) -> Delimiters:
        enc = (encoding_chars + "^~\\&")[:4] if len(encoding_chars) < 4 else encoding_chars
        return cls(field_sep, enc[0], enc[1], enc[2], enc[3])

    @property
    def encoding_chars(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


DEFAULT = Delimiters()


def escape(text: str, d: Delimiters = DEFAULT) -> str:
    e = d.escape
    # The escape character first, so the escapes added below are not escaped again.
    out = text.replace(e, f"{e}E{e}")
    out = out.replace(d.field, f"{e}F{e}").replace(d.component, f"{e}S{e}")
    out = out.replace(d.subcomponent, f"{e}T{e}").replace(d.repetition, f"{e}R{e}")
    # A segment separator inside a value would end the segment: carry line breaks as hex.
    return out.replace("\r", f"{e}X0D{e}").replace("\n", f"{e}X0A{e}")


def unescape(text: str, d: Delimiters = DEFAULT) -> str:
    e = d.escape
    if e not in text:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch != e:
            out.append(ch)
            i += 1
            continue
        end = text.find(e, i + 1)
        if end < 0:
            out.append(text[i:])  # a lone escape character is kept as sent (tolerant reading)
            break
        code = text[i + 1 : end]
        simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape}
        if code in simple:
            out.append(simple[code])
        elif code[:1] == "X" and len(code) % 2 == 1:
            try:
                out.append(bytes.fromhex(code[1:]).decode("latin-1"))
            except ValueError:
                out.append(text[i : end + 1])
        elif code in (".br", ".sp"):
            out.append("\n")
        # Any other code is a formatting escape (\H\, \N\, \.in\ ...): it carries no text, so nothing is appended.
        i = end + 1
    return "".join(out)
