"""`python -m dashboards build | push | prometheus`: see docs/observability.md."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path


def _build(args) -> int:
    from dashboards.build import DIR, build_all, write_all

    if args.check:
        stale = [name for name, text in build_all().items()
                 if not (DIR / name).exists() or (DIR / name).read_text() != text]
        for name in stale:
            print(f"{DIR / name} differs from the definitions; run `python -m dashboards build`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_all():
        print(f"wrote {path}")
    return 0


def _push(args) -> int:
    from dashboards.push import PushError, push

    url = args.url or os.environ.get("GRAFANA_URL")
    token = args.token or os.environ.get("GRAFANA_TOKEN")
    user = args.user or os.environ.get("GRAFANA_USER")
    password = args.password or os.environ.get("GRAFANA_PASSWORD")
    if not url:
        print("error: give --url or set GRAFANA_URL", file=sys.stderr)
        return 2
    if token and (user or password):
        print("error: give a token or a user and password, not both", file=sys.stderr)
        return 2
    if bool(user) != bool(password):
        print("error: a user needs a password (--password or GRAFANA_PASSWORD), and a password a user",
              file=sys.stderr)
        return 2
    credential = token or ((user, password) if user else None)
    try:
        result = push(url, credential, args.prometheus_url, timeout=args.timeout)
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"datasource {result.datasource_uid}: {result.datasource_action}")
    for uid, action, path in result.dashboards:
        print(f"dashboard {uid}: {action} {url.rstrip('/')}{path}")
    return 0


def _prometheus(args) -> int:
    from dashboards import prometheus as prom

    try:
        session = prom.find_session_dir(args.ray_session, Path(args.ray_temp_dir))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="llm-prometheus-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = prom.write_config(workdir, prom.discovery_file(session, workdir), args.scrape_interval)
    print(f"Ray session {session}\nwrote {config}")
    if args.config_only:
        return 0
    try:
        proc = prom.start(config, workdir, args.port)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        prom.wait_ready(args.port, proc)
        print(f"Prometheus on http://127.0.0.1:{args.port} (data and log in {workdir}); Ctrl-C stops it")
        proc.wait()
        return proc.returncode or 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}; see {workdir / 'prometheus.log'}", file=sys.stderr)
        return 1
    finally:
        prom.stop(proc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="write dashboards/*.json from dashboards/definitions.py")
    p.add_argument("--check", action="store_true", help="only check that the JSON files are up to date")
    p.set_defaults(func=_build)

    p = sub.add_parser("push", help="push the dashboards and a Prometheus datasource to Grafana")
    p.add_argument("--url", help="Grafana's URL (env GRAFANA_URL)")
    p.add_argument("--token", help="API or service-account token (env GRAFANA_TOKEN)")
    p.add_argument("--user", help="basic-auth user (env GRAFANA_USER)")
    p.add_argument("--password", help="basic-auth password (env GRAFANA_PASSWORD)")
    p.add_argument("--prometheus-url", default=os.environ.get("PROMETHEUS_URL", "http://127.0.0.1:9090"),
                   help="Prometheus as Grafana's server reaches it (env PROMETHEUS_URL; default %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request (default %(default)s)")
    p.set_defaults(func=_push)

    p = sub.add_parser("prometheus", help="run a local Prometheus that scrapes the Ray cluster on this machine")
    p.add_argument("--ray-session", help="Ray session folder (default: <ray temp>/session_latest)")
    p.add_argument("--ray-temp-dir", default="/tmp/ray", help="Ray's temp folder (default %(default)s)")
    p.add_argument("--port", type=int, default=9090, help="listen on 127.0.0.1:PORT (default %(default)s)")
    p.add_argument("--workdir", help="folder for prometheus.yml, data and log (default: a new temp folder)")
    p.add_argument("--scrape-interval", default="5s", help="default %(default)s")
    p.add_argument("--config-only", action="store_true", help="write prometheus.yml and exit")
    p.set_defaults(func=_prometheus)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
