"""Readers and preprocessing: every format, split invariants (hypothesis), atomic and deterministic output, S3 under moto."""
import json, os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ncf.core import DataError
from ncf.data.dataset import load_splits, read_tables
from ncf.data.split import PreprocessParams, split_by_time, tie_key
from ncf.data.preprocess import preprocess
from ncf.data.readers import Columns, read_interactions


def test_ml100k_defaults(ml100k, tmp_path):
    m = preprocess(ml100k, tmp_path, run_id="t")
    c = m["counts"]
    assert (c["n_users"], c["n_items"], c["test"], c["validation"], c["train"]) == (943, 1682, 943, 943, 98114)
    s = load_splits(m["path"])
    for held in (s.validation, s.test):
        assert held.negatives.shape == (943, 99)
        assert all(len(set(row)) == 99 for row in held.negatives.tolist())
        everything = set(zip(s.train_users, s.train_items)) | set(zip(s.validation.users, s.validation.items)) | set(zip(s.test.users, s.test.items))
        assert not any((u, i) in everything for u, row in zip(held.users, held.negatives) for i in row)


def test_paper_format(tmp_path):
    (tmp_path / "x.train.rating").write_text("0\t0\t5\t10\n0\t1\t4\t20\n0\t2\t4\t25\n1\t1\t3\t30\n1\t2\t3\t31\n1\t3\t3\t32\n")
    (tmp_path / "x.test.rating").write_text("0\t3\t5\t40\n1\t0\t2\t50\n")
    negs = {0: [4, 5, 6], 1: [4, 5, 7]}
    (tmp_path / "x.test.negative").write_text("".join(f"({u},{t})\t" + "\t".join(map(str, negs[u])) + "\n" for u, t in ((0, 3), (1, 0))))
    m = preprocess(tmp_path / "x.train.rating", tmp_path / "out", PreprocessParams(num_negatives=3), run_id="p")
    s = load_splits(m["path"])
    assert s.test.items.tolist() == [3, 0]                      # the paper's test rows, kept exactly
    assert s.test.negatives.tolist() == [negs[0], negs[1]]      # and its negatives
    assert s.validation.items.tolist() == [2, 3]                # validation: each user's last training row


def test_parquet_and_string_ids(tmp_path):
    df = pd.DataFrame({"customer": ["a", "a", "b"], "sku": ["X-1", "X-2", "X-1"], "ts": [1, 2, 3], "event": ["view", "cart", "view"]})
    df.to_parquet(tmp_path / "log.parquet")
    got = read_interactions(tmp_path / "log.parquet", cols=Columns(user="customer", item="sku", timestamp="ts", event="event"))
    assert got.df.user.tolist() == ["a", "a", "b"] and got.df.event.tolist() == ["view", "cart", "view"]
    pd.DataFrame({"user_id": [1]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: missing column\(s\) \['item_id', 'timestamp'\]"):
        read_interactions(tmp_path / "bad.parquet")


def test_ambiguous_format_is_refused(tmp_path):
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n"); (tmp_path / "ratings.dat").write_text("1::2::3::4\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        read_interactions(tmp_path)


@st.composite
def logs(draw):
    n = draw(st.integers(1, 60))
    users = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    items = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    ts = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))   # few timestamps: many ties
    return pd.DataFrame({"user": users, "item": items, "timestamp": ts}).drop_duplicates(["user", "item"], ignore_index=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs(), st.booleans())
def test_split_invariants(df, validation):
    out = split_by_time(df, validation)
    parts = [out["train"], out["test"]] + ([out["validation"]] if validation else [])
    both = pd.concat(parts)
    assert len(both) == len(df) and set(map(tuple, both.values)) == set(map(tuple, df.values))   # a partition of the rows
    assert out["test"].user.is_unique and set(out["test"].user) == set(df.user)                   # one test row per user
    key = lambda r: (int(r["timestamp"]), int(tie_key(r["user"], r["item"])))
    for u, rows in df.groupby("user"):
        t = out["test"][out["test"].user == u].iloc[0]
        assert all(key(t) >= key(r) for _, r in rows.iterrows())                                  # the last by time, tie-broken
        if validation and len(rows) > 1:
            v = out["validation"][out["validation"].user == u].iloc[0]
            rest = out["train"][out["train"].user == u]
            assert key(v) <= key(t) and all(key(v) >= key(r) for _, r in rest.iterrows())


