"""The dashboards against the metric specs: names, labels, variables, and the committed JSON."""

import json
import re
import shutil
import subprocess

import pytest

from dashboards import build as dashboard_build
from dashboards.definitions import DASHBOARDS, METRIC_PREFIX, all_queries, expand, metric_names
from serving import metrics as m

SERIES_NAME = re.compile(r"\bray_[a-z0-9_]+")


def _dashboard_texts() -> list[str]:
    """Every PromQL text the dashboards send: panel targets and variable queries."""
    texts = [expr for _, _, expr in all_queries()]
    for name in dashboard_build.build_all():
        model = json.loads((dashboard_build.DIR / name).read_text())
        texts += [v["definition"] for v in model["templating"]["list"] if v["type"] == "query"]
    # A `__name__` regex (the variables' selector) names a family of metrics, not one metric.
    return [re.sub(r'__name__=~"[^"]*"', "", t) for t in texts]


def test_every_metric_on_a_dashboard_is_defined():
    unknown = {name for text in _dashboard_texts() for name in SERIES_NAME.findall(text)
               if m.spec_for_exported(name) is None}
    assert not unknown, f"dashboards query metrics missing from serving/metrics.py: {sorted(unknown)}"


def test_variables_cover_every_metric():
    # The application and replica variables list the label values of every series under the prefix.
    assert all(name.startswith(METRIC_PREFIX) for spec in m.ALL for name in spec.series_names)


def test_every_metric_is_on_a_dashboard_or_internal():
    shown = set().union(*map(metric_names, _dashboard_texts()))
    missing = [s.name for s in m.ALL if s.name not in shown and not s.internal]
    assert not missing, f"metrics on no dashboard (show them or mark them internal): {missing}"


def test_labels_in_queries_exist():
    known = {label for s in m.ALL for label in s.labels} | set(m.SERVE_LABELS) | {"le", "__name__"}
    for _, title, expr in all_queries():
        for group in re.findall(r"\b(?:by|ignoring|on) \(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in known, f"{title}: unknown label {label!r} in {expr}"
        for label in re.findall(r"([a-z_]+)=~", expr):
            assert label in known, f"{title}: unknown label {label!r} in {expr}"


def test_every_query_is_filtered_by_the_template_variables():
    for _, title, expr in all_queries():
        selectors = re.findall(r"\{[^}]*\}", expr)
        assert selectors, title
        for s in selectors:
            assert 'application=~"$application"' in s and 'replica=~"$replica"' in s, f"{title}: {s}"


def test_json_files_equal_the_definitions():
    built = dashboard_build.build_all()
    assert sorted(built) == sorted(p.name for p in dashboard_build.DIR.glob("*.json"))
    for name, text in built.items():
        assert (dashboard_build.DIR / name).read_text() == text, f"{name} is stale: run `python -m dashboards build`"


def test_layout_and_ids():
    uids = [d.uid for d in DASHBOARDS]
    assert len(set(uids)) == len(uids)
    for d in DASHBOARDS:
        model = dashboard_build.build(d)
        ids = [p["id"] for p in model["panels"]]
        assert len(set(ids)) == len(ids)
        for p in model["panels"]:
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        names = [v["name"] for v in model["templating"]["list"]]
        assert names == ["datasource", "application", "replica"]


def test_build_command_check(tmp_path):
    from dashboards.__main__ import main

    assert main(["build", "--check"]) == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (apt-get install -y prometheus)")
def test_queries_parse_with_promtool(tmp_path):
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"check:{i}", "expr": expand(expr)} for i, (_, _, expr) in enumerate(all_queries())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
