"""Training benchmark: the project's trainer against a straightforward per-sample implementation.

Both train the same NeuMF architecture (factor_num 32, 3 layers, dropout 0.3, the same initialisation)
on the same preprocessed data, in the same run, on this machine. The per-sample baseline is the common
public recipe: the model written with torch's nn.Dropout in an nn.Sequential, a torch Dataset whose
__getitem__ returns one (user, item, label) triple, negatives drawn in a Python loop each epoch (timed,
as the common code times it), a DataLoader with batch_size 256 and no worker processes (two cores),
fp32. It lives frozen in baseline_ncf.py, whose hash every run prints. Each configuration runs in its
own process so that peak memory is its own. The last row is the strongest simple rival, a tuned
dot-product MF (Rendle et al., RecSys 2020), trained by the same trainer on the same split.

    .venv/bin/python bench/bench_train.py                      # ML-100K if ../shared has it, else synthetic
    .venv/bin/python bench/bench_train.py --seeds 5 --pretrain # accuracy over 5 seeds: defaults, defaults without
                                                               # recency weighting, and with GMF/MLP pre-training
    .venv/bin/python bench/bench_train.py --tune MF --epochs 20  # the MF rival's validation-only search
    .venv/bin/python bench/bench_train.py --tune NeuMF           # the same search for NeuMF at the original settings
    .venv/bin/python bench/bench_train.py --synthetic 1000000 --no-baseline --epochs 3 -- --device cuda
                                                               # a GPU: the built-in shop at 1M interactions,
                                                               # defaults and the fast configuration

Prints samples/s, seconds per epoch, time to reach the baseline's best validation HR, test HR@10 /
NDCG@10 at the validation-selected epoch, and peak RSS; then the seconds one evaluation of every test
user takes, by the paper protocol and by full ranking.
"""
import argparse, hashlib, json, os, platform, resource, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k" / "u.data"
BASELINE = Path(__file__).with_name("baseline_ncf.py")


def cpu_name() -> str:
    "The CPU's model name, for the figures' hardware line."
    try: line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration): return platform.processor() or "unknown CPU"
    return line.split(":", 1)[1].strip()


def cpu_flags() -> str:
    "The CPU flags that decide the speed of a training step here: bf16 (AMX, AVX-512 BF16) and the vector width."
    try: flags = set(next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration): return "unknown"
    return " ".join(f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags) or "none of amx_bf16, avx512_bf16, avx512f, avx2"


def gemm_bound(batch: int, bf16: bool = False, factor_num: int = 32, num_layers: int = 3, seconds: float = 1.0) -> float:
    """The roofline of a step: samples/s if a training step cost only the matrix products of the default NeuMF's tower
    as the common code computes them (each layer's forward product and the two of its backward, in the run's precision, at `batch` rows,
    with the threads the project's run would take), measured on this machine. Lookups, GMF, dropout and Adam are left
    out, so a step cannot reach it; the share says how much of a step is framework and memory work rather than arithmetic.
    """
    import torch
    from ncf.train.threads import share_cores
    shapes = [(factor_num * 2 ** (num_layers - i), factor_num * 2 ** (num_layers - i - 1)) for i in range(num_layers)] + [(2 * factor_num, 1)]
    with share_cores():
        dt = torch.bfloat16 if bf16 else torch.float32
        mats = [(torch.randn(batch, i, dtype=dt), torch.randn(i, o, dtype=dt), torch.randn(batch, o, dtype=dt)) for i, o in shapes]
        def step():
            for x, w, dy in mats: x @ w; dy @ w.T; x.T @ dy
        for _ in range(20): step()
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds: step(); n += 1
    return n * batch / dt


def prepare(work: Path, synthetic_rows: int = 0) -> Path:
    from ncf.data.preprocess import preprocess
    if synthetic_rows:
        from ncf.data.synthetic import SyntheticSpec, write_days
        src = work / "raw"; write_days(SyntheticSpec.for_rows(synthetic_rows), src, 30)
    elif ML100K.exists(): src = ML100K
    else:
        from ncf.data.synthetic import SyntheticSpec, write_days
        src = work / "raw"; write_days(SyntheticSpec(), src, 30)
    return Path(preprocess(src, work / "data", run_id="bench")["path"])


