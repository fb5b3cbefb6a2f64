"Small real data sets and models for the integration tests, built once per session."
from pathlib import Path

from ncf.data.preprocess import preprocess
from ncf.data.synthetic import SyntheticSpec, write_days

SMALL_SHOP = SyntheticSpec(n_users=300, n_items=250, seed=5)


def small_dataset(root: Path, days: int = 30) -> Path:
    "Synthetic logs under root/raw, preprocessed to root/data/dt=...; returns the partition path."
    write_days(SMALL_SHOP, root / "raw", days)
    return Path(preprocess(root / "raw", root / "data", run_date="2026-02-01")["path"])
