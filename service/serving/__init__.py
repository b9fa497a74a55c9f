"""Serving and the command line: `flare-cds serve` (gunicorn), `evaluate`, `feedback-report`.

The entry points; they build the app through `service.create_app` and may import any package.
"""
