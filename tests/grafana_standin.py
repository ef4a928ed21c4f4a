"""A stand-in for Grafana's HTTP API, for testing `python -m dashboards push`.

A stand-in because no real Grafana server can be installed on the build machines (it is in neither
Debian, PyPI nor npm). It implements only the part of the API that grafana-client calls for a
push, with Grafana's status codes and response shapes: `GET /api/frontend/settings` (health,
answered without credentials), `GET /api/search`, `POST /api/dashboards/db`,
`GET /api/dashboards/uid/<uid>`, `GET /api/datasources`, `GET /api/datasources/uid/<uid>`,
`GET /api/datasources/name/<name>`, `POST /api/datasources`, `PUT /api/datasources/uid/<uid>`.
Everything but the health call needs a bearer token or basic auth, else 401.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlparse


class GrafanaStandIn:
    """In-memory Grafana on 127.0.0.1 (a free port); use as a context manager."""

    def __init__(self, token: str = "test-token", user: str = "admin", password: str = "admin-password"):
        self.token, self.user, self.password = token, user, password
        self.dashboards: dict[str, dict[str, Any]] = {}  # uid -> {"id", "version", "dashboard"}
        self.datasources: dict[int, dict[str, Any]] = {}  # id -> datasource
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._next_id = 1
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "GrafanaStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def authorized(self, header: Optional[str]) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return value == self.token
        if scheme.lower() == "basic":
            return base64.b64decode(value).decode() == f"{self.user}:{self.password}"
        return False

    # Each handler returns (status, body).
    def search(self, query: dict[str, list[str]]):
        uids = query.get("dashboardUIDs")
        hits = [{"id": d["id"], "uid": uid, "title": d["dashboard"]["title"], "type": "dash-db",
                 "url": f"/d/{uid}/{_slug(d['dashboard']['title'])}", "tags": d["dashboard"].get("tags", [])}
                for uid, d in self.dashboards.items() if uids is None or uid in uids]
        if "query" in query:
            hits = [h for h in hits if query["query"][0].lower() in h["title"].lower()]
        return 200, hits

    def save_dashboard(self, body: dict[str, Any]):
        model = body.get("dashboard")
        if not isinstance(model, dict) or not model.get("title"):
            return 400, {"message": "Dashboard title cannot be empty"}
        uid = model.get("uid") or f"standin{self._next_id}"
        existing = self.dashboards.get(uid)
        if existing and not body.get("overwrite"):
            return 412, {"message": "A dashboard with the same uid already exists", "status": "name-exists"}
        entry = existing or {"id": self._new_id(), "version": 0}
        entry["version"] += 1
        entry["dashboard"] = {**model, "uid": uid, "id": entry["id"], "version": entry["version"]}
        self.dashboards[uid] = entry
        return 200, {"id": entry["id"], "uid": uid, "url": f"/d/{uid}/{_slug(model['title'])}",
                     "status": "success", "version": entry["version"], "slug": _slug(model["title"])}

    def get_dashboard(self, uid: str):
        if uid not in self.dashboards:
            return 404, {"message": "Dashboard not found"}
        return 200, {"dashboard": self.dashboards[uid]["dashboard"], "meta": {"slug": uid, "folderUid": ""}}

    def find_datasource(self, key: str, value: str):
        for ds in self.datasources.values():
            if ds.get(key) == value:
                return 200, ds
        return 404, {"message": "Data source not found"}

    def create_datasource(self, body: dict[str, Any]):
        if not body.get("name"):
            return 400, {"message": "Required field name missing"}
        for ds in self.datasources.values():
            if ds["name"] == body["name"] or (body.get("uid") and ds["uid"] == body["uid"]):
                return 409, {"message": "data source with the same name already exists"}
        ds_id = self._new_id()
        ds = {"access": "proxy", "jsonData": {}, "isDefault": False, **body, "id": ds_id,
              "uid": body.get("uid") or f"standin-ds-{ds_id}", "orgId": 1, "version": 1}
        self.datasources[ds_id] = ds
        return 200, {"datasource": ds, "id": ds_id, "message": "Datasource added", "name": ds["name"]}

    def update_datasource(self, uid: str, body: dict[str, Any]):
        status, ds = self.find_datasource("uid", uid)
        if status != 200:
            return status, ds
        for other in self.datasources.values():
            if other["id"] != ds["id"] and other["name"] == body.get("name"):
                return 409, {"message": "data source with the same name already exists"}
        ds.update({k: v for k, v in body.items() if k not in ("id", "orgId", "version")})
        ds["uid"], ds["version"] = uid, ds["version"] + 1
        return 200, {"datasource": ds, "id": ds["id"], "message": "Datasource updated", "name": ds["name"]}

    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any):
        routes = [
            ("GET", r"/api/search", lambda: self.search(query)),
            ("POST", r"/api/dashboards/db", lambda: self.save_dashboard(body)),
            ("GET", r"/api/dashboards/uid/(?P<v>[^/]+)", lambda v: self.get_dashboard(v)),
            ("GET", r"/api/datasources", lambda: (200, list(self.datasources.values()))),
            ("GET", r"/api/datasources/uid/(?P<v>[^/]+)", lambda v: self.find_datasource("uid", v)),
            ("GET", r"/api/datasources/name/(?P<v>[^/]+)", lambda v: self.find_datasource("name", v)),
            ("POST", r"/api/datasources", lambda: self.create_datasource(body)),
            ("PUT", r"/api/datasources/uid/(?P<v>[^/]+)", lambda v: self.update_datasource(v, body)),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path.rstrip("/"))
            if verb == method and match:
                with self._lock:
                    return handler(*(unquote(g) for g in match.groups()))
        return 404, {"message": "Not found"}


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _handler_for(grafana: GrafanaStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            grafana.requests.append((method, url.path))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if url.path.rstrip("/") == "/api/frontend/settings" and method == "GET":
                status, body = 200, {"buildInfo": {"version": "11.3.0", "commit": "stand-in"}}
            elif not grafana.authorized(self.headers.get("Authorization")):
                status, body = 401, {"message": "Unauthorized"}
            else:
                try:
                    payload = json.loads(raw) if raw else None
                except ValueError:
                    status, body = 400, {"message": "bad request data"}
                else:
                    status, body = grafana.route(method, url.path, parse_qs(url.query), payload)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

    return Handler
