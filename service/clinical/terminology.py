"""Value sets: which codes mean serum IgM, viscosity, WM, hyperviscosity, anti-CD20 and BTK drugs.

The codes are data (`service/clinical/data/valuesets.json`) extended by `[terminology]` in the
config, so a site can add local lab codes without touching the logic. Built once per app, then
read-only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import lru_cache
from importlib import resources
from typing import Any

from service.clinical.fhir_values import objects
from service.clinical.name_screen import (
    NEVER,
    folded_for_screen,
    no_name_in_folded,
    none_named,
    plain_names,
    remember_plain,
    search_names,
)
from service.settings import TerminologySettings

ICD10_SYSTEMS = frozenset({"http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10"})


@lru_cache(maxsize=4096)
def normalise_code(system: str, code: str) -> tuple[str, str]:
    """ICD-10 codes arrive both as "C88.0" and "C880"; compare them without the dot.

    Cached: charts share a small vocabulary (the same LOINC, ICD-10 and RxNorm codes recur
    in every patient's record), and this runs for every coding read."""
    system = system.strip()
    code = code.strip()
    if system in ICD10_SYSTEMS:
        code = code.replace(".", "").upper()
    return system, code


@dataclass(frozen=True)
class DrugGroup:
    """One drug (with its brands and products), recognised by code or by name in free text.

    `unverified` holds the (system, code) pairs of `codes` that no public terminology source
    confirmed (`verified: false` in valuesets.json): a match on one says so on the card.
    """

    name: str
    codes: frozenset[tuple[str, str]]
    name_pattern: re.Pattern[str]
    unverified: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class ConditionSet:
    """Diagnosis codes, and names recognised in a Condition's text when no coding matches."""

    codes: frozenset[tuple[str, str]]
    name_pattern: re.Pattern[str]

    def __contains__(self, pair: object) -> bool:
        return pair in self.codes


@dataclass(frozen=True)
class Terminology:
    igm: frozenset[tuple[str, str]]
    viscosity: frozenset[tuple[str, str]]
    wm_conditions: ConditionSet
    hyperviscosity_conditions: ConditionSet
    anti_cd20: tuple[DrugGroup, ...]
    btk_inhibitors: tuple[DrugGroup, ...]
    mgus_conditions: ConditionSet
    hyperviscosity_symptoms: ConditionSet
    plasma_exchange: frozenset[tuple[str, str]]
    # Both drug classes in one tuple, made once: a record's orders are screened once for either
    # class (match_drug finds no group of it only when it finds none of either class alone).
    drug_groups: tuple[DrugGroup, ...] = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "drug_groups", self.anti_cd20 + self.btk_inhibitors)

    def igm_search_codes(self) -> str:
        """The `code=` parameter for a FHIR search that finds every code counted as serum IgM."""
        return ",".join(f"{system}|{code}" for system, code in sorted(self.igm))

    def viscosity_search_codes(self) -> str:
        return ",".join(f"{system}|{code}" for system, code in sorted(self.viscosity))


