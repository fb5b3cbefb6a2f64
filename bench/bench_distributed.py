"""Distributed training benchmark: the same `ncf_train` run on 1 and 2 torchrun processes (gloo) on this machine, and
what DDP's dense all-reduce of the embedding tables costs as they grow.

    .venv/bin/python bench/bench_distributed.py                 # ML-100K if ../shared has it, else the built-in shop
    .venv/bin/python bench/bench_distributed.py --synthetic 1000000 --epochs 1

For each configuration (the defaults at batch 256, the fast configuration at batch 16384) and each process count, one
`torchrun --nproc_per_node N -m ncf.cli.train` run (no refit, no full ranking): samples/s of its training epochs (from
metrics.json), the speed-up of 2 processes over 1 on the same cores, the scaling efficiency (speed-up / 2) and the
largest parameter difference between the two models (batch-256 semantics: 2 ranks of 128 rows take the steps of 1 process
of 256; dropout masks differ, so the models differ by what dropout does). Then, between 2 processes, the milliseconds of
one all-reduce of NeuMF's embedding tables at 10^4 to 4·10^6 rows (160 floats a row at factor_num 32, 3 layers), against a
step's time at batch 256: DDP all-reduces every parameter at every step, so past the row count where that all-reduce
costs more than the step itself, dense all-reduce stops paying.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import cpu_flags, cpu_name, prepare  # noqa: E402

CONFIGS = {"defaults": [], "fast": ["--batch_size", "16384", "--lr_scaling", "sqrt"]}
ROW_FLOATS = 32 + 32 * 2 ** 2   # GMF's factor_num + the MLP tower's embedding width, per user or item


def run(data: Path, work: Path, procs: int, epochs: int, extra: list) -> dict:
    out = work / f"model-{procs}-{abs(hash(tuple(extra)))}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m", "ncf.cli.train",
           "--data", str(data), "--model-dir", str(out), "--epochs", str(epochs), "--refit", "false", "--full_ranking", "false", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode: sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"sps": statistics.mean(h["samples_per_s"] for h in m["history"]), "wall": time.perf_counter() - t0,
            "hr": m["test"]["hr"], "model": out}


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max((x[k] - y[k]).abs().max().item() for k in x)


def allreduce_worker(rows: list, repeats: int):
    "Under torchrun: the median milliseconds of one all-reduce of `rows` x ROW_FLOATS fp32 between the processes."
    import torch, torch.distributed as dist
    dist.init_process_group("gloo"); torch.set_num_threads(1)
    for n in rows:
        t = torch.ones(n * ROW_FLOATS)
        dist.all_reduce(t)   # warm-up: connections and buffers
        times = []
        for _ in range(repeats):
            dist.barrier(); t0 = time.perf_counter(); dist.all_reduce(t); times.append(time.perf_counter() - t0)
        if dist.get_rank() == 0: print(json.dumps({"rows": n, "ms": 1000 * statistics.median(times)}), flush=True)
        del t
    dist.destroy_process_group()


def allreduce_costs(rows: list, repeats: int) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--allreduce-worker", "--rows", *map(str, rows), "--repeats", str(repeats)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode: sys.exit(f"all-reduce workers failed:\n{p.stderr[-3000:]}")
    return [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--synthetic", type=int, default=0, help="the built-in shop at this many interactions instead of ML-100K")
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 4_000_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.allreduce_worker: allreduce_worker(a.rows, a.repeats); return 0
    print(f"CPU: {cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores; gloo; torchrun --standalone")
    with tempfile.TemporaryDirectory(prefix="ncf-bench-dist-") as tmp:
        work = Path(tmp); data = prepare(work, a.synthetic)
        print(f"data: {data}; {a.epochs} epochs, no refit\n")
        print(f"{'configuration':<14}{'1 process':>14}{'2 processes':>14}{'speed-up':>10}{'efficiency':>12}{'max |Δw|':>11}{'HR@10 1/2':>14}")
        step_ms = None
        for name, extra in CONFIGS.items():
            one, two = run(data, work, 1, a.epochs, extra), run(data, work, 2, a.epochs, extra)
            up = two["sps"] / one["sps"]
            print(f"{name:<14}{one['sps']:>12,.0f}/s{two['sps']:>12,.0f}/s{up:>9.2f}x{up / 2:>11.0%} {max_difference(one['model'], two['model']):>10.2e}"
                  f"{one['hr']:>8.3f}/{two['hr']:.3f}")
            if name == "defaults": step_ms = 1000 * 256 / one["sps"]
    print(f"\none step at batch 256, 1 process: {step_ms:.2f} ms")
    print(f"{'table rows':>12}{'MB':>9}{'all-reduce ms':>15}{'x step':>9}")
    for c in allreduce_costs(a.rows, a.repeats):
        print(f"{c['rows']:>12,}{c['rows'] * ROW_FLOATS * 4 / 1e6:>9.1f}{c['ms']:>15.2f}{c['ms'] / step_ms:>9.1f}")
    return 0


if __name__ == "__main__": sys.exit(main())
