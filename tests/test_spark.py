"""The Spark preprocessing job against the pandas one: same tables, same data version, same errors.

One local Spark session serves the whole module (starting one takes seconds)."""
import json
from pathlib import Path

import numpy as np, pandas as pd
import pytest

pytest.importorskip("pyspark")
import ncf.data.spark, ncf.data.spark_read
from ncf.core import ConfigError, DataError
from ncf.data.dataset import load_splits, read_tables
from ncf.data.features import FEATURES_DIR, read_features
from ncf.data.split import PreprocessParams
from ncf.cli.preprocess import main
from ncf.data.preprocess import preprocess
from ncf.data.readers import Columns, read_interactions
from ncf.data.spark import preprocess_spark
from ncf.data.spark_read import read_spark, spark_session, to_pandas
from ncf.data.synthetic import SyntheticSpec, generate, write_days

CONF = {"spark.sql.shuffle.partitions": 4, "spark.default.parallelism": 2, "spark.ui.enabled": "false",
        "spark.sql.adaptive.enabled": "false",  # adaptive planning pays off on big inputs, costs seconds on tiny ones
        "spark.driver.memory": "1g"}


@pytest.fixture(scope="session")
def spark():
    s = spark_session("local[2]", CONF)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    "30 days of the synthetic shop: daily Parquet partitions with string ids, and an item catalogue."
    root = tmp_path_factory.mktemp("shop")
    write_days(SyntheticSpec(n_users=400, n_items=300, seed=3), root/"raw", 30)
    return root


def same(got:dict, ref:dict):
    "Assert two runs wrote the same data set: tables row for row, dtypes, data version, manifest, loaded splits."
    a, b = read_tables(got["path"]), read_tables(ref["path"])
    assert sorted(a) == sorted(b)
    for name in a:
        assert list(a[name].columns) == list(b[name].columns), name
        assert a[name].dtypes.to_dict() == b[name].dtypes.to_dict(), name
        key = list(a[name].columns)
        pd.testing.assert_frame_equal(a[name].sort_values(key, ignore_index=True), b[name].sort_values(key, ignore_index=True), obj=name)
    assert got["data_version"] == ref["data_version"]
    fa, fb = (Path(x["path"]) / FEATURES_DIR for x in (got, ref))  # the online store's features, table for table
    for name in ("recent", "pools", "items"):
        pd.testing.assert_frame_equal(pd.read_parquet(fa / f"{name}.parquet"), pd.read_parquet(fb / f"{name}.parquet"), obj=name)
    assert read_features(fa) == read_features(fb) and read_features(fa).version == ref["data_version"]
    for k in ("counts", "filtered", "source", "params"): assert got[k] == ref[k], k
    on_disk = json.loads((Path(got["path"])/"manifest.json").read_text())
    assert on_disk["engine"] == "spark" and on_disk["data_version"] == ref["data_version"]
    sa, sb = load_splits(got["path"]), load_splits(ref["path"])
    np.testing.assert_array_equal(sa.train_users, sb.train_users); np.testing.assert_array_equal(sa.train_items, sb.train_items)
    for held in ("test", "validation"):
        ha, hb = getattr(sa, held), getattr(sb, held)
        assert (ha is None) == (hb is None)
        if ha is not None:
            for f in ("users", "items", "negatives"): np.testing.assert_array_equal(getattr(ha, f), getattr(hb, f))


# ---- parity ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shop_ref(shop):
    return preprocess(shop/"raw", shop/"pandas", run_date="2026-02-01")


@pytest.mark.parametrize("partitions", [1, 3])
def test_synthetic_parity(spark, shop, shop_ref, partitions):
    "Same data set on 1 and 3 user partitions; the second run replaces the first's partition whole."
    got = preprocess_spark(shop/"raw", shop/"spark", run_date="2026-02-01", spark=spark, partitions=partitions)
    same(got, shop_ref)
    assert got["spark"]["partitions"] == partitions
    assert "category" in read_tables(got["path"])["items"]  # the catalogue beside the partitions is merged
    assert [p.name for p in (shop/"spark").iterdir()] == ["dt=2026-02-01"]  # nothing staged is left behind


