"""The whole real-time path under load, on this machine: wrk -> ncf_gateway (the recommendation Lambda's code)
-> feature store (Redis or SQLite) -> ncf_serve through SageMaker's runtime API (two HTTP hops).

    .venv/bin/python bench/bench_realtime.py                       # demo-sized shop, both stores, both clients
    .venv/bin/python bench/bench_realtime.py --random-catalogue --items 100000 --users 50000 --duration 60

Each request is `GET /recommendations/{user}?k=10` for a random known user: the user's top 10 of a
200-item candidate pool (popular and new items without the user's history). Printed per run:
requests/s, p50/p99 latency, non-2xx answers, the share of answers that used a fallback, and the
CPU time per request of each component (gateway, endpoint, store, wrk) from /proc over the run:
the load generator shares the 2 cores, so its CPU is part of the figure, as in bench/load_test.py.
A baseline in the same run: the endpoint alone with the seed request (wrk, 25 candidates).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from ncf.data.preprocess import preprocess
from ncf.data.synthetic import SyntheticSpec, write_days
from ncf.data.dataset import load_splits
from ncf.serve.client import free_port, launch, launch_gateway
from ncf.serve.inference import Recommender
from ncf.serve.store import load_features, open_store
from ncf.train.config import TrainConfig
from ncf.train.trainer import save_model, train

TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    "CPU seconds (user + system) of `pid` and all its descendants, now."
    parent, cpu = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit(): continue
        try: f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        parent[int(d.name)], cpu[int(d.name)] = int(f[1]), (int(f[11]) + int(f[12])) / TICKS
    todo, total = [pid], 0.0
    while todo:
        p = todo.pop(); total += cpu.get(p, 0.0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def wrk(url: str, script: Path, seconds: int, connections: int) -> dict:
    "Run wrk; its report (requests/s, latency percentiles, non-2xx) and its own CPU seconds."
    t0 = os.times()
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    t1 = os.times()
    r = {"wrk_cpu": (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system), "raw": out}
    for line in out.splitlines():
        parts = line.split()
        if line.strip().startswith("Requests/sec:"): r["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"): r[f"p{parts[0][:-1]}_ms"] = _ms(parts[1])
        elif "requests in" in line: r["requests"] = int(parts[0])
        elif "Non-2xx" in line: r["non2xx"] = int(parts[-1])
        elif "Socket errors" in line: r["socket_errors"] = line.strip()
    r.setdefault("non2xx", 0)
    return r


def _ms(s: str) -> float:
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if s.endswith(unit) and s[:-len(unit)].replace(".", "").isdigit(): return float(s[:-len(unit)]) * f
    raise ValueError(s)


def lua_users(path: Path, users: list, k: int = 10):
    "A wrk script of GET /recommendations/{user}?k= over `users`, in a seeded random order."
    rnd = random.Random(1)
    picks = [str(rnd.choice(users)) for _ in range(4096)]
    path.write_text("local paths = {" + ",".join(json.dumps(f"/recommendations/{u}?k={k}") for u in picks) + "}\n"
                    "local i = 0\nrequest = function()\n  i = i % #paths + 1\n  return wrk.format('GET', paths[i])\nend\n")


def lua_seed(path: Path, rec: Recommender):
    "The seed request (one user, 25 candidates) against the endpoint's runtime API."
    rnd = random.Random(1)
    bodies = [json.dumps({"user": rnd.choice(rec.users.ids), "item": rnd.sample(rec.items.ids, 25)}) for _ in range(512)]
    path.write_text("wrk.method = 'POST'\nwrk.headers['Content-Type'] = 'application/json'\nlocal bodies = {"
                    + ",".join(json.dumps(b) for b in bodies) + "}\nlocal i = 0\nrequest = function()\n"
                    "  i = i % #bodies + 1\n  return wrk.format(nil, '/endpoints/ncf-local/invocations', nil, bodies[i])\nend\n")


class Redis:
    "A throwaway redis-server on a free loopback port."
    def __init__(self, workdir: Path):
        self.port, self.dir = free_port(), workdir / "redis"
        self.dir.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True).stdout.strip() == "PONG": return
            time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def close(self): self.proc.terminate(); self.proc.wait()


def build(workdir: Path, n_users: int, n_items: int, epochs: int) -> tuple[Path, Path]:
    "A synthetic shop's preprocessed partition (with its features) and a NeuMF model at the project's defaults trained on it."
    spec = SyntheticSpec(n_users=n_users, n_items=n_items, seed=7)
    t = time.perf_counter()
    write_days(spec, workdir / "raw", 30)
    part = Path(preprocess(workdir / "raw", workdir / "data", run_date="2026-02-01")["path"])
    splits = load_splits(part)
    result = train(splits, TrainConfig(epochs=epochs, full_ranking=False, batch_size=16384), log=lambda *a: None)
    save_model(result, splits, workdir / "model")
    print(f"shop of {n_users:,} users x {n_items:,} items: data and model in {time.perf_counter() - t:.0f} s", flush=True)
    return part, workdir / "model"


def build_random(workdir: Path, n_users: int, n_items: int):
    """A NeuMF at the project's defaults (factor 32, 3 layers) with random weights over a catalogue of `n_items`, and the
    features of the same ids: serving speed depends on the shapes, not the weights, and a trained model of 100k items
    would take this machine longer to make than the benchmark runs (issue: e-commerce scale)."""
    import numpy as np, pandas as pd, torch
    from ncf.data.features import Features
    from ncf.model.layout import METRICS_SCHEMA, ModelConfig
    from ncf.model.modeldir import write_model_dir
    from ncf.model.nets import NCF
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    model = NCF(ModelConfig(n_users, n_items)).eval()
    uids, iids = [f"C{u:07d}" for u in range(n_users)], [f"SKU-{i:06d}" for i in range(n_items)]
    counts = rng.zipf(1.3, n_items).clip(max=10**6)
    seen = pd.DataFrame({"user": np.repeat(np.arange(n_users), 20), "item": rng.integers(0, n_items, n_users * 20)}).drop_duplicates()
    metrics = {"schema": METRICS_SCHEMA, "k": 10, "best_epoch": 0, "history": [], "validation": {"hr": 0.0, "ndcg": 0.0, "k": 10},
               "test": {"hr": 0.0, "ndcg": 0.0, "k": 10}}
    write_model_dir(workdir / "model", model, pd.DataFrame({"user": np.arange(n_users, dtype=np.int32), "user_id": uids}),
                    pd.DataFrame({"item": np.arange(n_items, dtype=np.int32), "item_id": iids, "train_count": counts}),
                    seen, metrics, {}, "random-v0")
    recent = {uids[u]: [iids[i] for i in g.item.tolist()] for u, g in seen.groupby("user")}
    popular = [iids[i] for i in np.argsort(-counts, kind="stable")[:500]]
    features = Features("random-v0", 0, recent, {"popular": popular, "new": [iids[i] for i in rng.permutation(n_items)[:500]]})
    print(f"random NeuMF of {n_users:,} users x {n_items:,} items and its features", flush=True)
    return features, workdir / "model"


def gateway(store_url: str, endpoint_url: str, workers: int, client: str, log: Path):
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})   # boto3's client signs
    return launch_gateway(store_url, endpoint_url, port=0, log_path=log, workers=workers, options=("--endpoint-client", client))


def stop(proc):
    try: os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError: return
    proc.wait(10)


def measured(url: str, script: Path, args, procs: dict, log: Path | None = None) -> dict:
    "One wrk run after a warm-up, with the CPU seconds per request of each process in `procs` (name -> pid)."
    wrk(url, script, 3, args.connections)
    before = {n: tree_cpu(p) for n, p in procs.items()}
    fallbacks0 = log.read_text().count("fallback for user") if log else 0
    r = wrk(url, script, args.duration, args.connections)
    n = max(r.get("requests", 1), 1)
    r["cpu_us_per_request"] = {**{k: (tree_cpu(p) - before[k]) / n * 1e6 for k, p in procs.items()}, "wrk": r.pop("wrk_cpu") / n * 1e6}
    if log: r["fallbacks"] = log.read_text().count("fallback for user") - fallbacks0
    return r


def line(name: str, r: dict) -> str:
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_us_per_request"].items())
    fb = f", fallbacks {r['fallbacks']}" if "fallbacks" in r else ""
    return (f"{name:<44} {r['rps']:>8,.0f} req/s  p50 {r['p50_ms']:5.2f} ms  p99 {r['p99_ms']:6.2f} ms  non-2xx {r['non2xx']}{fb}"
            f"  | CPU µs/request: {cpu}" + (f"  [{r['socket_errors']}]" if "socket_errors" in r else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=3000); p.add_argument("--items", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=1); p.add_argument("--duration", type=int, default=60)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--store", choices=("redis", "sqlite", "both"), default="both")
    p.add_argument("--client", choices=("http", "boto3", "both"), default="both")
    p.add_argument("--gateway-workers", type=int, default=2); p.add_argument("--endpoint-workers", type=int, default=2)
    p.add_argument("--random-catalogue", action="store_true", help="random weights at the defaults' shapes (for --items 100000)")
    args = p.parse_args(argv)
    if not shutil.which("wrk"): raise SystemExit("wrk is not installed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="ncf-bench-realtime-"))
    print("CPU:", next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
          f"({os.cpu_count()} cores)", flush=True)
    part, model = build_random(work, args.users, args.items) if args.random_catalogue else build(work, args.users, args.items, args.epochs)
    rec = Recommender.load(model)
    ep = launch(model, port=0, workers=args.endpoint_workers, log_path=work / "endpoint.log")
    redis = Redis(work) if args.store in ("redis", "both") else None
    try:
        lua_seed(work / "seed.lua", rec); lua_users(work / "users.lua", rec.users.ids)
        print(line(f"endpoint alone, seed ({args.endpoint_workers} workers)", measured(ep.url, work / "seed.lua", args, {"endpoint": ep.pid})), flush=True)
        stores = [s for s in ("redis", "sqlite") if args.store in (s, "both")]
        for store in stores:
            url = redis.url if store == "redis" else f"sqlite://{work / 'store.db'}"
            s = open_store(url); t = time.perf_counter()
            s.load(part) if args.random_catalogue else load_features(s, part)
            s.close()
            print(f"{store}: features loaded in {time.perf_counter() - t:.1f} s", flush=True)
            for client in [c for c in ("http", "boto3") if args.client in (c, "both")]:
                gw = gateway(url, ep.url, args.gateway_workers, client, work / f"gateway-{store}-{client}.log")
                try:
                    procs = {"gateway": gw.pid, "endpoint": ep.pid, **({"redis": redis.proc.pid} if store == "redis" else {})}
                    r = measured(gw.url, work / "users.lua", args, procs, work / f"gateway-{store}-{client}.log")
                    print(line(f"whole path, {store}, {client} client", r), flush=True)
                finally: stop(gw)
    finally:
        stop(ep)
        if redis: redis.close()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
