"""The per-sample baseline of `bench/bench_train.py`: NCF as the common public code writes it, frozen.

Its own NeuMF class (torch's nn.Dropout in an nn.Sequential tower), a torch Dataset whose __getitem__
returns one (user, item, label) triple, negatives drawn in a Python loop each epoch, a DataLoader with
batch_size 256 and no worker processes, fp32 Adam. It shares none of the project's training code; it
reads the project's preprocessed splits and is scored by the project's evaluation, so that both sides
are measured by the same instrument. `bench_train.py` prints this file's SHA-256 with every run: a
figure can only be compared with another of the same hash. Do not edit it to make it faster.
"""
import time
from pathlib import Path

import numpy as np


def common_code_model(n_users: int, n_items: int, factor_num=32, num_layers=3, dropout=0.3):
    "NeuMF written as the common public code writes it: torch's nn.Dropout in an nn.Sequential tower."
    import torch
    from torch import nn

    class NeuMF(nn.Module):
        def __init__(self):
            super().__init__()
            width = factor_num * 2 ** (num_layers - 1)
            self.embed_user_GMF, self.embed_item_GMF = nn.Embedding(n_users, factor_num), nn.Embedding(n_items, factor_num)
            self.embed_user_MLP, self.embed_item_MLP = nn.Embedding(n_users, width), nn.Embedding(n_items, width)
            layers = []
            for i in range(num_layers):
                size = factor_num * 2 ** (num_layers - i)
                layers += [nn.Dropout(p=dropout), nn.Linear(size, size // 2), nn.ReLU()]
            self.MLP_layers = nn.Sequential(*layers)
            self.predict_layer = nn.Linear(2 * factor_num, 1)
            for m in self.modules():
                if isinstance(m, nn.Embedding): nn.init.normal_(m.weight, std=0.01)
                elif isinstance(m, nn.Linear): nn.init.xavier_uniform_(m.weight); nn.init.zeros_(m.bias)
            nn.init.kaiming_uniform_(self.predict_layer.weight, a=1, nonlinearity="sigmoid")

        def forward(self, user, item):
            gmf = self.embed_user_GMF(user) * self.embed_item_GMF(item)
            mlp = self.MLP_layers(torch.cat((self.embed_user_MLP(user), self.embed_item_MLP(item)), -1))
            return self.predict_layer(torch.cat((gmf, mlp), -1)).view(-1)

    return NeuMF()


def per_sample_baseline(data: Path, epochs: int, seed: int) -> dict:
    "The common recipe: per-sample Dataset, Python-loop negatives, DataLoader(batch_size=256), fp32."
    import torch
    from torch.utils.data import DataLoader, Dataset
    from ncf.data.dataset import load_splits
    from ncf.train.trainer import evaluate_sampled
    torch.manual_seed(seed); rng = np.random.default_rng(seed)
    s = load_splits(data)
    pairs = list(zip(s.train_users.tolist(), s.train_items.tolist()))
    train_set = set(pairs)

    class Triples(Dataset):
        def __init__(self): self.rows = []
        def resample(self):
            rows = []
            for u, i in pairs:
                rows.append((u, i, 1.0))
                for _ in range(4):
                    j = int(rng.integers(s.n_items))
                    while (u, j) in train_set: j = int(rng.integers(s.n_items))
                    rows.append((u, j, 0.0))
            self.rows = rows
        def __len__(self): return len(self.rows)
        def __getitem__(self, k): return self.rows[k]

    ds = Triples()
    model = common_code_model(s.n_users, s.n_items)
    opt = torch.optim.Adam(model.parameters(), lr=0.001); loss_fn = torch.nn.BCEWithLogitsLoss()
    history, t_train = [], 0.0
    best = (-1, None)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter(); ds.resample(); model.train()
        for u, i, y in DataLoader(ds, batch_size=256, shuffle=True, num_workers=0):
            opt.zero_grad(); loss = loss_fn(model(u, i), y.float()); loss.backward(); opt.step()
        dt = time.perf_counter() - t0; t_train += dt
        v = evaluate_sampled(model, s.validation, 10, "cpu")
        history.append({"epoch": epoch, "seconds": dt, "elapsed": t_train, "samples_per_s": len(ds) / dt, "validation": v})
        if v["hr"] > best[0]: best = (v["hr"], {k: t.clone() for k, t in model.state_dict().items()})
    model.load_state_dict(best[1])
    return {"history": history, "test": evaluate_sampled(model, s.test, 10, "cpu")}