def codings_of(concept: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(system, code) pairs of a CodeableConcept, normalised; malformed codings are skipped."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return []
    pairs = []
    for coding in codings:  # objects(), inlined: this runs for every coded resource
        if not isinstance(coding, dict):
            continue
        system, code = coding.get("system"), coding.get("code")
        if isinstance(system, str) and isinstance(code, str):
            pairs.append(normalise_code(system, code))
    return pairs


def concept_matches(
    concept: Mapping[str, Any] | None, codes: frozenset[tuple[str, str]] | ConditionSet
) -> bool:
    """Whether a coding of the CodeableConcept is in `codes` (normalised pairs)."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return False
    for coding in codings:  # objects(), inlined: this runs for every result read
        if not isinstance(coding, dict):
            continue
        system, code = coding.get("system"), coding.get("code")
        if not isinstance(system, str) or not isinstance(code, str):
            continue
        # Most codes arrive as `codes` holds them; normalising one that is already normal
        # changes nothing, so a pair found as sent is found.
        if (system, code) in codes or normalise_code(system, code) in codes:
            return True
    return False


def concept_named(concept: Mapping[str, Any] | None, pattern: re.Pattern[str]) -> str | None:
    """The text or display of a CodeableConcept in which `pattern` finds a name, if any."""
    if not isinstance(concept, dict):
        return None
    texts = [concept.get("text")] + [c.get("display") for c in objects(concept.get("coding"))]
    strings = [text for text in texts if isinstance(text, str)]
    return named_text(pattern, strings, folded_for_screen(strings))


def named_text(pattern: re.Pattern[str], texts: list[str], folded: str) -> str | None:
    """The first of `texts` in which `pattern` finds a name, stripped; `folded` is
    folded_for_screen(texts), made once by a caller that screens them for several patterns."""
    if no_name_in_folded(pattern, folded):
        return None
    for text in texts:
        if search_names(pattern, text):
            return text.strip()
    return None


# How many answers match_drug keeps per tuple of groups (emptied when full), and for which
# concepts: a memo must not keep whatever long text a client sends (at most about 2 MB here).
_MATCH_MEMO_SIZE = 1024
_MEMO_CODINGS = 4
_MEMO_CHARS = 160


def match_drug(
    concept: Mapping[str, Any] | None, groups: tuple[DrugGroup, ...]
) -> tuple[DrugGroup, str] | None:
    """The drug group a CodeableConcept names, and how it was recognised (for the card).

    Codes win over names; names are looked for only when no coding matches, in `text` and in
    each coding's `display`, as whole words so that e.g. "rituximab-abbs" is told apart. Within
    a group a verified code is named before an unverified one, which is marked as such.

    Answers are remembered by what is read of the concept (its text, each coding's system, code
    and display): a chart names the same medications on order after order, and order-select
    sends the chart again each time an order is selected.
    """
    if not isinstance(concept, dict):
        return None
    key = _memo_key(concept)
    if key is None:
        return _match_drug(concept, groups)
    memo = _screen(groups)[3]
    try:
        return memo[key]
    except KeyError:
        pass
    except TypeError:  # a value that cannot be a key (an object as display): not remembered
        return _match_drug(concept, groups)
    if len(memo) >= _MATCH_MEMO_SIZE:
        memo.clear()
    found = memo[key] = _match_drug(concept, groups)
    return found


def _memo_key(concept: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """All that match_drug reads of `concept`, or None if it is too long to remember."""
    text = concept.get("text")
    codings = concept.get("coding")
    if not isinstance(codings, list):
        codings = ()
    elif len(codings) > _MEMO_CODINGS:
        return None
    key = [text]
    for coding in codings:
        if isinstance(coding, dict):  # match_drug skips any other
            key += (coding.get("system"), coding.get("code"), coding.get("display"))
    for value in key:
        if isinstance(value, str) and len(value) > _MEMO_CHARS:
            return None
    return tuple(key)


def _match_drug(
    concept: Mapping[str, Any], groups: tuple[DrugGroup, ...]
) -> tuple[DrugGroup, str] | None:
    any_code, any_name, any_plain, _ = _screen(groups)
    # One pass over the codings (as codings_of and objects() would read them): their pairs for
    # the codes, their displays for the names.
    pairs: list[tuple[str, str]] = []
    texts = [concept.get("text")]
    codings = concept.get("coding")
    for coding in codings if isinstance(codings, list) else ():
        if not isinstance(coding, dict):
            continue
        texts.append(coding.get("display"))
        system, code = coding.get("system"), coding.get("code")
        if isinstance(system, str) and isinstance(code, str):
            pairs.append(normalise_code(system, code))
    for group in () if any_code.isdisjoint(pairs) else groups:
        matched = [pair for pair in pairs if pair in group.codes]
        if matched:
            verified = [pair for pair in matched if pair not in group.unverified]
            system, code = (verified or matched)[0]
            how = f"{_system_label(system)} {code}"
            if not verified:
                how += " (code not verified)"
            return group, how
    strings = [text for text in texts if isinstance(text, str)]
    if none_named(any_plain, strings):
        return None  # most orders on a chart: no name of any group in any of their texts
    for text in strings:
        if not search_names(any_name, text):
            continue
        for group in groups:
            if group.name_pattern.search(text):
                return group, f'name "{text.strip()[:80]}"'
    return None


# Per tuple of groups: every code of any group, and one pattern for every name of any group
# (with its plain names, see search_names). Most medications on a chart are none of these
# drugs; one set lookup and one name screen tell so, instead of one of each per group. Then
# match_drug's answers for the groups. Keyed by id(), the tuple kept to make the key safe.
_Screen = tuple[
    frozenset[tuple[str, str]],
    re.Pattern[str],
    tuple[str, ...] | None,
    dict[Any, tuple[DrugGroup, str] | None],
]
_SCREENS: dict[int, tuple[tuple[DrugGroup, ...], _Screen]] = {}


def _screen(groups: tuple[DrugGroup, ...]) -> _Screen:
    cached = _SCREENS.get(id(groups))
    if cached is None or cached[0] is not groups:
        codes = frozenset().union(*(group.codes for group in groups))
        patterns = [g.name_pattern.pattern for g in groups if g.name_pattern is not NEVER]
        names = re.compile("|".join(patterns), re.IGNORECASE) if patterns else NEVER
        plain = [plain_names(g.name_pattern) for g in groups]
        if names is not NEVER and None not in plain:
            remember_plain(names, (n for group_names in plain for n in group_names or ()))
        cached = _SCREENS[id(groups)] = (groups, (codes, names, plain_names(names), {}))
    return cached[1]


def _system_label(system: str) -> str:
    return {
        "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
        "http://www.whocc.no/atc": "ATC",
    }.get(system, system)


@lru_cache(maxsize=1)
def _shipped() -> dict[str, Any]:
    text = resources.files("service.clinical").joinpath("data/valuesets.json").read_text("utf-8")
    return json.loads(text)


def _code_set(
    entries: Iterable[Mapping[str, Any]], extra: Iterable[str]
) -> frozenset[tuple[str, str]]:
    pairs = {normalise_code(e["system"], e["code"]) for e in entries}
    for item in extra:
        system, _, code = item.partition("|")
        pairs.add(normalise_code(system, code))
    return frozenset(pairs)


# An FDA biosimilar's nonproprietary name is the core name and a suffix of four lowercase letters.
_BIOSIMILAR_SUFFIX = r"-[a-z]{4}"


def _name_pattern(names: Iterable[str], suffixed: Iterable[str] = ()) -> re.Pattern[str]:
    """Whole-word, case-insensitive match of any of `names` (never matches when there are none)."""
    names, suffixed = list(names), list(suffixed)  # each read twice: pattern, then plain names
    # Longest names first so "rituximab-abbs" is preferred over its prefix "rituximab".
    alternatives = [re.escape(n.strip()) for n in sorted(names, key=len, reverse=True)]
    # "rituximab-xyzz", a biosimilar not listed as a group of its own, is still rituximab;
    # listed biosimilars are matched first (see the sort below) so the card names them.
    alternatives += [re.escape(n) + _BIOSIMILAR_SUFFIX for n in suffixed]
    if not alternatives:
        return NEVER
    pattern = re.compile(r"(?<![\w-])(" + "|".join(alternatives) + r")(?![\w-])", re.IGNORECASE)
    plain = [n.strip().lower() for n in (*names, *suffixed)]
    if all(name.isascii() for name in plain):
        remember_plain(pattern, plain)
    return pattern


def _drug_groups(
    entries: Iterable[Mapping[str, Any]],
    extra: Iterable[str],
    extra_name: str,
    extra_names: Iterable[str] = (),
) -> tuple[DrugGroup, ...]:
    groups = []
    for entry in entries:
        pattern = _name_pattern(entry["names"], entry.get("suffixed_names", ()))
        unverified = _code_set((e for e in entry["codes"] if not e.get("verified", False)), ())
        groups.append(DrugGroup(entry["name"], _code_set(entry["codes"], ()), pattern, unverified))
    # Biosimilars and brands are checked before plain "rituximab" so the card names the product.
    groups.sort(key=lambda g: g.name == "rituximab")
    extra_codes = _code_set((), extra)
    if extra_codes:
        groups.append(DrugGroup(extra_name, extra_codes, NEVER))
    # A site-configured name is a drug of its own: the card names it as the site wrote it.
    for name in extra_names:
        groups.append(DrugGroup(name.strip(), frozenset(), _name_pattern([name])))
    return tuple(groups)


def _condition_set(
    data: Mapping[str, Any], key: str, extra_codes: Iterable[str], extra_names: Iterable[str] = ()
) -> ConditionSet:
    names = [*data.get(f"{key}_names", ()), *extra_names]
    return ConditionSet(_code_set(data[key], extra_codes), _name_pattern(names))


def build_terminology(settings: TerminologySettings) -> Terminology:
    data = _shipped()
    return Terminology(
        igm=_code_set(data["igm"], settings.igm_codes),
        viscosity=_code_set(data["viscosity"], settings.viscosity_codes),
        wm_conditions=_condition_set(
            data, "wm_conditions", settings.wm_condition_codes, settings.wm_condition_names
        ),
        hyperviscosity_conditions=_condition_set(
            data,
            "hyperviscosity_conditions",
            settings.hyperviscosity_condition_codes,
            settings.hyperviscosity_condition_names,
        ),
        anti_cd20=_drug_groups(
            data["anti_cd20"],
            settings.anti_cd20_codes,
            "anti-CD20 antibody (site-configured code)",
            settings.anti_cd20_names,
        ),
        btk_inhibitors=_drug_groups(
            data["btk_inhibitors"],
            settings.btk_inhibitor_codes,
            "BTK inhibitor (site-configured code)",
            settings.btk_inhibitor_names,
        ),
        mgus_conditions=_condition_set(data, "mgus_conditions", settings.mgus_condition_codes),
        hyperviscosity_symptoms=_condition_set(
            data, "hyperviscosity_symptoms", settings.hyperviscosity_symptom_codes
        ),
        plasma_exchange=_code_set(data["plasma_exchange"], settings.plasma_exchange_codes),
    )
