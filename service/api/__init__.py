"""HTTP and the contract: routes, hook dispatch, openapi.yaml validation, errors, JSON, middleware.

The outermost layer of a request. It may import every other package; nothing imports it except
the app factory (`service.create_app`).
"""
