"""The online feature store: the same tests against SQLite and a real `redis-server`.

Loading, reading, appended events, the atomic version switch under concurrent readers, killed loads,
the backend going away and coming back, and the read latency of each backend."""
import sys, threading, time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ncf.data.features import Features, read_features
from ncf.serve.store import (RedisStore, SqliteStore, StoreError, StoreRead, StoreUnavailable,
                             load_features, open_store)

sys.path.insert(0, str(Path(__file__).parent))
from helpers import small_dataset

TIMEOUT = 0.5   # the tests' read timeout: these 2 shared cores stall a thread longer than production's 50 ms at times


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite": s = SqliteStore(tmp_path / "store.db", timeout=TIMEOUT)
    else:
        server = request.getfixturevalue("redis_server")
        import redis
        redis.Redis(port=server.port).flushdb()
        s = RedisStore(server.url, timeout=TIMEOUT)
    yield s
    s.close()


def features(version: str, users: int = 3, per_user: int = 3, pool: int = 5) -> Features:
    "A version whose every item id names it: int user ids, string item ids `<version>:<n>`."
    return Features(version, 1000, {u: [f"{version}:{u}-{k}" for k in range(per_user)] for u in range(users)},
                    {"popular": [f"{version}:p{k}" for k in range(pool)], "category:toys": [f"{version}:t{k}" for k in range(pool)]},
                    {f"{version}:p0": {"category": "Toys|Books", "first_seen": 7}})


def consistent(r: StoreRead) -> bool:
    "Every item of a read belongs to the version it reports."
    items = r.recent + [i for v in r.pools.values() for i in v]
    return bool(items) and all(i.startswith(f"{r.version}:") for i in items)


def stored_versions(store) -> set:
    "The versions whose rows a backend still holds."
    if isinstance(store, SqliteStore):
        with store._writing() as w: return {v for (v,) in w.execute("SELECT DISTINCT version FROM recent")}
    return {k.split(":")[2] for k in store._w.scan_iter(store.prefix + "v:*")}


# ---- load and read --------------------------------------------------------------------------------

def test_load_and_read(store):
    try: assert store.version() is None                            # Redis: nothing loaded yet
    except StoreError as e: assert "no SQLite feature store there" in str(e)   # SQLite: no file yet, and a missing file is an error
    with pytest.raises(StoreError, match="no features loaded|no SQLite feature store"): store.read(1, ["popular"])
    assert store.load(features("A")) == "A" and store.version() == "A"
    r = store.read(1, ["popular", "category:toys", "category:nope"])
    assert r == StoreRead("A", True, ["A:1-0", "A:1-1", "A:1-2"], {"popular": [f"A:p{k}" for k in range(5)],
                                                                  "category:toys": [f"A:t{k}" for k in range(5)]})
    assert store.read("1", []).recent == r.recent                  # an int id spelled as a string finds the same user
    assert store.read(99, ["popular"]) == StoreRead("A", False, [], {"popular": r.pools["popular"]})
    assert store.item_meta(["A:p0", "A:zz"]) == {"A:p0": {"category": "Toys|Books", "first_seen": 7}}
    ints = Features("I", 5, {"u": [3, 1]}, {"popular": [1, 2]}, {1: {"category": None, "first_seen": 2}})
    store.load(ints)
    got = store.read("u", ["popular"])
    assert got.recent == [3, 1] and got.pools == {"popular": [1, 2]} and all(type(i) is int for i in got.recent)
    assert store.item_meta([1]) == {1: {"category": None, "first_seen": 2}}


def test_append_is_bounded_and_only_events_after_the_cutoff_count(store):
    store.max_events = 5
    store.load(features("A"))                                      # cutoff 1000
    store.append(1, ["A:old"], ts=999)                             # before the version's data: already in it, or not to be used
    for k in range(8): store.append(1, [f"A:new{k}"], ts=1001 + k)
    store.append(1, ["A:1-1"], ts=2000)                            # bought again today: first, and not repeated further on
    r = store.read(1)
    assert r.recent == ["A:1-1", "A:new7", "A:new6", "A:new5", "A:new4", "A:1-0", "A:1-2"]
    store.append(7, ["A:x", "A:y"], ts=1500)                       # an unknown user's events: newest first, last of a batch first on ties
    assert store.read(7) == StoreRead("A", False, ["A:y", "A:x"], {})
    store.load(Features("B", 1600, {1: ["B:1"]}, {}))              # the retrain saw up to 1600: the older events are in it now
    assert store.read(1).recent == ["A:1-1", "B:1"] and store.read(7).recent == []


# ---- versions -------------------------------------------------------------------------------------

def test_switch_under_concurrent_readers(store):
    big_a, big_b = features("A", users=20_000, per_user=20, pool=500), features("B", users=20_000, per_user=20, pool=500)
    store.load(big_a)
    log, stop, loaded, errors = [], threading.Event(), threading.Event(), []
    def reader(seed):
        u = seed
        try:
            while not stop.is_set():
                u = (u * 7919 + 1) % 20_000
                after = loaded.is_set()                            # whether this read began after load() returned
                r = store.read(u, ["popular", "category:toys"]); log.append((r.version, after))
                if not consistent(r) or len(r.recent) != 20: errors.append(r)
        except Exception as e: errors.append(e)
    at = {}
    switch = store._switch
    def timed_switch(v):
        at["switch"] = len(log); switch(v)
    store._switch = timed_switch
    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads: t.start()
    time.sleep(0.2); at["load"] = len(log)
    assert store.load(big_b) == "B"
    loaded.set(); time.sleep(0.2); stop.set()
    for t in threads: t.join(10)
    assert not errors, errors[:3]
    assert at["switch"] - at["load"] > 10, at                      # reads went on during the load...
    assert {v for v, _ in log[:at["switch"]]} == {"A"}             # ...all served by the old version (they ended before the switch)
    assert {v for v, after in log if after} == {"B"}               # and every read begun after the load is the new one
    assert stored_versions(store) == {"A", "B"}                    # the previous version is kept after the switch


