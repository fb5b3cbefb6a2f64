import os, shutil, socket, subprocess, sys, time
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


class RedisServer:
    "A real redis-server on a free loopback port, no persistence, in a temporary directory; stop() and start() again."
    def __init__(self, root: Path):
        with socket.socket() as s: s.bind(("127.0.0.1", 0)); self.port = s.getsockname()[1]
        self.root, self.proc = root, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        exe = shutil.which("redis-server")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", str(self.root)], stdout=open(self.root / "redis.log", "ab"), stderr=subprocess.STDOUT)
        import redis
        client, deadline = redis.Redis(port=self.port, socket_timeout=1), time.time() + 10
        while True:
            try:
                if client.ping(): return self
            except redis.exceptions.ConnectionError:
                if time.time() > deadline or self.proc.poll() is not None: raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()}")
                time.sleep(0.05)
            finally: client.close()

    def stop(self):
        self.proc.terminate(); self.proc.wait(10); self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if not shutil.which("redis-server"):
        if os.environ.get("CI"): pytest.fail("redis-server is not installed: `make test` installs it (make sysdeps)")
        pytest.skip("redis-server is not installed (make sysdeps installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    if server.proc: server.stop()
