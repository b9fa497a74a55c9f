"""Pending launches and sessions, sealed with a key only the user's browser holds.

Each record is stored under a hash of one secret and encrypted (AES-GCM) with a key derived from
another, which lives only in an HttpOnly cookie. The shared store therefore never holds a
readable access token, and a stolen `state` alone cannot finish someone else's launch: the
callback needs the `state` from the address and the cookie of the browser that started it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.storage.app_state import AppStateStore

LAUNCH = "launch"
SESSION = "session"


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits; SMART asks at least 122 for `state`


def _key(secret: str, kind: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"flare-cds {kind}".encode()
    ).derive(secret.encode("utf-8"))


def _slot(kind: str, secret: str) -> str:
    return f"{kind}:" + hashlib.sha256(f"{kind}\0{secret}".encode()).hexdigest()


class SealedState:
    def __init__(self, store: AppStateStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def _seal(self, key_secret: str, kind: str, record: dict[str, Any]) -> bytes:
        nonce = os.urandom(12)
        plain = json.dumps(record, separators=(",", ":")).encode()
        return nonce + AESGCM(_key(key_secret, kind)).encrypt(nonce, plain, kind.encode())

    def _open(self, key_secret: str, kind: str, blob: bytes | None) -> dict[str, Any] | None:
        if blob is None or len(blob) < 13 or not key_secret:
            return None
        try:
            plain = AESGCM(_key(key_secret, kind)).decrypt(blob[:12], blob[12:], kind.encode())
        except InvalidTag:
            return None
        record = json.loads(plain)
        return record if isinstance(record, dict) else None

    # -- launches: `state` travels through the EHR, `browser` stays in a cookie ---------------

    def begin_launch(self, record: dict[str, Any], lifetime: float) -> tuple[str, str]:
        """(state, browser secret) for a new launch; the record is kept until `lifetime` ends."""
        state, browser = new_secret(), new_secret()
        sealed = self._seal(browser, LAUNCH, record)
        self._store.put(_slot(LAUNCH, state), sealed, self._clock() + lifetime)
        return state, browser

    def finish_launch(self, state: str, browser: str) -> tuple[str, dict[str, Any] | None]:
        """("", record) once per launch; otherwise (why, None). Any attempt uses the state up."""
        blob = self._store.take(_slot(LAUNCH, state))
        if blob is None:
            return "unknown_or_expired_state", None
        record = self._open(browser, LAUNCH, blob)
        if record is None:
            return "launch_cookie_mismatch", None
        return "", record

    # -- sessions: the cookie holds the one secret that finds and opens the record ------------

    def open_session(self, record: dict[str, Any], expires_at: float) -> str:
        secret = new_secret()
        self._store.put(_slot(SESSION, secret), self._seal(secret, SESSION, record), expires_at)
        return secret

    def session(self, secret: str) -> dict[str, Any] | None:
        if not secret:
            return None
        record = self._open(secret, SESSION, self._store.get(_slot(SESSION, secret)))
        if record is None or float(record.get("expires_at", 0)) <= self._clock():
            return None
        return record

    def close_session(self, secret: str) -> None:
        if secret:
            self._store.delete(_slot(SESSION, secret))
