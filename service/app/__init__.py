"""The IgM timeline: a SMART on FHIR app under /app/ that charts what the cards describe.

SMART App Launch (oauth), launch and session state sealed for the browser (sealed_state), the
patient's data judged by the hooks' own rules (reading), plain series for the chart (series,
chart_data), the SVG chart (chart, the only module that loads matplotlib, on the first chart
drawn, which drawing runs off the event loop) and the Flask routes and pages (views,
templates/, static/).

May import: Flask, requests, matplotlib, cryptography, the settings, service.api.runtime and
service.api.blocking, service.record (gathering, FHIR client, address policy),
service.clinical, service.cards and service.storage. Nothing outside this package imports it
except create_app and the hook route, which adds the card link.
"""
