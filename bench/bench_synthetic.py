"""Generation speed of the built-in shop: rows per minute by catalogue size and sampler, on this machine.

    .venv/bin/python bench/bench_synthetic.py                       # 1M rows at 1,500 ... 1,000,000 items
    .venv/bin/python bench/bench_synthetic.py --rows 10000000 --items 100000

Each point writes `--days` days of `SyntheticSpec.for_rows(rows, n_items=...)` with `write_days` (the
draw, the string ids, the sort and the Parquet files) into a temporary folder, removed afterwards, and
prints rows/minute and the peak RSS of the process that did it. The exact sampler is also timed at the
sizes where it is affordable, as the baseline in the same run; above `--exact-max` it is timed on one
day only, and its rate is that day's; above `--exact-skip` it is not run.
"""
import argparse, json, resource, shutil, subprocess, sys, tempfile, time
from pathlib import Path


def child(rows: int, items: int, sampler: str, days: int):
    from ncf.data.synthetic import SyntheticSpec, write_days
    spec = SyntheticSpec.for_rows(rows, days=30, n_items=items, sampler=sampler)
    work = Path(tempfile.mkdtemp(prefix="ncf-synth-"))
    try:
        t0 = time.perf_counter(); parts = write_days(spec, work, days); dt = time.perf_counter() - t0
        import pyarrow.parquet as pq
        n = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    finally: shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"rows": n, "seconds": dt, "users": spec.n_users, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the 30-day shop (the spec's size)")
    p.add_argument("--items", type=int, nargs="*", default=[1_500, 10_000, 100_000, 1_000_000])
    p.add_argument("--days", type=int, default=30, help="days written per point (of the 30)")
    p.add_argument("--exact-max", type=int, default=10_000, help="time the exact sampler over all days up to this catalogue size, one day above it")
    p.add_argument("--exact-skip", type=int, default=100_000, help="do not time the exact sampler above this catalogue size (hours)")
    p.add_argument("--child", nargs=4)
    a = p.parse_args()
    if a.child: return child(int(a.child[0]), int(a.child[1]), a.child[2], int(a.child[3]))
    print(f"{'items':>10} {'sampler':>10} {'users':>9} {'rows':>11} {'seconds':>8} {'rows/min':>12} {'peak MB':>8}")
    for items in a.items:
        for sampler in ("two-stage", "exact") if items <= a.exact_skip else ("two-stage",):
            days = a.days if sampler == "two-stage" or items <= a.exact_max else 1
            out = subprocess.run([sys.executable, __file__, "--child", str(a.rows), str(items), sampler, str(days)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{items:>10,} {sampler:>10} {r['users']:>9,} {r['rows']:>11,} {r['seconds']:>8.1f} {60*r['rows']/r['seconds']:>12,.0f} {r['peak_mb']:>8.0f}"
                  + ("" if days == a.days else f"  ({days} day)"), flush=True)


if __name__ == "__main__":
    main()
