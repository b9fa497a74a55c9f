"""Durable state: the feedback store, issued-card records, the replay cache, the patient hash,
in SQLite (one host) or PostgreSQL (many instances), as `storage.url` says.

Imports settings only (and the database drivers); nothing here knows about HTTP or the clinical
rules.
"""
