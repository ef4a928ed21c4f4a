"""`python -m dashboards push` against the Grafana stand-in (tests/grafana_standin.py)."""

import json
import socket

import pytest

pytest.importorskip("grafana_client")

from dashboards.__main__ import main  # noqa: E402
from dashboards.build import DATASOURCE_NAME, DATASOURCE_UID, DIR  # noqa: E402
from dashboards.definitions import DASHBOARDS  # noqa: E402
from dashboards.push import PushError, push  # noqa: E402
from tests.grafana_standin import GrafanaStandIn  # noqa: E402

PROM = "http://127.0.0.1:9090"


@pytest.fixture
def grafana():
    with GrafanaStandIn() as g:
        yield g


@pytest.fixture(autouse=True)
def no_grafana_env(monkeypatch):
    for name in ("GRAFANA_URL", "GRAFANA_TOKEN", "GRAFANA_USER", "GRAFANA_PASSWORD", "PROMETHEUS_URL"):
        monkeypatch.delenv(name, raising=False)


def test_push_creates_datasource_and_dashboards(grafana):
    result = push(grafana.url, grafana.token, PROM)
    assert (result.datasource_uid, result.datasource_action) == (DATASOURCE_UID, "created")
    assert [(uid, action) for uid, action, _ in result.dashboards] == [(d.uid, "created") for d in DASHBOARDS]
    (ds,) = grafana.datasources.values()
    assert (ds["uid"], ds["name"], ds["type"], ds["url"]) == (DATASOURCE_UID, DATASOURCE_NAME, "prometheus", PROM)
    for d in DASHBOARDS:
        stored = grafana.dashboards[d.uid]["dashboard"]
        on_disk = json.loads((DIR / d.filename).read_text())
        assert stored["panels"] == on_disk["panels"] and stored["title"] == on_disk["title"]
        assert stored["templating"]["list"][0]["current"]["value"] == DATASOURCE_UID
    assert ("GET", "/api/frontend/settings") in grafana.requests


def test_second_push_updates_not_duplicates(grafana):
    push(grafana.url, grafana.token, PROM)
    result = push(grafana.url, grafana.token, "http://127.0.0.1:9191")
    assert result.datasource_action == "updated"
    assert [action for _, action, _ in result.dashboards] == ["updated"] * len(DASHBOARDS)
    assert len(grafana.datasources) == 1 and len(grafana.dashboards) == len(DASHBOARDS)
    (ds,) = grafana.datasources.values()
    assert ds["url"] == "http://127.0.0.1:9191"
    assert all(entry["version"] == 2 for entry in grafana.dashboards.values())


def test_datasource_made_by_hand_is_found_by_name(grafana):
    grafana.create_datasource({"name": DATASOURCE_NAME, "uid": "hand-made", "type": "prometheus", "url": "x"})
    result = push(grafana.url, grafana.token, PROM)
    assert (result.datasource_uid, result.datasource_action) == ("hand-made", "updated")
    assert len(grafana.datasources) == 1
    for d in DASHBOARDS:
        assert grafana.dashboards[d.uid]["dashboard"]["templating"]["list"][0]["current"]["value"] == "hand-made"


def test_basic_auth_through_the_command(grafana, capsys):
    argv = ["push", "--url", grafana.url, "--user", grafana.user, "--password", grafana.password]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"datasource {DATASOURCE_UID}: created" in out
    assert all(f"dashboard {d.uid}: created" in out for d in DASHBOARDS)


def test_environment_variables(grafana, monkeypatch, capsys):
    monkeypatch.setenv("GRAFANA_URL", grafana.url)
    monkeypatch.setenv("GRAFANA_TOKEN", grafana.token)
    assert main(["push"]) == 0
    assert main(["push"]) == 0
    assert capsys.readouterr().out.count(": updated") == 1 + len(DASHBOARDS)


def test_bad_credentials_fail_clearly(grafana, capsys):
    with pytest.raises(PushError, match="401"):
        push(grafana.url, "wrong-token", PROM)
    assert main(["push", "--url", grafana.url, "--user", "admin", "--password", "wrong"]) == 1
    err = capsys.readouterr().err
    assert "refused the credentials (401 Unauthorized)" in err and "Traceback" not in err
    assert not grafana.datasources and not grafana.dashboards


def test_no_credentials_fail_clearly(grafana, capsys):
    assert main(["push", "--url", grafana.url]) == 1
    assert "401" in capsys.readouterr().err


def test_unreachable_server_fails_clearly(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["push", "--url", f"http://127.0.0.1:{port}", "--token", "t", "--timeout", "3"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach Grafana at http://127.0.0.1:{port}" in err and "Traceback" not in err


def test_usage_errors(capsys):
    assert main(["push"]) == 2
    assert "GRAFANA_URL" in capsys.readouterr().err
    assert main(["push", "--url", "http://127.0.0.1:1", "--token", "t", "--user", "u", "--password", "p"]) == 2
    assert main(["push", "--url", "http://127.0.0.1:1", "--user", "u"]) == 2
