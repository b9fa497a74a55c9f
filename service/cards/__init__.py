"""Rendering: findings from the clinical core into CDS Hooks cards, with text from `cards/`.

Imports the clinical core and settings; never Flask, the FHIR client or storage.
"""