@pytest.mark.parametrize("params", [PreprocessParams(), PreprocessParams(rating_threshold=4, min_item_interactions=5, seed=7)],
                         ids=["defaults", "threshold"])
def test_ml100k_parity(spark, ml100k, tmp_path, params):
    ref = preprocess(ml100k, tmp_path/"pandas", params, run_id="t")
    got = preprocess_spark(ml100k, tmp_path/"spark", params, run_id="t", spark=spark, partitions=2)
    same(got, ref)
    if params.rating_threshold is None:
        c = got["counts"]
        assert (c["n_users"], c["n_items"], c["test"], c["validation"], c["train"]) == (943, 1682, 943, 943, 98114)
    else: assert got["filtered"]["below_rating_threshold"] > 0 and got["filtered"]["items_too_few_interactions"] > 0


def test_command_line_csv_log(spark, tmp_path, capsys):
    """`ncf_preprocess --engine spark` (in this session) on a CSV event log with its own column names, string
    ids, ISO datetimes, an event filter and no validation: the same data set as `--engine pandas`."""
    df = generate(SyntheticSpec(n_users=250, n_items=200, seed=9), 20)
    df["when"] = df.timestamp.astype(str)
    iso = df.index % 3 == 0
    df.loc[iso, "when"] = pd.to_datetime(df.timestamp[iso], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    src = tmp_path/"events.csv"
    df[["when", "user_id", "item_id", "event"]].rename(columns={"user_id": "customer", "item_id": "sku"}).to_csv(src, index=False)
    args = [str(src), str(tmp_path/"out"), "--user-col", "customer", "--item-col", "sku", "--time-col", "when", "--event-col", "event",
            "--events", "purchase,cart", "--min-user", "2", "--no-validation", "--negatives", "30", "--seed", "11", "--run-id"]
    assert main(args + ["pandas"]) == 0
    assert main(args + ["spark", "--engine", "spark"]) == 0
    ref, got = (json.loads((tmp_path/"out"/f"run={r}"/"manifest.json").read_text()) for r in ("pandas", "spark"))
    same({**got, "path": tmp_path/"out"/"run=spark"}, {**ref, "path": tmp_path/"out"/"run=pandas"})
    assert got["filtered"]["other_events"] > 0 and got["filtered"]["duplicates"] > 0 and "validation" not in got["counts"]
    assert capsys.readouterr().out.count(f"version     {ref['data_version'][:16]}") == 2


@pytest.mark.parametrize("fmt", ["ml-1m", "ml-csv"])
def test_movielens_text_read_parity(spark, tmp_path, fmt):
    "MovieLens 1M `::` files and 20M-style CSV read to the same canonical rows as the pandas readers."
    rng = np.random.default_rng(1)
    n = 500
    r = pd.DataFrame({"user": rng.integers(1, 60, n), "item": rng.integers(1, 90, n), "rating": rng.integers(1, 11, n)/2,
                      "timestamp": rng.integers(978_300_000, 978_400_000, n)})
    if fmt == "ml-1m":
        src = tmp_path/"ratings.dat"
        src.write_text("".join(f"{u}::{i}::{int(x)}::{t}\n" for u, i, x, t in r.itertuples(index=False)))
    else:
        src = tmp_path/"ratings.csv"
        r.rename(columns={"user": "userId", "item": "movieId"}).to_csv(src, index=False)
    ref = read_interactions(tmp_path, fmt).df
    got = read_spark(spark, tmp_path, fmt)
    cols = ["user", "item", "timestamp", "rating"]
    g = to_pandas(got.df)[cols].astype(ref[cols].dtypes.to_dict())
    pd.testing.assert_frame_equal(g.sort_values(cols, ignore_index=True), ref[cols].sort_values(cols, ignore_index=True))
    assert got.rows == n and got.format == fmt and got.files == [str(src)]


def test_remote_code_path(spark, shop, shop_ref, tmp_path, monkeypatch):
    """The remote path, as on EMR with s3:// (listing, catalogue, writing in place, read-back, manifest last, all
    through Hadoop's FileSystem), taken here with file:// URIs."""
    for m in (ncf.data.spark, ncf.data.spark_read): monkeypatch.setattr(m, "is_remote", lambda uri: str(uri).startswith("file://"))
    src, out = f"file://{shop/'raw'}", f"file://{tmp_path/'out'}"
    got = preprocess_spark(src, out, format="partitioned", run_date="2026-02-01", spark=spark, partitions=2)
    assert got["path"] == f"{out}/dt=2026-02-01" and got["source"]["uri"] == src
    same({**got, "path": tmp_path/"out"/"dt=2026-02-01", "source": {**got["source"], "uri": shop_ref["source"]["uri"]}}, shop_ref)
    with pytest.raises(ConfigError, match="pass --format"): preprocess_spark(src, out, spark=spark)


def test_remote_text_head(spark, tmp_path, monkeypatch):
    "A remote text file is sniffed from its first lines; errors name the URI, not the local copy."
    monkeypatch.setattr(ncf.data.spark_read, "is_remote", lambda uri: str(uri).startswith("file://"))
    (tmp_path/"log.csv").write_text("user_id;item_id;timestamp\n" + "1;2;3\n"*50000)
    src = ncf.data.spark_read.text_source(spark, f"file://{tmp_path/'log.csv'}", "csv")
    assert (src.sep, src.header, src.names, src.error) == (";", True, ["user_id", "item_id", "timestamp"], None)
    (tmp_path/"bad.csv").write_text("user_id,item_id,timestamp\n1,2,3\n1\t2\t3\n")
    src = ncf.data.spark_read.text_source(spark, f"file://{tmp_path/'bad.csv'}", "csv")
    assert str(src.error).startswith(f"file://{tmp_path/'bad.csv'}: line 3: mixed separators")


# ---- bad input --------------------------------------------------------------------------------------

def messages(path, spark, fmt="auto", cols=Columns(), params=PreprocessParams(), tmp=None):
    "The error messages of the pandas and the Spark job for one input."
    out = []
    for run in (preprocess, lambda *a, **k: preprocess_spark(*a, **k, spark=spark)):
        with pytest.raises((DataError, ConfigError)) as e: run(path, tmp or Path(path).parent/"out", params, fmt, cols, run_id="x")
        out.append(f"{type(e.value).__name__}: {e.value}")
    return out


BAD_TEXT = {
    "missing column": ("bad.csv", "user_id,item_id,time\n1,2,3\n", "missing column(s) ['timestamp']"),
    "timestamp": ("bad.csv", "user_id,item_id,timestamp\n1,2,3\n1,3,soon\n", "line 3: column 'timestamp': timestamp 'soon'"),
    "empty": ("bad.csv", "", "file is empty"),
    "blank lines": ("bad.csv", "\n\n\n", "file is empty"),
    "header only": ("bad.csv", "user_id,item_id,timestamp\n", "file is empty"),
    "separators in the head": ("bad.csv", "user_id,item_id,timestamp\n1,2,3\n1\t2\t3\n", "line 3: mixed separators"),
    "separators later": ("bad.csv", "user_id,item_id,timestamp\n" + "1,2,3\n"*60 + "1\t2\t3\n", "line 62: expected 3 fields separated by ','"),
    "too many fields": ("bad.csv", "user_id,item_id,timestamp\n" + "1,2,3\n"*60 + "1,2,3,4\n" + "1,2,x\n", "line 62: expected 3 fields, saw 4"),
    "missing value": ("bad.csv", "user_id,item_id,timestamp\n1,2,3\n1,,3\n", "line 3: expected 3 fields"),
    "rating": ("u.data", "1\t10\t5\t881250949\n2\t20\tfive\t881250950\n", "u.data: line 2: column 'rating': rating 'five' is not a number"),
    "movielens width": ("u.data", "1\t10\t5\n", "line 1: expected 4 fields separated by tab, found 3"),
    "double colon": ("ratings.dat", "1::10::5::978300760\n2::20::3::978300761\n3\t4\t5\t6\n", "line 3: expected 4 fields separated by '::'"),
}


@pytest.mark.parametrize("case", BAD_TEXT, ids=list(BAD_TEXT))
def test_bad_text_same_error(spark, tmp_path, case):
    name, text, expected = BAD_TEXT[case]
    (tmp_path/name).write_text(text)
    pandas_msg, spark_msg = messages(tmp_path/name, spark)
    assert spark_msg == pandas_msg
    assert spark_msg.startswith("DataError: ") and expected in spark_msg


def test_bad_parquet_same_error(spark, tmp_path):
    pd.DataFrame({"user_id": [1, None, 3], "item_id": ["a", "b", "c"], "timestamp": [1, 2, 3]}).to_parquet(tmp_path/"nulls.parquet")
    pandas_msg, spark_msg = messages(tmp_path/"nulls.parquet", spark)
    assert spark_msg == pandas_msg and "nulls.parquet: row 1: column 'user_id' has no value" in spark_msg
    pd.DataFrame({"user": [1], "item_id": ["a"], "timestamp": [1]}).to_parquet(tmp_path/"cols.parquet")
    pandas_msg, spark_msg = messages(tmp_path/"cols.parquet", spark)
    assert spark_msg == pandas_msg and "missing column(s) ['user_id']" in spark_msg


def test_bad_partition_same_error(spark, tmp_path):
    "The first bad file of a window of daily partitions is the one named, with its line."
    for day, body in (("01", "1,1,1767225600\n2,1,1767225601\n"), ("02", "1,2,1767312000\n2,2,tomorrow\n"), ("03", "1,3,x\n")):
        d = tmp_path/"raw"/f"dt=2026-01-{day}"; d.mkdir(parents=True)
        (d/"part-0.csv").write_text("user_id,item_id,timestamp\n" + body)
    pandas_msg, spark_msg = messages(tmp_path/"raw", spark, tmp=tmp_path/"out")
    assert spark_msg == pandas_msg and "dt=2026-01-02/part-0.csv: line 3: column 'timestamp': timestamp 'tomorrow'" in spark_msg


def test_spark_message_without_reread(spark, tmp_path, monkeypatch):
    "Inputs too large (or too remote) to re-read with pandas get Spark's message: same fault, Parquet row, no text line."
    monkeypatch.setattr(ncf.data.spark_read, "REREAD_BYTES", 0)
    (tmp_path/"bad.csv").write_text("user_id,item_id,timestamp\n1,2,3\n1,3,soon\n")
    with pytest.raises(DataError, match=r"bad.csv: line unknown .*column 'timestamp': timestamp 'soon' is not a finite number"):
        preprocess_spark(tmp_path/"bad.csv", tmp_path/"out", spark=spark, run_id="x")
    pd.DataFrame({"user_id": [1, 2, 3], "item_id": ["a", "b", "c"], "timestamp": ["1", "2", "later"]}).to_parquet(tmp_path/"t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: row 2: column 'timestamp': timestamp 'later' is not"):
        preprocess_spark(tmp_path/"t.parquet", tmp_path/"out", spark=spark, run_id="x")


def test_config_errors_same(spark, tmp_path):
    (tmp_path/"log.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    a, b = messages(tmp_path/"log.csv", spark, params=PreprocessParams(rating_threshold=3))
    assert a == b == "ConfigError: rating_threshold is set but the input has no rating column"
    a, b = messages(tmp_path/"missing.csv", spark)
    assert a == b and "no such file" in a
