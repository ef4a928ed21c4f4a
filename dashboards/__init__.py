"""Grafana dashboards for the serving framework, as data (`definitions.py`) built into JSON files.

`python -m dashboards build` writes `dashboards/*.json`; `push` sends them and a Prometheus
datasource to Grafana; `prometheus` runs a local Prometheus scraping the Ray cluster. Metric names
come from `serving/metrics.py`; see docs/observability.md.
"""
