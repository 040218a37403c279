"""Issue 8 item 2: MLLP framing, fed byte by byte, split and merged; bad frames are skipped, not fatal."""

from __future__ import annotations

import pytest

from adapter.mllp import FrameDecoder, FrameError, encode_frame, read_msa, read_msh

MSG = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|X1|P|2.5.1\rPID|1\r"


def _frames(items: list[bytes | FrameError]) -> list[bytes]:
    return [i for i in items if isinstance(i, bytes)]


def _errors(items: list[bytes | FrameError]) -> list[FrameError]:
    return [i for i in items if isinstance(i, FrameError)]


def test_issue8_2_frame_split_across_reads() -> None:
    data = encode_frame(MSG)
    dec = FrameDecoder()
    out: list[bytes | FrameError] = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert out == [MSG]
    assert dec.pending == 0


def test_issue8_2_end_block_split_between_reads() -> None:
    data = encode_frame(MSG)
    dec = FrameDecoder()
    assert dec.feed(data[:-1]) == []
    assert dec.feed(data[-1:]) == [MSG]


def test_issue8_2_two_frames_in_one_read() -> None:
    other = MSG.replace(b"X1", b"X2")
    assert FrameDecoder().feed(encode_frame(MSG) + encode_frame(other)) == [MSG, other]


def test_issue8_2_missing_start_block_is_reported_and_skipped() -> None:
    dec = FrameDecoder()
    out = dec.feed(b"garbage" + MSG + b"\x1c\r" + encode_frame(MSG))
    assert _frames(out) == [MSG]
    assert len(_errors(out)) == 1
    assert "outside" in _errors(out)[0].reason


def test_issue8_2_frame_without_end_block_resynchronises_at_next_start() -> None:
    out = FrameDecoder().feed(b"\x0bMSH|truncated" + encode_frame(MSG))
    assert _frames(out) == [MSG]
    assert "without end block" in _errors(out)[0].reason


@pytest.mark.parametrize("chunk", [7, 1000, 100_000])
def test_issue8_2_oversize_frame_dropped_next_frame_kept(chunk: int) -> None:
    big = b"MSH|^~\\&|" + b"x" * 5000
    data = encode_frame(big) + encode_frame(MSG)
    dec = FrameDecoder(max_size=1000)
    out: list[bytes | FrameError] = []
    for i in range(0, len(data), chunk):
        out += dec.feed(data[i : i + chunk])
    assert _frames(out) == [MSG]
    errors = _errors(out)
    assert len(errors) == 1 and "size limit" in errors[0].reason
    # The decoder never buffers much more than the limit while skipping.
    assert dec.pending == 0


def test_issue8_2_encode_refuses_block_characters() -> None:
    with pytest.raises(ValueError):
        encode_frame(b"MSH|\x0b")


def test_issue8_2_msh_and_msa_read_without_full_parse() -> None:
    msh = read_msh(b"MSH|^~\\&|APP|FAC|RA|RF|20260101||SIU^S12^SIU_S12|C-9|P|2.8|||AL|NE\nSCH|1\n")
    assert (msh.control_id, msh.message_type, msh.trigger, msh.version) == ("C-9", "SIU", "S12", "2.8")
    assert msh.sender == "APP|FAC" and msh.enhanced_mode
    ack = read_msa(b"MSH|^~\\&|A|B|C|D|1||ACK|9|P|2.5\rMSA|AE|C-9|slot taken\r")
    assert ack is not None and (ack.code, ack.control_id, ack.text) == ("AE", "C-9", "slot taken")
