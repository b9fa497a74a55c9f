"""Durable state: the feedback store, issued-card records, the replay cache, the patient hash.

Imports settings only; nothing here knows about HTTP or the clinical rules.
"""
