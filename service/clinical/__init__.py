"""The pure clinical core: terminology, observations, conditions, orders and the assessments.

Given the same record and the same "now" it returns the same findings. It imports only settings
and the standard library (and the FHIR models): no Flask, HTTP, storage, clock or FHIR client.
"""
