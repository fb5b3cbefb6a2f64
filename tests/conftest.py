import os, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.append(str(ROOT))   # the repository tooling, `tools`
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("NCF_SMALL", "1")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def ml100k() -> Path:
    "The real MovieLens-100K ratings file beside the checkout; tests using it skip when it is absent."
    p = SHARED_DATA / "ml-100k" / "u.data"
    if not p.exists(): pytest.skip(f"{p} not present")
    return p


def venv_bin(name: str) -> str:
    "Path of a console script installed next to the running interpreter."
    return str(Path(sys.executable).parent / name)
