"""Launch state is shared by every worker: the real `flare-cds serve` (gunicorn, 2 workers) runs
whole launches whose steps land on whichever worker takes them, and its log keeps no secret."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.app.conftest import Agent
from tests.app.ehr_double import SmartEhr
from tests.conftest import ServeProcess


@pytest.mark.server
def test_launches_complete_across_gunicorn_workers(
    ehr: SmartEhr, serve_process: Callable[..., ServeProcess]
) -> None:
    server = serve_process(
        f"""
[fhir]
allowed_servers = ["{ehr.base_url}"]
deadline_seconds = 5.0
read_timeout_seconds = 5.0
""",
        workers=2,
    )
    ehr.app_url = f"{server.url}/app/launch"
    seen: list[str] = []
    for _ in range(6):
        agent = Agent()
        page = agent.get(ehr.launch_url("flare-after-rituximab"))
        assert page.status_code == 200, page.text
        assert "Patient/flare-after-rituximab" in page.text
        seen += list(agent.cookies.values())
        agent.http.close()
    assert ehr.refusals == []
    log = server.log()
    assert '"path": "/app/callback"' in log
    for secret in [*ehr.tokens, *seen, "flare-after-rituximab"]:
        assert secret not in log
