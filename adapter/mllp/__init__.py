"""A small asyncio MLLP transport (HL7v2 Minimal Lower Layer Protocol).

* ``framing``  - ``0x0B payload 0x1C 0x0D`` frames: encoder and an incremental decoder with a size limit that
  recovers from bad frames (data outside a frame, oversize messages) instead of dropping the connection.
* ``ack``      - the few MSH/MSA fields the transport needs (control id, ack modes) read without a full parse,
  and byte-level ACK construction.
* ``server``   - ``MLLPServer``: a listener serving many messages per connection, in order.
* ``client``   - ``MLLPClient``: one persistent connection per peer with reconnect and exponential backoff,
  responses correlated by MSA-2 = MSH-10, timeouts and resend with the same MSH-10, original and enhanced
  acknowledgement modes.

The package knows nothing about scheduling; ``adapter.hl7v2`` builds on it.
"""

from adapter.mllp.ack import AckInfo, MshInfo, build_ack, read_msa, read_msh
from adapter.mllp.client import MLLPClient, Reply
from adapter.mllp.errors import AckTimeout, CloseConnection, ConnectionLost, FrameError, MLLPError
from adapter.mllp.framing import END_BLOCK, START_BLOCK, FrameDecoder, encode_frame
from adapter.mllp.server import MLLPServer, Peer

__all__ = [
    "END_BLOCK",
    "START_BLOCK",
    "AckInfo",
    "AckTimeout",
    "CloseConnection",
    "ConnectionLost",
    "FrameDecoder",
    "FrameError",
    "MLLPClient",
    "MLLPError",
    "MLLPServer",
    "MshInfo",
    "Peer",
    "Reply",
    "build_ack",
    "encode_frame",
    "read_msa",
    "read_msh",
]
