"""Grafana's JSON model from the definitions in `dashboards/definitions.py`.

The output is deterministic (fixed uids, panel ids and layout), so the committed JSON files can be
compared with a fresh build, and a push of the same file updates the same dashboard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dashboards.definitions import DASHBOARDS, VARIABLE_SELECTOR, Dashboard, Panel

DIR = Path(__file__).resolve().parent
DATASOURCE_UID = "llm-serving-prometheus"  # the Prometheus datasource that `push` creates or updates
DATASOURCE_NAME = "Prometheus (llm-serving)"
SCHEMA_VERSION = 39
PANEL_HEIGHT = 8
_DS = {"type": "prometheus", "uid": "${datasource}"}


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": _DS,
        "gridPos": {"h": PANEL_HEIGHT, "w": panel.width, "x": x, "y": y},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": _DS, "expr": t.expr, "legendFormat": t.legend,
             "range": True}
            for i, t in enumerate(panel.targets)
        ],
        "fieldConfig": {"defaults": {"unit": panel.unit, "min": 0}, "overrides": []},
    }
    if panel.kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "none", "textMode": "auto"}
    else:
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    return out


def _query_variable(name: str, label: str, selector: str) -> dict[str, Any]:
    query = f"label_values({selector}, {name})"
    return {
        "name": name, "label": label, "type": "query", "datasource": _DS,
        "query": {"query": query, "refId": f"{name}-variable"}, "definition": query,
        "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0, "regex": "", "options": [],
    }


def templating(datasource_uid: str = DATASOURCE_UID) -> dict[str, Any]:
    """The dashboards' variables: the Prometheus datasource, then application and replica."""
    app_selector = VARIABLE_SELECTOR[:-1] + ', application=~"$application"}'
    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {"selected": True, "text": DATASOURCE_NAME, "value": datasource_uid},
         "hide": 0, "refresh": 1, "regex": "", "options": []},
        _query_variable("application", "Application", VARIABLE_SELECTOR),
        _query_variable("replica", "Replica", app_selector),
    ]}


def build(dashboard: Dashboard) -> dict[str, Any]:
    """One dashboard's Grafana JSON model: a row panel per row, panels laid out left to right."""
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row in dashboard.rows:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id += 1
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + PANEL_HEIGHT
            panels.append(_panel(panel, next_id, x, y))
            next_id += 1
            x += panel.width
        y += PANEL_HEIGHT
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["llm-serving"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "templating": templating(),
        "annotations": {"list": []},
        "panels": panels,
    }


def render(model: dict[str, Any]) -> str:
    """The JSON text as committed: two-space indent, keys in build order, final newline."""
    return json.dumps(model, indent=2) + "\n"


def build_all() -> dict[str, str]:
    """File name -> JSON text for every dashboard."""
    return {d.filename: render(build(d)) for d in DASHBOARDS}


def write_all(directory: Path = DIR) -> list[Path]:
    """Write every dashboard's JSON into `directory`; returns the paths written."""
    paths = []
    for filename, text in build_all().items():
        path = Path(directory) / filename
        path.write_text(text)
        paths.append(path)
    return paths
