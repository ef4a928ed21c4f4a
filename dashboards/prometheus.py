"""A local Prometheus that scrapes a Ray cluster on this machine, for the dashboards to query.

Ray lists its metrics endpoints in `prom_metrics_service_discovery.json` in the session folder
(written by the Ray dashboard process, so only with the dashboard on). Prometheus reads it with
`file_sd_configs`, and a relabel rule points every target at 127.0.0.1 (Ray lists the node's
address). With the dashboard off (`include_dashboard=False`), the file is missing: we write one in
the same format from the `metrics_export_port_*` files Ray leaves in the session folder.

Everything listens on loopback; data lives in a temporary folder. Uses Debian's `prometheus`
binary (`apt-get install -y prometheus`), started by us (no systemd).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

SD_FILENAME = "prom_metrics_service_discovery.json"  # ray._private.ray_constants, read without Ray
DEFAULT_RAY_TEMP = Path("/tmp/ray")

CONFIG_TEMPLATE = """\
# Written by `python -m dashboards prometheus`: scrape the Ray cluster's metrics on this machine.
global:
  scrape_interval: {scrape_interval}
  evaluation_interval: {scrape_interval}
scrape_configs:
  - job_name: ray
    file_sd_configs:
      - files: ['{sd_file}']
        refresh_interval: 5s
    relabel_configs:
      # Ray lists each node by its address; on one machine every endpoint is on loopback.
      - source_labels: [__address__]
        regex: '.*:([0-9]+)'
        target_label: __address__
        replacement: '127.0.0.1:$1'
"""


def find_session_dir(session_dir: Optional[Path] = None, ray_temp_dir: Path = DEFAULT_RAY_TEMP) -> Path:
    """The Ray session folder: the one given, else `<ray temp>/session_latest` resolved.

    NOTE: session_latest is the newest cluster started on this machine under that temp folder;
    pass the session folder explicitly where several clusters run.
    """
    path = Path(session_dir) if session_dir else Path(ray_temp_dir) / "session_latest"
    if not path.exists():
        raise FileNotFoundError(f"no Ray session folder at {path}: start Ray first, or give --ray-session")
    return path.resolve()


def discovery_file(session_dir: Path, workdir: Path) -> Path:
    """Ray's service-discovery file if the cluster writes one, else one we write from its port files."""
    ray_file = Path(session_dir) / SD_FILENAME
    if ray_file.exists():
        return ray_file
    ports = sorted(p.read_text().strip() for p in Path(session_dir).glob("metrics_export_port_*"))
    if not ports:
        raise FileNotFoundError(f"{session_dir} has neither {SD_FILENAME} nor metrics_export_port_* files")
    own = Path(workdir) / SD_FILENAME
    own.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{p}" for p in ports]}]))
    return own


def write_config(workdir: Path, sd_file: Path, scrape_interval: str = "5s") -> Path:
    """Write `prometheus.yml` into `workdir`; returns its path."""
    path = Path(workdir) / "prometheus.yml"
    path.write_text(CONFIG_TEMPLATE.format(scrape_interval=scrape_interval, sd_file=Path(sd_file).resolve()))
    return path


def find_binary(binary: str = "prometheus") -> Optional[str]:
    return shutil.which(binary)


def start(config: Path, workdir: Path, port: int, binary: str = "prometheus") -> subprocess.Popen:
    """Start Prometheus on 127.0.0.1:`port` with its data under `workdir`; the caller stops it."""
    exe = find_binary(binary)
    if exe is None:
        raise FileNotFoundError(f"'{binary}' not found: apt-get install -y prometheus")
    log = open(Path(workdir) / "prometheus.log", "ab")
    try:
        return subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={Path(workdir) / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    finally:
        log.close()


def wait_ready(port: int, proc: Optional[subprocess.Popen] = None, timeout_s: float = 30.0) -> None:
    """Wait until Prometheus answers /-/ready; raise if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"prometheus on 127.0.0.1:{port} not ready after {timeout_s} s")


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop a Prometheus we started: SIGTERM, then SIGKILL after `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