def test_deterministic_and_atomic(tmp_path, monkeypatch):
    from ncf.data.synthetic import SyntheticSpec, write_days
    write_days(SyntheticSpec(n_users=150, n_items=200), tmp_path / "raw", 20)
    a = preprocess(tmp_path / "raw", tmp_path / "out", run_date="2026-02-01")
    b = preprocess(tmp_path / "raw", tmp_path / "again", run_date="2026-02-01")
    assert a["data_version"] == b["data_version"]
    ta, tb = read_tables(a["path"]), read_tables(b["path"])
    assert all(ta[k].equals(tb[k]) for k in ta)
    # a crash while writing leaves the earlier partition complete and nothing half-written
    import ncf.data.preprocess as pp
    def boom(*args, **kw): raise OSError("disk full")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OSError):
        preprocess(tmp_path / "raw", tmp_path / "out", PreprocessParams(seed=7), run_date="2026-02-01")
    monkeypatch.undo()
    assert json.loads((Path(a["path"]) / "manifest.json").read_text())["data_version"] == a["data_version"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dt=2026-02-01"]


def test_s3_round_trip(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    from ncf.data.synthetic import SyntheticSpec, write_days
    write_days(SyntheticSpec(n_users=150, n_items=300), tmp_path / "raw", 20)
    local = preprocess(tmp_path / "raw", tmp_path / "local", run_date="2026-02-01")
    with moto.mock_aws():
        s3 = boto3.client("s3"); s3.create_bucket(Bucket="shop")
        for f in (tmp_path / "raw").rglob("*"):
            if f.is_file(): s3.upload_file(str(f), "shop", f"raw/{f.relative_to(tmp_path / 'raw').as_posix()}")
        remote = preprocess("s3://shop/raw", "s3://shop/data", run_date="2026-02-01")
        assert remote["path"] == "s3://shop/data/dt=2026-02-01" and remote["data_version"] == local["data_version"]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="shop", Prefix="data/")["Contents"]]
        assert "data/dt=2026-02-01/manifest.json" in keys and len(keys) == 12   # 7 tables, the manifest, 4 files of features/
        assert "data/dt=2026-02-01/features/recent.parquet" in keys
        assert load_splits("s3://shop/data/dt=2026-02-01").data_version == local["data_version"]


# ---- the online store's features -------------------------------------------------------------------

def test_features_of_a_preprocessed_data_set(tmp_path):
    "The features preprocessing writes, against a plain recomputation from the data set's tables."
    from ncf.data.features import read_features, split_categories, CATEGORY_COLUMNS
    from ncf.data.synthetic import SyntheticSpec, write_days
    write_days(SyntheticSpec(n_users=300, n_items=250, seed=5), tmp_path / "raw", 30)
    m = preprocess(tmp_path / "raw", tmp_path / "out", run_date="2026-02-01")
    t, f = read_tables(m["path"]), read_features(Path(m["path"]) / "features")
    assert f.version == m["data_version"]
    rows = pd.concat([t[n] for n in ("train", "validation", "test")])
    assert f.cutoff == rows.timestamp.max()
    uid, iid = dict(zip(t["users"].user, t["users"].user_id)), dict(zip(t["items"].item, t["items"].item_id))
    expected = {}
    for u, g in rows.groupby("user"):
        order = sorted(zip(g.timestamp, g.item), reverse=True)          # newest first, ties: the higher item index first
        expected[uid[u]] = [iid[i] for i in dict.fromkeys(i for _, i in order)][:50]
    assert f.recent == expected and all(type(u) is str and type(i) is str for u, v in f.recent.items() for i in v)
    items = t["items"]
    pop = items[items.train_count > 0].sort_values(["train_count", "item"], ascending=[False, True])
    assert f.pools["popular"] == pop.item_id.tolist()[:500]
    first = rows.groupby("item").timestamp.min()
    assert [f.items[i]["first_seen"] for i in f.pools["new"]] == sorted(first, reverse=True)[:500]
    cats = {i: split_categories(c, CATEGORY_COLUMNS["category"]) for i, c in zip(items.item_id, items.category)}
    pools = {p for p in f.pools if p.startswith("category:")}
    assert pools == {f"category:{c}" for cs in cats.values() for c in cs} and len(pools) > 5
    count = dict(zip(items.item_id, items.train_count))
    for p in pools:
        assert sorted(f.pools[p]) == sorted(i for i, cs in cats.items() if p[9:] in cs)   # < 500 items each here: all of them
        assert [count[i] for i in f.pools[p]] == sorted((count[i] for i in f.pools[p]), reverse=True)
    assert f.items[pop.item_id.iloc[0]]["category"] == items.set_index("item_id").category[pop.item_id.iloc[0]]


def test_features_keep_int_ids(ml100k, tmp_path):
    from ncf.data.features import read_features
    m = preprocess(ml100k, tmp_path, run_id="t")
    f = read_features(Path(m["path"]) / "features")
    assert len(f.recent) == 943 and all(len(v) == min(50, len(set(v))) for v in f.recent.values())
    assert type(next(iter(f.recent))) is int and type(f.pools["popular"][0]) is int and len(f.pools["popular"]) == 500
    assert sorted(f.pools) == ["new", "popular"]          # no item metadata given: no category pools


def test_a_large_catalogue_is_drawn_in_two_stages_as_deterministically(tmp_path):
    from ncf.data.synthetic import EXACT_MAX_ITEMS, Shop, SyntheticSpec, generate_day, item_catalog, next_day
    spec = SyntheticSpec(n_users=600, n_items=EXACT_MAX_ITEMS + 1, seed=2)
    assert not Shop(spec).exact and Shop(SyntheticSpec(n_users=600, n_items=EXACT_MAX_ITEMS)).exact
    next_day(tmp_path, spec, initial_days=2)
    later, = next_day(tmp_path)   # the spec, sampler included, comes back from _shop.json
    assert pd.read_parquet(later).equals(generate_day(spec, 2))   # day 2 delivered later is day 2 regenerated
    day = generate_day(spec, 0)
    assert day.item_id.isin(item_catalog(spec).item_id).all() and len(day) > 0
    # popularity and taste both still matter: the most popular tenth of the items draws a large share, not all
    top = day.item_id.value_counts(); share = top.iloc[:len(top) // 10].sum() / len(day)
    assert 0.2 < share < 0.9, share
