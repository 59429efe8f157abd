"""The DAG processor's CPU while it re-parses the repository's DAG files, with and
without the warm parse (``airflow_local_settings.warm_parsing``; ``PACS_PRELOAD=0``
turns it off), alternated in one session.

    python -m benchmarks.dag_processor --repeats 2 --window 60

The processor keeps parsing for as long as Airflow runs (every
``[dag_processor] min_file_process_interval``, 30 s by default): its CPU is a cost
every deployment pays around the clock, beside the tasks' on the same cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.airflow_overhead import _env, _group_cpu_s

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTLE_S = 40  # started, the first parses done (not measured)


def processor_cpu_s(home: Path, window_s: float, warm: bool) -> float:
    """CPU-seconds of a DAG processor (its parses included) over ``window_s`` after it settled."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {
        **_env(home, 11112, "http://127.0.0.1:9", "bench", 25, home / "staging"),
        "PACS_PRELOAD": "1" if warm else "0",
    }
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=600
    )
    with open(home / "dag-processor.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow", "dag-processor"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            time.sleep(SETTLE_S)
            before = _group_cpu_s(proc.pid)
            time.sleep(window_s)
            return _group_cpu_s(proc.pid) - before
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured per run")
    parser.add_argument("--label", default="dag-processor")
    ns = parser.parse_args(argv)
    runs: dict[str, list[float]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="dagproc-") as tmp:
        for r in range(ns.repeats):  # alternated: drift hits both alike
            for side in ("cold", "warm") if r % 2 == 0 else ("warm", "cold"):
                runs[side].append(processor_cpu_s(Path(tmp) / side, ns.window, side == "warm"))
                print(f"repeat {r + 1}: {side} {runs[side][-1]:.2f} CPU-s", file=sys.stderr)
    per_hour = {k: statistics.median(v) / ns.window * 3600 for k, v in runs.items()}
    report = {"date": dt.date.today().isoformat(), "window_s": ns.window, "runs": runs, "cpu_s_per_hour": per_hour}
    rows = [
        f"# The DAG processor's CPU — {report['date']}",
        "",
        f"`airflow dag-processor` over this repository's DAG files, {ns.window:.0f} s measured after {SETTLE_S} s, "
        f"{ns.repeats} alternated runs a side (`python -m benchmarks.dag_processor`).",
        "",
        "| side | CPU-s per run | median CPU-s an hour |",
        "|---|---|---|",
        *(f"| {k} | {', '.join(f'{x:.2f}' for x in v)} | {per_hour[k]:.0f} |" for k, v in runs.items()),
        "",
        f"cold: each parse imports what it needs (`PACS_PRELOAD=0`); warm: imported once before the first fork. "
        f"Warm / cold: {per_hour['warm'] / per_hour['cold']:.2f}.",
    ]
    report["markdown"] = "\n".join(rows) + "\n"
    RESULTS.mkdir(exist_ok=True)
    stem = f"{report['date']}-{ns.label}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{stem}.md").write_text(report["markdown"])
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
