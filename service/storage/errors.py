"""The errors the feedback store raises, in a module of their own so that every part of the store
(schema, patient-hash key, writes) can raise them without importing the others."""

from __future__ import annotations


class FeedbackStoreError(RuntimeError):
    """The store cannot be used as asked (closed, read-only, schema newer than this code)."""


class StoreClosed(FeedbackStoreError):
    """The store was closed on purpose (the process is shutting down): nothing to retry."""


class InvalidFeedback(ValueError):
    """A feedback item lacks the CDS Hooks 2.0 shape; nothing from its request was stored.

    `location` and `problem` let the HTTP layer name the field in an `ErrorDetail`."""

    def __init__(self, location: str, problem: str) -> None:
        super().__init__(f"{location} {problem}")
        self.location = location
        self.problem = problem
