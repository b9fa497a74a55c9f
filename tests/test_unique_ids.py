"""Card and request ids: uuid4's layout, never repeated, and never shared by forked workers."""

from __future__ import annotations

import os
import uuid

from service import unique_ids


def test_ids_are_version_4_uuids_in_the_forms_uuid4_gives() -> None:
    for _ in range(600):  # more than one batch
        text, digits = unique_ids.uuid4_str(), unique_ids.uuid4_hex()
        assert str(uuid.UUID(text)) == text
        assert uuid.UUID(digits).hex == digits
        for value in (uuid.UUID(text), uuid.UUID(digits)):
            assert value.version == 4
            assert value.variant == uuid.RFC_4122


def test_the_random_bytes_are_laid_out_as_uuid4_lays_them_out() -> None:
    raw = os.urandom(16)
    unique_ids._pieces.appendleft(raw)
    assert unique_ids.uuid4_str() == str(uuid.UUID(bytes=raw, version=4))


def test_no_id_is_handed_out_twice() -> None:
    ids = {unique_ids.uuid4_hex() for _ in range(5000)}
    assert len(ids) == 5000


def test_a_forked_worker_never_hands_out_its_parents_ids() -> None:
    unique_ids.uuid4_hex()  # the parent holds the rest of a batch when the worker forks
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: its next ids, to the parent
        try:
            os.write(write, "".join(unique_ids.uuid4_hex() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    child_ids = {child[i : i + 32] for i in range(0, len(child), 32)}
    parent_ids = {unique_ids.uuid4_hex() for _ in range(100)}
    assert len(child_ids) == 100
    assert not child_ids & parent_ids