def ours(data: Path, epochs: int, seed: int, extra: list) -> dict:
    from ncf.data.dataset import load_splits
    from ncf.train.config import TrainConfig
    from ncf.train.trainer import train, sampled_ranks
    from ncf.cli.train import parser
    s = load_splits(data)
    args = vars(parser().parse_args(["--epochs", str(epochs), "--seed", str(seed), "--full_ranking", "false", *extra]))
    cfg = TrainConfig(**{k: v for k, v in args.items() if k in TrainConfig.__dataclass_fields__})
    r = train(s, cfg, log=lambda *a: None)
    elapsed, hist = 0.0, []
    for h in r.metrics["history"]:
        elapsed += h["seconds"]; hist.append({**h, "elapsed": elapsed})
    return {"history": hist, "test": r.metrics["test"], "best_epoch": r.metrics["best_epoch"], "precision": r.metrics["precision"], "batch_size": cfg.batch_size,
            "test_ranks": sampled_ranks(r.model, s.test, "cpu").tolist()}


def child(kind: str, data: str, epochs: int, seed: int, extra: list):
    from baseline_ncf import per_sample_baseline
    t0 = time.perf_counter()
    out = per_sample_baseline(Path(data), epochs, seed) if kind == "baseline" else ours(Path(data), epochs, seed, extra)
    out["run_seconds"] = time.perf_counter() - t0   # the whole run: epochs, selection, refit, evaluation
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def run(kind, data, epochs, seed, extra=()):
    r = subprocess.run([sys.executable, __file__, "--child", kind, "--data", str(data), "--epochs", str(epochs), "--seed", str(seed), "--", *extra],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarise(name, r, target_hr=None):
    h = r["history"]
    sps = np.mean([x["samples_per_s"] for x in h]); spe = np.mean([x["seconds"] for x in h])
    reach = next((x["elapsed"] for x in h if target_hr is not None and x["validation"]["hr"] >= target_hr), None)
    print(f"{name:<28} {sps:>12,.0f} {spe:>9.2f} {('%.1f' % reach) if reach is not None else '-':>10} "
          f"{r['test']['hr']:>8.4f} {r['test']['ndcg']:>8.4f} {r['peak_rss_mb']:>9.0f} {r['run_seconds']:>7.1f}")
    return sps, reach


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child"); p.add_argument("--data"); p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0); p.add_argument("--seeds", type=int, default=0)
    p.add_argument("--pretrain", action="store_true"); p.add_argument("--results", help="with --seeds: a JSON file that keeps each run, so that an interrupted run resumes")
    p.add_argument("--fast", default="--batch_size 16384 --lr_scaling sqrt")
    p.add_argument("--mf", default=MF_TUNED, help="the MF rival's flags (the best of --tune MF on ML-100K's validation set)")
    p.add_argument("--synthetic", type=int, default=0, metavar="ROWS", help="the built-in shop with about ROWS interactions instead of ML-100K")
    p.add_argument("--no-baseline", action="store_true", help="skip the per-sample baseline (for large data or a GPU)")
    p.add_argument("--tune", choices=sorted(GRIDS), help="a validation-only search of that model's hyperparameters (GRIDS)")
    p.add_argument("extra", nargs="*", help="ncf_train flags for the project's runs, after --")
    a = p.parse_args()
    if a.child: return child(a.child, a.data, a.epochs, a.seed, a.extra)
    work = Path(tempfile.mkdtemp(prefix="ncf-bench-"))
    try: benchmark(a, prepare(work, a.synthetic))
    finally: shutil.rmtree(work, ignore_errors=True)   # the data it prepared, also after an error or ^C


def benchmark(a, data: Path):
    import pandas as pd
    n = len(pd.read_parquet(data / "train.parquet", columns=["user"]))
    print(f"data: {data} ({f'synthetic, {a.synthetic:,} rows asked' if a.synthetic else 'ML-100K' if ML100K.exists() else 'synthetic'}), "
          f"{n:,} training interactions, {a.epochs} epochs, {os.cpu_count()} CPUs ({cpu_name()})")
    print(f"CPU flags: {cpu_flags()}; baseline {BASELINE.name} sha256 {hashlib.sha256(BASELINE.read_bytes()).hexdigest()[:16]}")
    if a.tune: return tune(data, a, *GRIDS[a.tune])
    if a.seeds: return accuracy(data, a)
    base = None if a.no_baseline else run("baseline", data, a.epochs, a.seed)
    target = max(x["validation"]["hr"] for x in base["history"]) if base else None
    if base: print(f"baseline's best validation HR@10: {target:.4f}")
    print(f"{'configuration':<28} {'samples/s':>12} {'s/epoch':>9} {'to target':>10} {'test HR':>8} {'NDCG':>8} {'peak MB':>9} {'run s':>7}")
    if base: b_sps, b_reach = summarise("per-sample baseline", base, target)
    for name, extra in (("ncf defaults", a.extra), ("ncf defaults, --refit_epochs 1", [*a.extra, "--refit_epochs", "1"]), (f"ncf fast ({a.fast})", [*a.extra, *a.fast.split()]), ("MF, tuned (--mf)", [*a.extra, *a.mf.split()])):
        r = run("ours", data, a.epochs, a.seed, extra)
        sps, reach = summarise(name, r, target)
        if base: print(f"{'':<28} {sps / b_sps:>11.1f}x" + (f" {b_reach / reach:>19.1f}x less time to the baseline's best validation HR" if reach else "   did not reach the target"))
        if "MF" in extra: continue   # no tower: the roofline is the NeuMF's
        batch, bf16 = r["batch_size"], r["precision"]["autocast"] == "bf16"; bound = gemm_bound(batch, bf16)
        print(f"{'':<28} {100 * sps / bound:>11.1f}% of the roofline at batch {batch}: {bound:,.0f} samples/s if a step were only the tower's {'bf16' if bf16 else 'fp32'} matrix products")
    evaluation_speed(data)


def evaluation_speed(data: Path, repeats: int = 5):
    "Seconds per evaluation of a NeuMF on every test user: the paper protocol and full ranking (the weights do not matter)."
    from ncf.data.dataset import load_splits
    from ncf.train.config import TrainConfig
    from ncf.train.trainer import build_model, evaluate_full, evaluate_sampled
    s = load_splits(data)
    model = build_model(TrainConfig(), s.n_users, s.n_items)
    for name, fn in (("paper protocol (99 sampled negatives)", lambda: evaluate_sampled(model, s.test, 10, "cpu")),
                     ("full ranking (all items but the user's training items)", lambda: evaluate_full(model, s.test, s.train_users, s.train_items, 10, "cpu"))):
        fn(); t = time.perf_counter()
        for _ in range(repeats): fn()
        print(f"evaluation, {name}, {len(s.test.users):,} users x {s.n_items:,} items: {(time.perf_counter() - t) / repeats:.3f} s")


def bootstrap_interval(ranks, k: int = 10, reps: int = 2000, seed: int = 0) -> dict:
    """Mean HR@k / NDCG@k over seeds, with 95% intervals that resample both the seeds and the test users.

    `ranks` is seeds x test users. Resampling users carries the test set's own sampling error (one
    standard error of HR@10 on 943 users is about 0.015), which the spread between seeds leaves out."""
    r = np.asarray(ranks); hit = r < k; gain = np.where(hit, 1 / np.log2(r + 2), 0.0)
    g = np.random.default_rng(seed); n_seeds, n_users = r.shape
    si, ui = g.integers(n_seeds, size=(reps, n_seeds, 1)), g.integers(n_users, size=(reps, 1, n_users))
    out = {}
    for name, v in (("hr", hit.astype(float)), ("ndcg", gain)):
        boot = v[si, ui].mean((1, 2))
        out[name] = (v.mean(), *np.percentile(boot, [2.5, 97.5]), v.mean(1).std(ddof=1) if n_seeds > 1 else 0.0)
    return out


MF_FIXED = ["--model", "MF", "--num_ng", "8", "--batch_size", "4096", "--lr_scaling", "sqrt"]
MF_TUNED = " ".join([*MF_FIXED, "--factor_num", "64", "--weight_decay", "1e-5", "--lr", "0.001", "--epochs", "20"])   # the best of tune_mf
MF_GRID = {"--factor_num": ["32", "64", "128"], "--weight_decay": ["0", "1e-6", "1e-5", "1e-4"], "--lr": ["0.001", "0.003"]}
# NeuMF keeps the original system's settings (lr 0.001, batch 256, dropout 0.3, factor_num 32, 3 layers) and searches what they leave open
NEUMF_GRID = {"--weight_decay": ["0", "1e-6", "3e-6", "1e-5"], "--num_ng": ["4", "8"]}
GRIDS = {"MF": (MF_FIXED, MF_GRID), "NeuMF": ([], NEUMF_GRID)}


def tune(data, a, fixed: list, grid: dict):
    "A validation-only search (the MF row's came from it): every point of `grid` on top of `fixed`, seed 0, no refit, ranked by the selected epoch's validation HR@10."
    import itertools
    rows = []
    for values in itertools.product(*grid.values()):
        point = list(itertools.chain.from_iterable(zip(grid, values)))
        r = run("ours", data, a.epochs, 0, [*a.extra, *fixed, "--refit", "false", *point])   # validation only: no refit
        v = max((h["validation"] for h in r["history"]), key=lambda v: (v["hr"], v["ndcg"]))
        rows.append((v["hr"], v["ndcg"], r["best_epoch"], " ".join(point)))
        print(f"validation HR@10 {v['hr']:.4f} NDCG@10 {v['ndcg']:.4f} at epoch {r['best_epoch']:>2}: {rows[-1][3]}", flush=True)
    best = max(rows)
    print(f"best on validation: {' '.join(fixed)} {best[3]} (HR@10 {best[0]:.4f}, NDCG@10 {best[1]:.4f}, epoch {best[2]})")


def accuracy(data, a):
    "Test HR/NDCG at the validation-selected epoch over seeds, with and without pre-training; each run is kept in --results as it ends."
    rows = {"NeuMF, no recency weight": ["--recency_weight", "1"], "NeuMF": [], "NeuMF + pre-training": ["--pretrain"], "MF, tuned (--mf)": a.mf.split()}
    if not a.pretrain: del rows["NeuMF + pre-training"]
    done = json.loads(Path(a.results).read_text()) if a.results and Path(a.results).exists() else {}
    for seed in range(a.seeds):
        for name, flags in rows.items():
            key = f"{name} | seed {seed}"
            if key not in done:
                done[key] = run("ours", data, a.epochs, seed, [*a.extra, *flags])
                if a.results: Path(a.results).write_text(json.dumps(done))
            r = done[key]
            print(f"seed {seed}: {name}: test HR {r['test']['hr']:.4f} NDCG {r['test']['ndcg']:.4f} ({r['precision']['autocast']}: {r['precision']['reason']})", flush=True)
    print(f"test HR@10 / NDCG@10: mean over {a.seeds} seeds [95% bootstrap interval over seeds and test users] (sd between seeds)")
    for name in rows:
        b = bootstrap_interval([done[f"{name} | seed {seed}"]["test_ranks"] for seed in range(a.seeds)])
        print(f"{name:<26} " + "   ".join(f"{m.upper()}@10 {b[m][0]:.4f} [{b[m][1]:.3f}, {b[m][2]:.3f}] (sd {b[m][3]:.4f})" for m in ("hr", "ndcg")))


if __name__ == "__main__":
    main()