def test_older_versions_are_deleted(store):
    for v in "ABC": store.load(features(v))
    assert stored_versions(store) == {"B", "C"} and store.read(0, ["popular"]).version == "C"


class Boom(dict):
    "A user table that fails after `n` rows: a load killed midway."
    def __init__(self, rows, n): super().__init__(rows); self.n = n
    def items(self):
        for k, (u, v) in enumerate(super().items()):
            if k == self.n: raise RuntimeError("killed mid-load")
            yield u, v


def test_a_killed_load_is_never_served(store):
    store.load(features("A", users=10))
    b = features("B", users=12_000)
    with pytest.raises(RuntimeError, match="killed"): store.load(Features("B", b.cutoff, Boom(b.recent, 11_000), b.pools, b.items))
    assert store.version() == "A" and consistent(store.read(3, ["popular"])) and not store.read(11_500).known_user
    assert store.load(b) == "B"                                     # loading it again replaces the half-written rows
    r = store.read(11_999, ["popular"])
    assert r.version == "B" and r.known_user and consistent(r)


def test_the_same_version_twice_is_a_no_op(store, monkeypatch):
    store.load(features("A"))
    monkeypatch.setattr(store, "_write_version", lambda *a: pytest.fail("rewrote the current version"))
    assert store.load(features("A")) == "A"
    with pytest.raises(StoreError, match="no version"): store.load(SimpleNamespace(version="", cutoff=0))


# ---- the backend going away -----------------------------------------------------------------------

def test_redis_down_is_unavailable_and_the_store_recovers(redis_server):
    s = RedisStore(redis_server.url)                                # production's timeouts
    s.load(features("A"))
    redis_server.stop()
    try:
        for call in (lambda: s.read(1, ["popular"]), s.version, lambda: s.append(1, ["A:x"]), lambda: s.load(features("B")),
                     lambda: s.item_meta(["A:p0"])):
            t0 = time.perf_counter()
            with pytest.raises(StoreUnavailable, match=f"Redis at {redis_server.url}"): call()
            assert time.perf_counter() - t0 < 1.0                   # a connect timeout and one retry, not a hang
    finally: redis_server.start()
    with pytest.raises(StoreError, match="no features loaded"): s.read(1)   # no persistence: the restarted server is empty
    s.load(features("A"))
    assert s.read(1, ["popular"]).version == "A"                    # the same object, reconnected
    s.close()


def test_sqlite_missing_or_corrupt_file_is_a_named_error(tmp_path):
    s = open_store(f"sqlite://{tmp_path}/store.db")
    with pytest.raises(StoreError, match="no SQLite feature store there"): s.read(1)
    with pytest.raises(StoreError, match="no SQLite feature store there"): s.version()
    (tmp_path / "store.db").write_bytes(b"this is not a database" * 100)
    for call in (lambda: s.read(1), s.version, lambda: s.load(features("A"))):
        with pytest.raises(StoreError, match="not a usable SQLite feature store") as e: call()
        assert type(e.value) is StoreError
    s.close(); (tmp_path / "store.db").unlink()
    s = open_store(tmp_path / "store.db"); s.load(features("A"))
    assert s.read(1).version == "A"
    s.close()


# ---- features from a preprocessed data set ------------------------------------------------------------

def test_load_features_of_a_preprocessed_data_set(store, tmp_path_factory):
    part = small_dataset(tmp_path_factory.mktemp("shop"))
    f = read_features(part / "features")
    assert load_features(store, part) == f.version and load_features(store, part) == f.version
    user, recent = next(iter(f.recent.items()))
    pool = next(p for p in f.pools if p.startswith("category:"))
    r = store.read(user, ["popular", pool])
    assert r == StoreRead(f.version, True, recent, {"popular": f.pools["popular"], pool: f.pools[pool]})


# ---- speed ----------------------------------------------------------------------------------------

def test_read_speed(store):
    "A user (50 recent items) and 2 pools of 500: the latency of one read, one thread."
    n_users = 10_000
    store.load(Features("A", 1000, {f"u{u}": [f"SKU-{(u * 31 + k) % 5000:06d}" for k in range(50)] for u in range(n_users)},
                        {"popular": [f"SKU-{k:06d}" for k in range(500)], "category:toys": [f"SKU-{k:06d}" for k in range(500, 1000)]}))
    for u in range(200): store.read(f"u{u}", ["popular", "category:toys"])      # warm: connections, scripts, page cache
    times = []
    t_all = time.perf_counter()
    for k in range(3000):
        t0 = time.perf_counter(); r = store.read(f"u{(k * 7919) % n_users}", ["popular", "category:toys"]); times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    times.sort()
    p50, p99 = times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3
    print(f"\n{type(store).__name__}: {len(times) / total:,.0f} reads/s, p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    assert len(r.recent) == 50 and len(r.pools["popular"]) == 500
    assert p50 < 2.0, (p50, p99)
