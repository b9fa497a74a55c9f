"""Gathering the patient record: prefetch first, the FHIR server for what is missing.

Holds the service definitions (prefetch templates), the FHIR client and its address policy.
Imports the clinical core's record and value types; never Flask or storage.
"""
