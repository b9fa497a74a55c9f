"""The whole SMART launch in headless Chromium: the EHR's chart page frames the app at 1024 px,
the launch runs inside the frame, and it ends on the timeline, whose table shows each IgM value
and whose chart has one mark per usable result. Screenshots are kept as test artifacts."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET

import pytest

from tests.app.browser import ARTIFACTS, chromium
from tests.app.conftest import igm_results
from tests.app.ehr_double import SmartEhr
from tests.conftest import LiveServer

SVG = {"svg": "http://www.w3.org/2000/svg"}
# Scenario -> (finding the page must read, unusable IgM results it must mark)
SCENARIOS = {
    "flare-after-rituximab": ("flare", 0),
    "btk-hold-rebound": ("btk-rebound", 0),
    "progression-after-flare-window": ("possible-progression", 0),
    "flare-mixed-units": ("flare", 1),
    "flare-viscosity-then-exchange": ("flare", 0),
}
# Scenarios whose chart must draw a plasma exchange from the treatment history.
WITH_EXCHANGE = {"flare-viscosity-then-exchange"}


def _chart(frame) -> ET.Element:  # type: ignore[no-untyped-def]
    source = frame.locator("#timeline-chart").get_attribute("src")
    prefix = "data:image/svg+xml;base64,"
    assert source.startswith(prefix)
    return ET.fromstring(base64.b64decode(source[len(prefix) :]))


def _marks(svg: ET.Element, gid: str) -> int:
    group = svg.find(f".//svg:g[@id='{gid}']", SVG)
    return 0 if group is None else len(group.findall(".//svg:use", SVG))


@pytest.fixture
def framed_app(app_factory, ehr: SmartEhr) -> LiveServer:  # type: ignore[no-untyped-def]
    return app_factory(app={"frame_ancestors": (ehr.origin,)})


def test_launch_in_an_ehr_frame_ends_on_the_timeline(framed_app: LiveServer, ehr: SmartEhr) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium(width=1100) as browser:
        page = browser.new_page()
        for scenario, (finding, unusable) in SCENARIOS.items():
            context = json.dumps(
                {"finding": finding or "flare", "card": "c0ffee00-0000-4000-8000-000000000000"}
            )
            page.goto(ehr.ehr_page(scenario, context))
            frame = page.frame_locator("#app")
            frame.locator("#values").wait_for(timeout=30_000)
            app_frame = page.frame(url=lambda url: "/app/" in url)
            assert app_frame is not None
            assert app_frame.url == f"{framed_app.url}/app/timeline"  # no code in the address
            rows = frame.locator("#values tbody tr")
            table = rows.all_inner_texts()
            results = igm_results(scenario)
            for observation_id, reported in results:
                assert any(reported in row and observation_id in row for row in table), reported
            svg = _chart(frame)
            usable = sum(1 for row in table if row.startswith("Serum IgM") and "\tused\t" in row)
            assert usable == len(results) - unusable
            assert _marks(svg, "igm-usable") == usable
            assert _marks(svg, "igm-unusable") == unusable
            readings = frame.locator(".finding").evaluate_all(
                "items => items.map(i => i.dataset.finding)"
            )
            assert readings == ([finding] if finding else [])
            exchanges = svg.find(".//svg:g[@id='plasma-exchanges-0']", SVG)
            assert (exchanges is not None) == (scenario in WITH_EXCHANGE), scenario
            # Usable at 1024 px: nothing wider than the frame.
            width = frame.locator("body").evaluate("b => b.scrollWidth")
            assert width <= 1024
            frame.locator("figure.chart").screenshot(path=str(ARTIFACTS / f"{scenario}.png"))
        page.emulate_media(media="print")
        page.screenshot(path=str(ARTIFACTS / "print-view.png"), full_page=True)
    assert ehr.refusals == []
