"""Where sparse embedding tables with lazy Adam start to pay: the training step of dense Adam against torch's SparseAdam
on sparse tables as the tables grow, at the default NeuMF and batch 256, on this machine.

    .venv/bin/python bench/bench_sparse.py
    .venv/bin/python bench/bench_sparse.py --rows 2000 8000 32000 --steps 500 --batch_size 256

Each size is a model of that many users + items (three users for each item), trained for `--steps` steps on random
ids and labels by the trainer's own model and optimizers (`build_model`, `make_optimizer`, `--sparse false|true`);
the figure is the median over `--repeats` timings of samples/s. `SPARSE_FROM_ROWS` (ncf.train.sparse) is the
smallest size here from which the sparse step is faster; the run prints the crossover it measured.
"""
import argparse, statistics, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import cpu_flags, cpu_name  # noqa: E402


def samples_per_s(rows: int, optimizer: str, steps: int, batch: int, repeats: int) -> float:
    import torch
    from ncf.train.config import TrainConfig
    from ncf.train.trainer import build_model, make_optimizer
    n_items = max(1, rows // 4); n_users = rows - n_items
    cfg = TrainConfig(sparse="false" if optimizer == "dense" else "true", precision="fp32")
    torch.manual_seed(0)
    model = build_model(cfg, n_users, n_items).train(); opts = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(n_users, (batch,), generator=g), torch.randint(n_items, (batch,), generator=g),
                torch.randint(2, (batch,), generator=g).float()) for _ in range(64)]
    def run(n):
        for k in range(n):
            u, i, y = batches[k % len(batches)]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(u, i), y)
            for o in opts: o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts: o.step()
    run(20)   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); run(steps); times.append(time.perf_counter() - t0)
    return steps * batch / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 256_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    from ncf.train.sparse import SPARSE_FROM_ROWS
    from ncf.train.threads import share_cores
    print(f"CPU: {cpu_name()} ({cpu_flags()}); NeuMF defaults, batch {a.batch_size}, {a.steps} steps x {a.repeats}; SPARSE_FROM_ROWS = {SPARSE_FROM_ROWS:,}")
    print(f"{'rows':>10}{'dense Adam':>14}{'SparseAdam':>14}{'sparse/dense':>14}")
    crossover = None
    with share_cores():
        for rows in a.rows:
            s = {o: samples_per_s(rows, o, a.steps, a.batch_size, a.repeats) for o in ("dense", "sparse")}
            ratio = s["sparse"] / s["dense"]
            if ratio > 1 and crossover is None: crossover = rows
            if ratio <= 1: crossover = None   # the crossover is the size from which sparse stays faster
            print(f"{rows:>10,}{s['dense']:>12,.0f}/s{s['sparse']:>12,.0f}/s{ratio:>13.2f}x")
    print(f"the sparse step is faster from {crossover:,} rows on" if crossover else "the sparse step was not faster at any size measured")
    return 0


if __name__ == "__main__": sys.exit(main())
