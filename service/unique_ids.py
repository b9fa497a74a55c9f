"""Random (version 4) UUIDs for cards and request ids, from the system's random source in
batches.

uuid.uuid4() asks the kernel for 16 bytes per id and then checks its arguments in Python: a
system call and a few microseconds for each card and each request. The same bytes
(os.urandom) are taken here 4 KiB at a time, one call per 256 ids, and laid out as uuid4 lays
them out. A forked worker starts with an empty batch, never its parent's rest: two workers
would otherwise hand out the same ids.
"""

from __future__ import annotations

import os
from collections import deque

_ID_BYTES = 16
_BATCH_IDS = 256
# Pieces of one os.urandom read, each taken once: deque.popleft is atomic, so threads never
# share a piece, and two threads refilling at once only add more.
_pieces: deque[bytes] = deque()


def _refill() -> None:
    batch = os.urandom(_ID_BYTES * _BATCH_IDS)
    _pieces.extend(batch[i : i + _ID_BYTES] for i in range(0, len(batch), _ID_BYTES))


def _next_digits() -> str:
    """The next piece as uuid4 makes it (RFC 9562: version 4 in the high nibble of byte 6,
    variant 10 in the top bits of byte 8), in hex."""
    while True:
        try:
            piece = bytearray(_pieces.popleft())
        except IndexError:
            _refill()
            continue
        piece[6] = (piece[6] & 0x0F) | 0x40
        piece[8] = (piece[8] & 0x3F) | 0x80
        return piece.hex()


def uuid4_hex() -> str:
    """What uuid.uuid4().hex gives: 32 lower-case hex digits."""
    return _next_digits()


def uuid4_str() -> str:
    """What str(uuid.uuid4()) gives: 8-4-4-4-12 lower-case hex digits."""
    digits = _next_digits()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


os.register_at_fork(after_in_child=_pieces.clear)
