"""openapi.yaml as the runtime validator: loaded and compiled once, used for every request.

The contract file is both the documentation integrators read and the schema the service checks
bodies against, so the two cannot drift apart.

Each body is first checked by jsonschema-rs (compiled Rust, about 400 times faster on a full
order-sign body); only a body it finds invalid is walked again by the Python `jsonschema`
validator, which is the authority and words the error details. A body that Rust refuses and
Python accepts (they differ on a few format checks) is accepted, so the fast path can only ever
save time, never change an answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "openapi.yaml"
CONTRACT_URI = "urn:flare-cds:openapi"
# The schemas request bodies are checked against: each hook's request, and feedback. The others
# (answers, cards, errors) only the tests check bodies against.
REQUEST_SCHEMAS = {
    "order-select": "OrderSelectRequest",
    "order-sign": "OrderSignRequest",
    "patient-view": "PatientViewRequest",
}
FEEDBACK_SCHEMA = "FeedbackRequest"
CHECKED_SCHEMAS = (*REQUEST_SCHEMAS.values(), FEEDBACK_SCHEMA)


@dataclass(frozen=True)
class Problem:
    location: str
    problem: str

    def as_json(self) -> dict[str, str]:
        return {"location": self.location, "problem": self.problem}


class Contract:
    """The parsed contract and one compiled validator per component schema, built on demand."""

    def __init__(self, path: Path = CONTRACT_PATH) -> None:
        self.path = path
        self.text = path.read_text("utf-8")
        self.document: dict[str, Any] = yaml.safe_load(self.text)
        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(CONTRACT_URI, resource)
        self._validators: dict[str, Draft202012Validator] = {}
        self._fast: dict[str, Any] = {}
        self._caps: dict[str, _Caps] = {}

    def validator(self, schema_name: str) -> Draft202012Validator:
        if schema_name not in self._validators:
            if schema_name not in self.document["components"]["schemas"]:
                raise KeyError(f"no schema {schema_name} in {self.path.name}")
            self._validators[schema_name] = Draft202012Validator(
                {"$ref": f"{CONTRACT_URI}#/components/schemas/{schema_name}"},
                registry=self._registry,
                format_checker=FormatChecker(),
            )
        return self._validators[schema_name]

    def fast_validator(self, schema_name: str) -> Any:
        if schema_name not in self._fast:
            self.validator(schema_name)  # the same KeyError for an unknown schema
            schema = {
                "$ref": f"#/components/schemas/{schema_name}",
                "components": self.document["components"],
            }
            self._fast[schema_name] = jsonschema_rs.Draft202012Validator(
                schema, validate_formats=True
            )
        return self._fast[schema_name]

    def compile(self, names: Iterable[str] = CHECKED_SCHEMAS) -> None:
        """Compile these schemas now (at start-up), so no request pays for it. By default only
        those request bodies are checked against: each compiled schema is about 200 kB, all 29
        of them 6 MB, and the others compile on first use."""
        for name in names:
            self.validator(name)
            self.fast_validator(name)
            self._caps_of(name)

    def problems(self, schema_name: str, instance: Any, limit: int = 10) -> list[Problem]:
        # Array caps first, in time set by the schema, not the body: validating every item of
        # an array with 400,000 of them is the cost maxItems is there to refuse.
        oversized = list(self._oversized(schema_name, instance))
        if oversized:
            return sorted(oversized[:limit], key=lambda p: p.location)
        if self.fast_validator(schema_name).is_valid(instance):
            return []
        found = []
        for error in _leaf_errors(self.validator(schema_name).iter_errors(instance)):
            found.append(Problem(_location(error), _message(error)))
            if len(found) >= limit:
                break
        found.sort(key=lambda p: p.location)
        return found

    def _oversized(self, schema_name: str, instance: Any) -> Iterator[Problem]:
        """Arrays longer than their `maxItems`, found by following the schema's properties (and
        $ref, allOf, additionalProperties) into the instance; array items are not visited."""
        return _over_caps(self._caps_of(schema_name), instance, "")

    def _caps_of(self, schema_name: str) -> _Caps:
        plan = self._caps.get(schema_name)
        if plan is None:
            reference = {"$ref": f"#/components/schemas/{schema_name}"}
            plan = self._caps[schema_name] = _caps_plan(self.document, reference)
        return plan

    @cached_property
    def version(self) -> str:
        return str(self.document["info"]["version"])


class _Caps:
    """One schema, as far as array caps go: what applies to the same value ($ref, then allOf),
    its own `maxItems`, and what applies to its properties. Only the parts that lead to a cap
    are kept: a call walks the few places of a body that have one, not the whole schema."""

    __slots__ = ("cap", "extra", "names", "properties", "same_value")

    def __init__(self) -> None:
        self.same_value: list[_Caps] = []
        self.cap: int | None = None
        self.properties: list[tuple[str, _Caps]] = []
        self.names: frozenset[str] = frozenset()  # every property's, for additionalProperties
        self.extra: _Caps | None = None


def _caps_plan(document: Mapping[str, Any], schema: Any) -> _Caps:
    """`schema` (within `document`) compiled for _over_caps; a schema that refers to itself
    becomes a plan that refers to itself, followed only as deep as a body goes."""
    plans: dict[int, _Caps] = {}
    held: list[Any] = []  # the schemas keyed by id() above, kept alive while compiling

    def plan_of(node: Any) -> _Caps:
        if not isinstance(node, dict):
            node = {}
        known = plans.get(id(node))
        if known is not None:
            return known
        plan = plans[id(node)] = _Caps()
        held.append(node)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = document
            for part in ref[2:].split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            plan.same_value.append(plan_of(target))
        plan.same_value += [plan_of(part) for part in node.get("allOf", ())]
        cap = node.get("maxItems")
        plan.cap = cap if isinstance(cap, int) else None
        properties = node.get("properties", {})
        plan.properties = [(name, plan_of(sub)) for name, sub in properties.items()]
        plan.names = frozenset(properties)
        extra = node.get("additionalProperties")
        plan.extra = plan_of(extra) if isinstance(extra, dict) else None
        return plan

    root = plan_of(schema)
    # Keep only what leads to a cap: a plan leads to one if it has one or a part of it leads to
    # one, found by repeating until nothing changes (plans may refer to each other in a cycle).
    leads = {id(plan) for plan in plans.values() if plan.cap is not None}
    changed = True
    while changed:
        changed = False
        for plan in plans.values():
            parts = [*plan.same_value, *(sub for _, sub in plan.properties)]
            parts += [plan.extra] if plan.extra is not None else []
            if id(plan) not in leads and any(id(part) in leads for part in parts):
                leads.add(id(plan))
                changed = True
    for plan in plans.values():
        plan.same_value = [part for part in plan.same_value if id(part) in leads]
        plan.properties = [(name, sub) for name, sub in plan.properties if id(sub) in leads]
        if plan.extra is not None and id(plan.extra) not in leads:
            plan.extra = None
    return root


def _over_caps(plan: _Caps, instance: Any, where: str) -> Iterator[Problem]:
    """The Problems of `instance` against a _caps_plan, in the order the schema names them."""
    for part in plan.same_value:
        yield from _over_caps(part, instance, where)
    cap = plan.cap
    if cap is not None and isinstance(instance, list) and len(instance) > cap:
        yield Problem(where or "(body)", f"has {len(instance)} items; at most {cap} are accepted")
    if not isinstance(instance, dict):
        return
    for name, sub in plan.properties:
        if name in instance:
            yield from _over_caps(sub, instance[name], f"{where}.{name}".lstrip("."))
    extra = plan.extra
    if extra is not None:
        for name, value in instance.items():
            if name not in plan.names:
                yield from _over_caps(extra, value, f"{where}.{name}".lstrip("."))


def _leaf_errors(errors: Iterator[ValidationError]) -> Iterator[ValidationError]:
    """The most specific errors: allOf/oneOf wrappers say less than what they contain."""
    for error in errors:
        if error.context:
            yield from _leaf_errors(iter(error.context))
        else:
            yield error


def _location(error: ValidationError) -> str:
    parts = []
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".") or "(body)"


def _message(error: ValidationError) -> str:
    # jsonschema quotes the whole instance in some messages; a large FHIR Bundle must not be
    # echoed back into an error body or a log.
    message = error.message
    return message if len(message) <= 200 else message[:197] + "..."
