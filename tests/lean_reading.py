"""What a lean reading of a large hook request must give (service.api.json_codec): the value
orjson reads, less the unread fields of prefetch entries and of their resources. The codec's
tests and the unread-fields guard both compare with it."""

from __future__ import annotations

from typing import Any


def pruned_as_read_lean(value: Any, fields: frozenset[str], entry_fields: frozenset[str]) -> Any:
    """`value` (changed in place) less `entry_fields` in each entry of a prefetch value's `entry`
    array, and less `fields` in each such entry's resource, for a body of any shape."""
    prefetch = value.get("prefetch") if isinstance(value, dict) else None
    for bundle in prefetch.values() if isinstance(prefetch, dict) else ():
        entries = bundle.get("entry") if isinstance(bundle, dict) else None
        for entry in entries if isinstance(entries, list) else ():
            if not isinstance(entry, dict):
                continue
            for name in entry_fields:
                entry.pop(name, None)
            resource = entry.get("resource")
            if isinstance(resource, dict):
                entry["resource"] = {k: v for k, v in resource.items() if k not in fields}
    return value
