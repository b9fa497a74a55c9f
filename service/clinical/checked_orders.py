"""What the FHIR model check said about draft orders this worker has already checked.

order-select is called again on every new selection with every draft order of the session, and
order-sign sends them once more, so the same anti-CD20 order is checked against the FHIR models
several times over. That check is the costliest step of reading an order (about 0.2 ms in
process, about 1 ms in a served worker, where its many small validators run cold), and its
answer depends on nothing but the order as sent.

Only a digest of the order is kept, keyed with a secret made when the process starts (so it
cannot be matched against guessed orders), and the outcome as the service reports it anyway: the
version read, and where and what each problem is (the text the 400 or the deviation log line
carries). The order itself is not kept.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

# Entries per worker: a few hundred bytes each.
MEMO_SIZE = 4096


@dataclass(frozen=True)
class CheckOutcome:
    """The model check of one order, without its location in the request."""

    read_as: str  # the FHIR version the order is read as
    fatal: str  # why the order cannot be read ("" when it can)
    deviations: tuple[tuple[str, str], ...] = ()  # (path in the resource, problem)


class CheckMemo:
    """The outcomes of the most recently used `size` orders, by keyed digest."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._size = size
        self._secret = os.urandom(32)
        self._outcomes: OrderedDict[bytes, CheckOutcome] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, resource: Mapping[str, Any], version: str) -> bytes | None:
        """The digest of the order exactly as sent (field order included: the problems are
        listed in it); None when it cannot be serialised again (integers beyond 64 bits)."""
        try:
            data = orjson.dumps(resource)
        except TypeError:
            return None
        digest = hashlib.blake2b(data, key=self._secret, digest_size=16, person=version.encode())
        return digest.digest()

    def get(self, key: bytes) -> CheckOutcome | None:
        with self._lock:
            outcome = self._outcomes.get(key)
            if outcome is not None:
                self._outcomes.move_to_end(key)
            return outcome

    def put(self, key: bytes, outcome: CheckOutcome) -> None:
        with self._lock:
            self._outcomes[key] = outcome
            self._outcomes.move_to_end(key)
            while len(self._outcomes) > self._size:
                self._outcomes.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._outcomes.clear()

    def __len__(self) -> int:
        return len(self._outcomes)

    def outcomes(self) -> list[CheckOutcome]:
        """What is kept, oldest first."""
        with self._lock:
            return list(self._outcomes.values())
