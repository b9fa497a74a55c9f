"""Keyed hashing of patient ids for the feedback store, and the key it uses.

Cards of one patient can be linked without the store ever holding who the patient is.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path

from service.settings import StorageSettings
from service.storage.errors import FeedbackStoreError

KEY_BYTES = 32
# What patient_hash() returns: the store refuses anything else, such as a raw patient id.
HASH_PATTERN = re.compile(r"[0-9a-f]{64}")


def patient_hash(key: bytes, patient_id: str) -> str:
    """Keyed hash of a patient id: lets cards of one patient be linked without storing who it is."""
    if not key:
        raise ValueError("the patient hash key is empty")
    keyed = _keyed(key).copy()
    keyed.update(patient_id.encode("utf-8"))
    return keyed.hexdigest()


@lru_cache(maxsize=4)
def _keyed(key: bytes) -> hmac.HMAC:
    """An HMAC already set up with `key`, to be copied for each id: setting one up from the
    key (OpenSSL's digest lookup, the key's two blocks) took about 13 us in a served worker."""
    return hmac.new(key, digestmod=hashlib.sha256)


def load_or_create_hash_key(settings: StorageSettings) -> bytes:
    """The configured key, else a random one kept in `<database>.key` (created once, mode 0600)."""
    if settings.patient_hash_key:
        return settings.patient_hash_key.encode("utf-8")
    path = Path(settings.database + ".key")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _create_key_file(path)
    text = path.read_text(encoding="ascii").strip()
    key = bytes.fromhex(text) if re.fullmatch(r"[0-9a-f]*", text) else b""
    if len(key) != KEY_BYTES:
        # A new key would silently unlink every stored hash from its patient: refuse instead.
        raise FeedbackStoreError(f"{path} is damaged: expected {KEY_BYTES * 2} hex digits")
    return key


def _create_key_file(path: Path) -> None:
    # Workers starting together each write a whole key to a private file; os.link publishes one
    # only if none exists yet, so every worker then reads the same, never half-written, key.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the link itself must outlive a crash, or the key changes on restart
    finally:
        os.close(directory)
