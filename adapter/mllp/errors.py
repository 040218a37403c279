"""Errors raised by the MLLP transport."""

from __future__ import annotations


class MLLPError(Exception):
    """Base class of every transport error."""


class FrameError(MLLPError):
    """A frame was malformed (data outside a frame) or larger than the configured limit.

    The decoder reports it and resynchronises at the next start block; the connection stays usable.
    """

    def __init__(self, reason: str, discarded: int) -> None:
        self.reason = reason
        self.discarded = discarded
        super().__init__(f"{reason} ({discarded} bytes discarded)")


class ConnectionLost(MLLPError):
    """The connection closed or could not be opened.

    ``delivered`` is False when the message was never written to any connection: the peer certainly did not get it.
    """

    def __init__(self, message: str, *, delivered: bool = True) -> None:
        self.delivered = delivered
        super().__init__(message)


class AckTimeout(MLLPError):
    """No correlated response arrived within the timeout after every attempt.

    The outcome at the peer is unknown: the message may have been processed. ``attempts`` counts the sends.
    """

    def __init__(self, control_id: str, attempts: int) -> None:
        self.control_id = control_id
        self.attempts = attempts
        super().__init__(f"no response for MSH-10 {control_id!r} after {attempts} attempt(s)")


class CloseConnection(MLLPError):
    """Raised by a server handler to close the connection without a response and without logging a failure."""
