"""Load test in one command: start `ncf_serve` on a model directory, run Locust headless against it on
127.0.0.1, and print requests/s, failures and p50/p95/p99 latency of the seed scenario, with the CPU
that the server, Locust and everything else on the machine used during the run.

    .venv/bin/python bench/load_test.py --model-dir /tmp/model --duration 60

The scenario (see bench/locustfile.py), `seed`, is POST /invocations with one user and 25 candidates:
what the endpoint serves. The recommendation path (client -> gateway -> feature store -> endpoint)
is measured by bench/bench_realtime.py.

The load generator runs on the same machine as the server, so the two compete for the cores. The
report accounts for it over the exact load window (measured inside Locust, see the locustfile):
server CPU from /proc (the server process and its uvicorn workers), Locust's from its own rusage,
and "other" is the machine's busy time (/proc/stat) minus both, i.e. whatever else was running.
Requests/s is requests divided by that window. A run where "other" is large was disturbed and
should be repeated.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ncf.serve.client import launch

HERE = Path(__file__).resolve().parent
SCENARIOS = {"seed": ("SeedUser", 2500, 20)}  # class, target req/s, target p99 ms


def locust(url: str, user_class: str, users: int, seconds: int, csv_prefix: Path, env: dict, log: Path) -> int:
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", url,
           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(csv_prefix), "--only-summary",
           "--stop-timeout", "5", "--exit-code-on-error", "0", user_class]
    with open(log, "ab") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def percentiles(csv_prefix: Path) -> dict:
    with open(f"{csv_prefix}_stats.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    return {p: float(row[f"{p}%"]) for p in ("50", "95", "99")}


def run_scenario(name: str, url: str, server_pid: int, args, workdir: Path) -> dict:
    user_class, target_rps, target_p99 = SCENARIOS[name]
    env = {**os.environ, "NCF_MODEL_DIR": str(args.model_dir), "NCF_USER_RATE": str(args.rate / args.users if args.rate else 0),
           "NCF_SERVER_PID": str(server_pid)}
    log, window = workdir / "locust.log", workdir / f"{name}-window.json"
    if args.warmup: locust(url, user_class, args.users, args.warmup, workdir / f"{name}-warmup", env, log)
    load = Path("/proc/loadavg").read_text().split()[:3]
    rc = locust(url, user_class, args.users, args.duration, workdir / name, {**env, "NCF_REPORT": str(window)}, log)
    if rc != 0 or not window.exists(): raise SystemExit(f"locust failed (status {rc}); see {log}")
    w = json.loads(window.read_text())
    wall, cpu = w["seconds"], w["cpu_seconds"]
    r = {"requests": w["requests"], "failures": w["failures"], "rps": w["requests"] / wall, **percentiles(workdir / name)}
    server, gen = cpu["server"] / wall, cpu["locust"] / wall
    busy = cpu["machine_busy"] / wall
    from ncf.serve.inference import serving_threads
    r.update(scenario=name, seconds=round(wall, 1), users=args.users, workers=args.workers,
             threads_per_worker=1 if args.workers > 1 else os.cpu_count(),                 # ncf_serve pins 1 per worker when it has several
             endpoint_threads_per_worker=serving_threads(os.cpu_count(), args.workers),    # what model_fn sets on an endpoint like this machine
             cpu_cores={"server": round(server, 2), "locust": round(gen, 2), "other": round(max(busy - server - gen, 0), 2),
                        "machine": os.cpu_count()},
             cpu_us_per_request={"server": round(cpu["server"] / max(r["requests"], 1) * 1e6), "locust": round(cpu["locust"] / max(r["requests"], 1) * 1e6)},
             loadavg_before=load, target={"rps": target_rps, "p99_ms": target_p99},
             passed=r["failures"] == 0 and r["rps"] >= target_rps and r["99"] <= target_p99)
    return r


def report(r: dict) -> str:
    c = r["cpu_cores"]
    return (f"{r['scenario']:5s} {r['rps']:8,.0f} req/s  {r['requests']:,} requests, {r['failures']} failures  "
            f"p50 {r['50']:g} ms  p95 {r['95']:g} ms  p99 {r['99']:g} ms  [{r['seconds']:g} s, {r['users']} Locust users, {r['workers']} server worker(s), {r['threads_per_worker']} thread(s) each;"
            f" an endpoint of {r['cpu_cores']['machine']} vCPUs with {r['workers']} worker(s) gives each {r['endpoint_threads_per_worker']}]\n"
            f"      CPU (cores of {c['machine']}): server {c['server']}, locust {c['locust']}, other {c['other']};"
            f" per request: server {r['cpu_us_per_request']['server']} µs, locust {r['cpu_us_per_request']['locust']} µs;"
            f" load average before {' '.join(r['loadavg_before'])}\n"
            f"      target ≥ {r['target']['rps']:,} req/s, p99 ≤ {r['target']['p99_ms']} ms, 0 failures: "
            + ("PASS" if r["passed"] else "FAIL"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--scenario", choices=tuple(SCENARIOS), default="seed")
    p.add_argument("--duration", type=int, default=60, help="seconds of measured load per scenario")
    p.add_argument("--warmup", type=int, default=5, help="seconds of unmeasured load first")
    p.add_argument("--users", type=int, default=16, help="concurrent Locust users (closed loop)")
    p.add_argument("--rate", type=float, default=0, help="pace the whole run at this many req/s (0: as fast as answered)")
    p.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the server")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ncf-load-"))
    proc = launch(args.model_dir, port=args.port, log_path=workdir / "server.log", workers=args.workers)
    results = []
    try:
        print(f"server {proc.url} (pid {proc.pid}), model {args.model_dir}; Locust logs and CSVs in {workdir}", flush=True)
        results.append(run_scenario(args.scenario, proc.url, proc.pid, args, workdir))
        print(report(results[-1]), flush=True)
    finally:
        proc.terminate(); proc.wait(timeout=30)
    if args.json: args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
