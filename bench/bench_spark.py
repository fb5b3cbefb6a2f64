"""Preprocessing throughput and peak memory: the pandas job against the Spark job in local mode.

    python bench/bench_spark.py --rows 1000000 10000000 --work /tmp/ncf-bench

For each size it generates 30 days of the built-in synthetic shop (`SyntheticSpec.for_rows`), cached
under `--work/raw-N` (10M rows take several minutes to generate), then runs each engine in a fresh
child process and reports input rows per second of the whole job (read, preprocess, write, data
version) and the peak resident memory of the child's whole process tree (for Spark: the Python
driver, the JVM and the Python workers; pages shared between them are counted once per process, so
it is an upper bound). Spark's session start is reported apart and not counted in rows/s.
"""
from __future__ import annotations
import argparse, json, os, platform, shutil, subprocess, sys, time
from pathlib import Path


def generate(rows:int, work:Path) -> Path:
    "Raw logs of about `rows` events, generated once and cached."
    from ncf.data.synthetic import SyntheticSpec, write_days
    raw = work/f"raw-{rows}"
    if (raw/".complete").exists(): return raw
    shutil.rmtree(raw, ignore_errors=True)
    t0 = time.perf_counter()
    spec = SyntheticSpec.for_rows(rows)
    write_days(spec, raw, 30)
    (raw/".complete").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
    print(f"generated {raw} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return raw


def child(engine:str, raw:str, out:str, partitions:int|None):
    "Run one engine once; print a JSON line with its timings."
    t0 = time.perf_counter(); session = 0.0
    if engine == "pandas":
        from ncf.data.preprocess import preprocess
        m = preprocess(raw, out, run_id=engine)
    else:
        from ncf.data.spark import spark_session, preprocess_spark
        spark = spark_session(); session = time.perf_counter() - t0
        m = preprocess_spark(raw, out, run_id=engine, spark=spark, partitions=partitions)
    total = time.perf_counter() - t0
    print(json.dumps({"rows": m["source"]["rows"], "job_seconds": total - session, "session_seconds": session,
                      "data_version": m["data_version"], "counts": m["counts"], "steps": m.get("spark", {}).get("seconds")}))


def tree_rss(proc) -> int:
    "Resident bytes of a process and all its descendants."
    import psutil
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try: total += p.memory_info().rss
        except psutil.Error: pass
    return total


def measure(engine:str, raw:Path, out:Path, partitions:int|None) -> dict:
    "Run `child` in a fresh process, sampling the memory of its process tree."
    import psutil
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", engine, str(raw), str(out)] + (["--partitions", str(partitions)] if partitions else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps)); time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if proc.returncode: raise RuntimeError(f"{engine} failed:\n{stderr[-3000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    return {**r, "engine": engine, "peak_rss_mb": round(peak/2**20), "rows_per_s": round(r["rows"]/r["job_seconds"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--work", default="/tmp/ncf-bench", help="cache of generated logs and scratch outputs")
    ap.add_argument("--engines", nargs="+", default=["pandas", "spark"], choices=["pandas", "spark"])
    ap.add_argument("--partitions", type=int, default=None, help="Spark user partitions (default: the cores)")
    ap.add_argument("--child", nargs=3, metavar=("ENGINE", "RAW", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child: return child(*a.child, a.partitions)
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    print(f"{'rows':>12} {'engine':>7} {'job s':>8} {'rows/s':>10} {'peak MB':>8} {'session s':>9}  data version")
    results = []
    for n in a.rows:
        raw = generate(n, work)
        for engine in a.engines:
            r = measure(engine, raw, work/f"out-{n}-{engine}", a.partitions); results.append(r)
            print(f"{r['rows']:>12,} {engine:>7} {r['job_seconds']:>8.1f} {r['rows_per_s']:>10,} {r['peak_rss_mb']:>8,} "
                  f"{r['session_seconds']:>9.1f}  {r['data_version'][:16]}", flush=True)
        same = {r["data_version"] for r in results if r["rows"] == results[-1]["rows"]}
        if len(a.engines) > 1: print(f"# {n:,} rows: engines agree on the data version: {'yes' if len(same) == 1 else 'NO'}")
    (work/"results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
