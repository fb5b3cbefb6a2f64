"""Two training runs at once on one machine: torch's default threads in each against the share of the cores
that `ncf.train.threads` gives each run, with one run alone as the baseline, in the same session.

    .venv/bin/python bench/bench_threads.py               # ML-100K if ../shared has it, else the built-in shop
    .venv/bin/python bench/bench_threads.py --epochs 3 --batch_size 1024

Each run is `ncf_train` (no refit, no full ranking) in its own process, with its own slot folder so that
nothing else on the machine counts. Prints each run's training samples/s (mean over its epochs) and the sum.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import cpu_flags, cpu_name, prepare   # noqa: E402
from ncf.train.threads import usable_cores   # noqa: E402


def runs_at_once(data: Path, work: Path, n: int, threads: int, flags: list) -> list:
    "Samples/s of `n` ncf_train runs started together (`threads` 0: their share of the cores)."
    slots = tempfile.mkdtemp(prefix="slots-", dir=work)
    procs = [subprocess.Popen([sys.executable, "-m", "ncf.cli.train", "--data", str(data), "--model-dir", str(work / f"m-{threads}-{n}-{k}"),
                               "--refit", "false", "--full_ranking", "false", "--threads", str(threads), *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "NCF_CPU_SLOTS": slots})
             for k in range(n)]
    out = []
    for k, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode: raise SystemExit(f"run {k} failed: {err[-2000:]}")
        hist = json.loads((work / f"m-{threads}-{n}-{k}" / "metrics.json").read_text())["history"]
        out.append(sum(h["samples_per_s"] for h in hist) / len(hist))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2); p.add_argument("--batch_size", type=int, default=256)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ncf-bench-threads-"))
    try: measure(work, a)
    finally: shutil.rmtree(work, ignore_errors=True)   # the data and the models are only this run's


def measure(work: Path, a):
    data = prepare(work)
    cores = usable_cores()
    print(f"{cores} usable cores ({cpu_name()}; {cpu_flags()}), batch {a.batch_size}, {a.epochs} epochs per run")
    flags = ["--epochs", str(a.epochs), "--batch_size", str(a.batch_size)]
    for name, n, threads in (("one run alone, its share (all cores)", 1, 0), ("two at once, torch's default threads each", 2, cores),
                             ("two at once, each its share", 2, 0)):
        sps = runs_at_once(data, work, n, threads, flags)
        print(f"{name:<44} " + " + ".join(f"{s:,.0f}" for s in sps) + (f" = {sum(sps):,.0f}" if n > 1 else "") + " samples/s")


if __name__ == "__main__":
    main()
