"Model directories for the inference, serving and packaging tests, built once per test session."
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers import small_dataset
from ncf.dataset import load_splits
from ncf.model import NCF, ModelConfig
from ncf.modeldir import METRICS_SCHEMA, write_model_dir
from ncf.train import TrainConfig, save_model, train

TINY = dict(epochs=1, factor_num=8, num_layers=2, batch_size=512, full_ranking=False)


@functools.cache
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="ncf-serving-tests-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.cache
def trained_models() -> dict:
    """Two models trained on the same synthetic shop with different seeds (`a`, `b`): string ids
    (`C…`, `SKU-…`), a `category` per item, real training items. Cached for the whole session."""
    root = workdir()
    splits = load_splits(small_dataset(root / "shop"))
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        result = train(splits, TrainConfig(seed=seed, **TINY), log=lambda *a: None)
        save_model(result, splits, root / name)
        out[name] = root / name
    return out


@functools.cache
def int_model() -> Path:
    "A small model directory with random weights and integer ids (like MovieLens), with `genres` metadata."
    dest = workdir() / "ints"
    torch.manual_seed(0)
    n_users, n_items = 6, 10
    users = pd.DataFrame({"user": np.arange(n_users, dtype=np.int32), "user_id": np.arange(n_users, dtype=np.int64) * 10 + 1})
    items = pd.DataFrame({"item": np.arange(n_items, dtype=np.int32), "item_id": np.arange(n_items, dtype=np.int64) + 100,
                          "train_count": np.arange(n_items, dtype=np.int64)[::-1].copy(),
                          "genres": ["Comedy Drama" if i % 3 == 0 else "Sci-Fi" for i in range(n_items)]})
    metrics = {"schema": METRICS_SCHEMA, "k": 10, "best_epoch": 0, "history": [],
               "validation": {"hr": 0.0, "ndcg": 0.0, "k": 10}, "test": {"hr": 0.0, "ndcg": 0.0, "k": 10}}
    write_model_dir(dest, NCF(ModelConfig(n_users, n_items, factor_num=4, num_layers=2)).eval(), users, items,
                    pd.DataFrame({"user": [0, 0, 1], "item": [1, 2, 3]}), metrics, {}, "v0")
    return dest


def damaged_copy(src: Path, dest: Path, file: str = "seen.parquet") -> Path:
    "A copy of a model directory with one file changed behind the manifest's back."
    shutil.copytree(src, dest)
    (dest / file).write_bytes((dest / file).read_bytes() + b"\0")
    return dest
