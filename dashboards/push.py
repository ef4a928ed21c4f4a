"""Push the dashboards and their Prometheus datasource to a Grafana server with grafana-client.

Idempotent: the datasource is found by its fixed uid (else by its name) and updated, or created;
each dashboard is saved under its fixed uid with `overwrite`, so a second push makes a new version
of the same dashboards, never copies. Credentials come from arguments or the environment only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from dashboards.build import DATASOURCE_NAME, DATASOURCE_UID, DIR
from dashboards.definitions import DASHBOARDS


class PushError(Exception):
    """A push that failed for a reason the user can fix; the message says which."""


@dataclass
class PushResult:
    datasource_uid: str
    datasource_action: str  # "created" or "updated"
    dashboards: list[tuple[str, str, str]]  # (uid, "created" or "updated", url)


def datasource_body(prometheus_url: str, uid: str = DATASOURCE_UID, name: str = DATASOURCE_NAME) -> dict[str, Any]:
    """The datasource as Grafana's API takes it; Grafana's server itself queries `prometheus_url`."""
    return {"uid": uid, "name": name, "type": "prometheus", "access": "proxy", "url": prometheus_url,
            "isDefault": False, "jsonData": {"httpMethod": "POST", "timeInterval": "5s"}}


def _load_dashboards(directory: Path) -> list[dict[str, Any]]:
    models = []
    for d in DASHBOARDS:
        path = Path(directory) / d.filename
        if not path.exists():
            raise PushError(f"{path} is missing; run `python -m dashboards build` first")
        models.append(json.loads(path.read_text()))
    return models


def _explain(url: str, exc: Exception) -> PushError:
    from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

    if isinstance(exc, GrafanaUnauthorizedError):
        return PushError(f"Grafana at {url} refused the credentials (401 Unauthorized): check the token, "
                         "or the user and password")
    if isinstance(exc, GrafanaClientError) and exc.status_code == 403:
        return PushError(f"Grafana at {url} denied access (403 Forbidden): the account needs the Editor role "
                         "for dashboards and Admin for datasources")
    if isinstance(exc, GrafanaException) and exc.status_code:
        return PushError(f"Grafana at {url} answered {exc.status_code}: {exc.message}")
    return PushError(f"cannot reach Grafana at {url}: {exc}")


def _find_datasource(api, uid: str, name: str) -> Optional[dict[str, Any]]:
    from grafana_client.client import GrafanaClientError

    for lookup, key in ((api.datasource.get_datasource_by_uid, uid), (api.datasource.get_datasource_by_name, name)):
        try:
            return lookup(key)
        except GrafanaClientError as exc:
            if exc.status_code != 404:
                raise
    return None


def _upsert_datasource(api, body: dict[str, Any]) -> tuple[str, str]:
    existing = _find_datasource(api, body["uid"], body["name"])
    if existing is None:
        created = api.datasource.create_datasource(body)
        return created.get("datasource", {}).get("uid", body["uid"]), "created"
    # NOTE: a datasource made by hand under our name keeps its own uid; the dashboards point at it.
    uid = existing["uid"]
    api.datasource.update_datasource_by_uid(uid, {**existing, **body, "uid": uid})
    return uid, "updated"


def _point_at_datasource(model: dict[str, Any], ds_uid: str) -> dict[str, Any]:
    """The dashboard with its datasource variable defaulting to `ds_uid`, and no numeric id."""
    model = json.loads(json.dumps(model))
    for variable in model.get("templating", {}).get("list", []):
        if variable.get("type") == "datasource":
            variable["current"] = {"selected": True, "text": DATASOURCE_NAME, "value": ds_uid}
    model["id"] = None
    return model


def push(url: str, credential: Union[str, tuple[str, str], None], prometheus_url: str,
         directory: Path = DIR, timeout: float = 10.0) -> PushResult:
    """Push the datasource and every dashboard JSON in `directory` to the Grafana at `url`.

    `credential` is an API or service-account token, or (user, password). Raises PushError with a
    readable message for an unreachable server, refused credentials or a refused request.
    """
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException
    from niquests.exceptions import RequestException

    models = _load_dashboards(directory)
    api = GrafanaApi.from_url(url, credential=credential, timeout=timeout)
    try:
        api.health.check()  # reachability; it may answer without credentials
        ds_uid, ds_action = _upsert_datasource(api, datasource_body(prometheus_url))
        results = []
        for model in models:
            uid = model["uid"]
            found = api.search.search_dashboards(type_="dash-db", dashboard_uids=[uid])
            existed = any(hit.get("uid") == uid for hit in found or [])
            model = _point_at_datasource(model, ds_uid)
            saved = api.dashboard.update_dashboard(
                {"dashboard": model, "overwrite": True, "message": "python -m dashboards push"})
            results.append((uid, "updated" if existed else "created", saved.get("url", "")))
    except (GrafanaException, RequestException, OSError) as exc:
        raise _explain(url, exc) from exc
    return PushResult(ds_uid, ds_action, results)
