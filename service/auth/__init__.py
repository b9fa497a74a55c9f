"""Client authentication: CDS Hooks JWT verification and the issuers' key sets.

Imports settings and the replay cache from `service.storage`; never the clinical core or Flask.
"""
