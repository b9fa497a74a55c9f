"""Rows naming the treatment history a card used: doses, inferred course starts, records that
are not doses, plasma exchanges done and drafted, BTK-inhibitor stops (date, status, record)."""

from __future__ import annotations

from collections.abc import Iterable

from service.cards.markdown import Markdown, day, table
from service.clinical.history import BtkStop, Course, Dose, PlasmaExchange

TREATMENT_HEADERS = ("Treatment", "Status", "Date", "Record")


def treatment_rows(
    course: Course | None = None,
    not_counted: Iterable[Dose] = (),
    exchanges: Iterable[PlasmaExchange] = (),
    drafted_exchanges: Iterable[str] = (),
    btk_stop: BtkStop | None = None,
) -> list[tuple[str, str, str, str]]:
    rows = []
    if course is not None:
        if course.inferred_from:
            rows.append(
                (
                    f"Course start of {course.drug}, inferred from the order "
                    "(no administration recorded)",
                    "order",
                    day(course.start),
                    course.inferred_from,
                )
            )
        for number, dose in enumerate(course.doses, start=1):
            rows.append((f"Dose {number}: {dose.drug}", dose.status, day(dose.when), dose.resource))
    for dose in not_counted:
        rows.append((f"Not a dose: {dose.drug}", dose.status, day(dose.when), dose.resource))
    for exchange in exchanges:
        rows.append(("Plasma exchange", exchange.status, day(exchange.when), exchange.resource))
    for reference in drafted_exchanges:
        rows.append(("Plasma exchange, among these orders", "draft", "", reference))
    if btk_stop is not None:
        rows.append(
            (
                f"{btk_stop.drug} stopped or held",
                btk_stop.status,
                day(btk_stop.when),
                btk_stop.resource,
            )
        )
    return rows


def treatment_table(rows: list[tuple[str, str, str, str]]) -> Markdown:
    if not rows:
        return Markdown("No anti-CD20 dose, plasma exchange or BTK-inhibitor stop is on record.")
    return Markdown("Treatment on record that this card used:\n\n" + table(TREATMENT_HEADERS, rows))
