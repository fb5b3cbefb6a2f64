"""Locust load for `ncf_serve`; `bench/load_test.py` runs it headless and reports the figures.

One user class, named on the command line (`locust -f bench/locustfile.py SeedUser`): `SeedUser`
sends the seed request, `POST /invocations` with one user and 25 candidate items, what the endpoint
serves. The recommendation path through the gateway is measured by `bench/bench_realtime.py`.

Users and items are drawn from the catalogue of the model directory in `NCF_MODEL_DIR`, so every
request names known ids. Bodies are built once, before the run, so that Locust spends
its CPU on HTTP and not on building requests. `NCF_USER_RATE` (requests/s per Locust user) paces the
run with `constant_throughput`; unset, each user sends its next request as soon as the answer arrives.

When `NCF_REPORT` names a file, the run's exact load window is written there at the end: its length,
and the CPU seconds that the server (`NCF_SERVER_PID`), this Locust process and the whole machine
used inside it, so that the load generator's own CPU use on a shared machine can be accounted for.
"""
import json
import os
import random
import resource
import time
from pathlib import Path

import gevent
import pandas as pd
from locust import FastHttpUser, constant, constant_throughput, events, task

MODEL_DIR = Path(os.environ.get("NCF_MODEL_DIR", "/opt/ml/model"))
CANDIDATES = int(os.environ.get("NCF_CANDIDATES", "25"))
RATE = float(os.environ.get("NCF_USER_RATE", "0"))
JSON = {"Content-Type": "application/json"}

_rng = random.Random(0)
_users = pd.read_parquet(MODEL_DIR / "users.parquet").user_id.tolist()
_items = pd.read_parquet(MODEL_DIR / "items.parquet").item_id.tolist()
SEED_BODIES = [json.dumps({"user": [u] * CANDIDATES, "item": _rng.sample(_items, CANDIDATES)}).encode()
               for u in (_rng.choice(_users) for _ in range(4096))]


class _Base(FastHttpUser):
    abstract = True
    wait_time = constant_throughput(RATE) if RATE > 0 else constant(0)


class SeedUser(_Base):
    @task
    def seed(self):
        self.client.post("/invocations", data=random.choice(SEED_BODIES), headers=JSON, name="POST /invocations (25 candidates)")


# -- accounting of the load window -------------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")
_start = {}


def _snapshot() -> dict:
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    own = resource.getrusage(resource.RUSAGE_SELF)
    snap = {"t": time.monotonic(), "machine_busy": (sum(f[:8]) - f[3] - f[4]) / TICK, "locust": own.ru_utime + own.ru_stime}
    if pid := os.environ.get("NCF_SERVER_PID"):
        snap["server"] = tree_cpu(int(pid))
    return snap


def tree_cpu(root: int) -> float:
    "CPU seconds of a process and its descendants (the server and its uvicorn workers), from /proc."
    procs = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit(): continue
        try: f = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        procs[int(p.name)] = (int(f[1]), int(f[11]) + int(f[12]))   # ppid, utime + stime
    tree, total, grew = {root}, 0, True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
        tree |= more; grew = bool(more)
    return sum(procs[p][1] for p in tree if p in procs) / TICK


@events.test_start.add_listener
def _on_start(**kw):
    _start.update(_snapshot())


@events.test_stop.add_listener
def _on_stop(environment, **kw):
    if not (path := os.environ.get("NCF_REPORT")) or not _start: return
    end = _snapshot()
    total = environment.stats.total
    Path(path).write_text(json.dumps({"seconds": end["t"] - _start["t"], "requests": total.num_requests,
                                      "failures": total.num_failures,
                                      "cpu_seconds": {k: end[k] - _start[k] for k in ("machine_busy", "locust", "server") if k in end}}))


# libev caches "now": refresh it after the slow setup above, or Locust's --run-time timer fires early.
gevent.get_hub().loop.update_now()
