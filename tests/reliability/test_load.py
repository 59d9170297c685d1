"""Load at CI size: ``bench/soak.py`` with 8 clients for 10 s, a worker SIGKILLed half-way.

The full-size run (32 clients, 60 s, with a neural slide) is ``python bench/soak.py``;
its numbers are in ``bench/results/soak.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, record

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


def test_soak_ci_size(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "bench" / "soak.py"), "--clients", "8", "--duration", "10", "--no-neural"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert out.exists(), proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert checks["some_requests"] and report["requests"] > 0
    assert report["errors_outside_kill_window"] == 0, report["error_statuses"]
    assert report["errors_in_kill_window"] <= report["config"]["clients"], (
        "only requests held by the killed worker fail"
    )
    assert checks["worker_replaced"], report["kill"]
    assert checks["memory_under_bound"], report["memory"]
    assert report["server_log_tracebacks"] == 0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record(
        "load_ci",
        {
            "clients": report["config"]["clients"],
            "duration_s": report["config"]["duration_s"],
            "requests": report["requests"],
            "errors": report["errors"],
            "errors_in_kill_window": report["errors_in_kill_window"],
            "p99_ms": report["latency_ms"]["p99"],
            "peak_workers_rss_mb": report["memory"]["peak_workers_rss_mb"],
            "memory_bound_mb": report["memory"]["bound_mb"],
            "worker_replaced_after_s": report["kill"].get("replaced_after_s"),
        },
    )
