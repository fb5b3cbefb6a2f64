"""Precision benchmark: bf16 autocast against fp32, the baseline, in the same run on this machine.

The measurements behind `ncf.train.trainer`'s precision rule (`precision=auto`). For each model and batch size
it trains the same configuration twice, fp32 and bf16, alternating, and prints the training
samples/s of each and their ratio; with `--seeds N` it also prints the validation HR@10 at the
validation-selected epoch of each precision over N seeds (the accuracy half of the rule).

    .venv/bin/python bench/bench_precision.py                          # speed, 3 epochs per run
    .venv/bin/python bench/bench_precision.py --seeds 3 --epochs 10 --batch 256 16384
    ONEDNN_MAX_CPU_ISA=AVX512_CORE .venv/bin/python bench/bench_precision.py  # as a CPU without native bf16

`ONEDNN_MAX_CPU_ISA` caps the instructions oneDNN (torch's CPU matmuls) may use, so one machine can
be measured as the CPU kinds below it (AVX512_CORE: AVX-512 without BF16; AVX2).
"""
import argparse, os, tempfile
from pathlib import Path

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["NeuMF", "GMF", "MLP"])
    p.add_argument("--batch", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration (accuracy needs several)")
    p.add_argument("--repeats", type=int, default=2, help="alternating fp32/bf16 runs per configuration and seed (speed)")
    a = p.parse_args()
    import torch
    from bench_train import cpu_name, prepare
    from ncf.data.dataset import load_splits
    from ncf.train.config import TrainConfig
    from ncf.train.trainer import cpu_bf16, train
    splits = load_splits(prepare(Path(tempfile.mkdtemp(prefix="ncf-bench-"))))
    print(f"CPU: {cpu_name()}; native bf16: {cpu_bf16()}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(splits.train_users):,} training interactions")
    print(f"{'model':<6} {'batch':>6} {'fp32 samples/s':>15} {'bf16 samples/s':>15} {'bf16/fp32':>10} {'fp32 val HR':>16} {'bf16 val HR':>16}")
    for model in a.models:
        for batch in a.batch:
            sps = {"fp32": [], "bf16": []}; hr = {"fp32": [], "bf16": []}
            for seed in range(a.seeds):
                for repeat in range(a.repeats):
                    for precision in ("fp32", "bf16"):
                        cfg = TrainConfig(model=model, epochs=a.epochs, batch_size=batch, lr_scaling="sqrt" if batch > 256 else "none",
                                          precision=precision, seed=seed, refit=False, full_ranking=False)
                        m = train(splits, cfg, log=lambda *_: None).metrics
                        sps[precision] += [h["samples_per_s"] for h in m["history"]]
                        if repeat == 0: hr[precision].append(m["validation"]["hr"])   # a repeat trains the same trajectory
            f, b = np.median(sps["fp32"]), np.median(sps["bf16"])
            show = lambda v: f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"
            print(f"{model:<6} {batch:>6} {f:>15,.0f} {b:>15,.0f} {b / f:>9.2f}x {show(hr['fp32']):>16} {show(hr['bf16']):>16}", flush=True)


if __name__ == "__main__":
    main()
