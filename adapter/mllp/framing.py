"""MLLP framing: ``<VT> payload <FS><CR>``.

``FrameDecoder`` is incremental and pure (bytes in, frames and errors out) so every framing case is unit-tested by
feeding bytes: frames split across reads, several frames in one read, data before a start block, oversize frames.
It mirrors the recovery of python-hl7's ``hl7.mllp.streams`` (which uses ``StreamReader.readuntil`` and
``LimitOverrunError``): a bad frame is reported and skipped, and decoding resumes at the next start block, so one
broken message never takes the connection down with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapter.mllp.errors import FrameError

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


def encode_frame(payload: bytes) -> bytes:
    if START_BLOCK in payload or b"\x1c" in payload:
        raise ValueError("an HL7 message must not contain the MLLP block characters 0x0B or 0x1C")
    return START_BLOCK + payload + END_BLOCK


@dataclass(slots=True)
class FrameDecoder:
    """Incremental decoder. ``feed`` returns the complete frames and the errors found in the new data, in order."""

    max_size: int = DEFAULT_MAX_MESSAGE_SIZE
    _buf: bytearray = field(default_factory=bytearray)
    _in_frame: bool = False
    _skipping_oversize: bool = False
    _skipped: int = 0

    def feed(self, data: bytes) -> list[bytes | FrameError]:
        out: list[bytes | FrameError] = []
        self._buf += data
        buf = self._buf
        while buf:
            if self._skipping_oversize:
                end = buf.find(END_BLOCK)
                if end < 0:
                    # Keep a trailing 0x1C: it may be the first half of an end block split across reads.
                    keep = 1 if buf.endswith(b"\x1c") else 0
                    self._skipped += len(buf) - keep
                    del buf[: len(buf) - keep]
                    break
                self._skipped += end + len(END_BLOCK)
                del buf[: end + len(END_BLOCK)]
                out.append(FrameError("message larger than the size limit", self._skipped))
                self._skipping_oversize = False
                self._skipped = 0
                continue
            if not self._in_frame:
                start = buf.find(START_BLOCK)
                if start < 0:
                    out.append(FrameError("data outside an MLLP frame", len(buf)))
                    buf.clear()
                    break
                if start > 0:
                    out.append(FrameError("data outside an MLLP frame", start))
                del buf[: start + 1]
                self._in_frame = True
                continue
            end = buf.find(END_BLOCK)
            if end < 0:
                restart = buf.find(START_BLOCK)
                if restart >= 0:
                    # A new start block before any end block: the previous frame was truncated by the sender.
                    out.append(FrameError("frame without end block", restart + 1))
                    del buf[: restart + 1]
                    continue
                if len(buf) > self.max_size + 1:
                    self._skipped = len(buf) - 1
                    del buf[: len(buf) - 1]
                    self._in_frame = False
                    self._skipping_oversize = True
                break
            restart = buf.find(START_BLOCK, 0, end)
            if restart >= 0:
                out.append(FrameError("frame without end block", restart + 1))
                del buf[: restart + 1]
                continue
            if end > self.max_size:
                out.append(FrameError("message larger than the size limit", end + len(END_BLOCK) + 1))
            else:
                out.append(bytes(buf[:end]))
            del buf[: end + len(END_BLOCK)]
            self._in_frame = False
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered of a frame not yet complete."""
        return len(self._buf)
