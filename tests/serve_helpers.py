"Model directories for the inference, serving and packaging tests, built once per test session."
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from helpers import small_dataset
from ncf.data.dataset import load_splits
from ncf.model.modeldir import random_model_dir
from ncf.train.config import TrainConfig
from ncf.train.trainer import save_model, train

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
def shop_partition() -> Path:
    "The preprocessed partition the session's models were trained on (`trained_models`), with its features."
    trained_models()
    return next((workdir() / "shop" / "data").glob("dt=*"))


def int_model() -> Path:
    "A small model directory with random weights and integer ids (like MovieLens), with `genres` metadata."
    dest = workdir() / "ints"
    random_model_dir(dest, 6, 10, user_ids=np.arange(6, dtype=np.int64) * 10 + 1, item_ids=np.arange(10, dtype=np.int64) + 100,
                     metadata={"genres": ["Comedy Drama" if i % 3 == 0 else "Sci-Fi" for i in range(10)]})
    return dest


def diverged_copy(src: Path, dest: Path) -> Path:
    "A model directory like `src` whose weights are all NaN, as a diverged training writes it: complete and verified, unfit to serve."
    import torch
    from ncf.model.modeldir import load_model_dir, write_model_dir
    md = load_model_dir(src)
    with torch.no_grad():
        for p in md.model.parameters(): p.fill_(float("nan"))
    write_model_dir(dest, md.model, md.users, md.items, md.seen, md.metrics, md.config["train"], md.data_version)
    return dest


def damaged_copy(src: Path, dest: Path, file: str = "seen.parquet") -> Path:
    "A copy of a model directory with one file changed behind the manifest's back."
    shutil.copytree(src, dest)
    (dest / file).write_bytes((dest / file).read_bytes() + b"\0")
    return dest
