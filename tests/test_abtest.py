"""A/B testing end to end: sticky assignment, the impression sinks under load and failure, and the analysis's error rates.

The statistical tests are seeded, so each gives the same answer on every run; their docstrings give the
probability that a correct implementation would fail them, had the seed been drawn at random."""
import json, logging, math, subprocess, sys, threading
from statistics import NormalDist

import numpy as np, pandas as pd, pytest
import boto3
from botocore.stub import Stubber, ANY

from ncf.data.synthetic import SyntheticSpec, Shop
from ncf.serve.experiment import (Experiment, FileImpressions, FirehoseImpressions, impression, impression_line,
                                  impression_sink, MAX_BATCH_BYTES)
from ncf.pipeline.abtest import analyse, per_user, read_impressions, replay, simulate_clicks, synthetic_requests

USERS = [f"C{i:07d}" for i in range(20_000)]


# --- assignment -------------------------------------------------------------------------------------------------

def test_assignment_is_the_same_in_another_process():
    "Python's `hash` is salted per process; the sha256 point must not be: a subprocess with another seed agrees."
    exp = Experiment("cross-process", {"AllTraffic": 0.7, "Challenger": 0.3})
    code = ("import json, sys; from ncf.serve.experiment import Experiment; "
            "e = Experiment('cross-process', {'AllTraffic': 0.7, 'Challenger': 0.3}); "
            "print(json.dumps([e.assign(f'C{i:07d}') for i in range(2000)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(out.stdout) == [exp.assign(u) for u in USERS[:2000]]


def test_assignment_is_sticky():
    exp = Experiment("sticky", {"AllTraffic": 0.5, "Challenger": 0.5})
    first = [exp.assign(u) for u in USERS[:3000]]
    assert [exp.assign(u) for u in reversed(USERS[:3000])] == first[::-1]
    assert [Experiment("sticky", {"AllTraffic": 0.5, "Challenger": 0.5}).assign(u) for u in USERS[:3000]] == first


@pytest.mark.parametrize("weights", [{"AllTraffic": 0.9, "Challenger": 0.1}, {"AllTraffic": 0.7, "Challenger": 0.2, "C3": 0.1},
                                     {"AllTraffic": 1, "Challenger": 1}])
def test_shares_match_the_weights(weights):
    "Each variant's count of 20,000 users is within 4 binomial sd of its share (a fair hash fails this with p < 1e-4)."
    exp, n = Experiment("shares", weights), len(USERS)
    counts = pd.Series([exp.assign(u) for u in USERS]).value_counts()
    total = sum(weights.values())
    for v, w in weights.items():
        p = w/total
        assert abs(counts.get(v, 0) - n*p) <= 4*math.sqrt(n*p*(1 - p)), (v, counts.get(v, 0), n*p)


def test_a_zero_weight_variant_gets_nobody():
    exp = Experiment("zero", {"AllTraffic": 1, "Off": 0, "Challenger": 1})
    assert {exp.assign(u) for u in USERS[:5000]} == {"AllTraffic", "Challenger"}


def test_renaming_reshuffles_independently():
    "Two names agree for a user with probability 0.9^2 + 0.1^2 = 0.82 when independent; 20,000 users: within 4 sd."
    w = {"AllTraffic": 0.9, "Challenger": 0.1}
    a, b = Experiment("first", w), Experiment("second", w)
    agree = np.mean([a.assign(u) == b.assign(u) for u in USERS])
    assert abs(agree - 0.82) < 4*math.sqrt(0.82*0.18/len(USERS)), agree


# --- sinks ------------------------------------------------------------------------------------------------------

def _imp(i, n_items=10, thread=0):
    return impression(f"t{thread}-r{i}", "AllTraffic", f"C{i:07d}", [f"SKU-{j:06d}" for j in range(n_items)], ts=float(i))


@pytest.mark.parametrize("kw", [dict(max_lines=3), dict(max_bytes=5000), dict(interval_s=0.0), dict()])
def test_file_sink_keeps_every_line_whole_under_concurrent_writers(tmp_path, kw):
    "16 threads x 300 impressions of ~4 KB, flushed by count, size, time or only at close: each line once, whole."
    path = tmp_path/"imp.jsonl"
    sink = FileImpressions(path, **kw)
    start = threading.Barrier(16)
    def writer(t):
        start.wait()
        for i in range(300): sink.log(_imp(i, n_items=300, thread=t))
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(16)]
    for th in threads: th.start()
    for th in threads: th.join()
    sink.close()
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    ids = [json.loads(line)["request_id"] for line in raw.splitlines()]   # a half line would not parse
    assert sorted(ids) == sorted(f"t{t}-r{i}" for t in range(16) for i in range(300))
    assert sink.written == 4800
    assert len(read_impressions(path)) == 4800


def test_file_sink_appends_and_bounds_its_buffer(tmp_path):
    path = tmp_path/"imp.jsonl"
    with FileImpressions(path, max_lines=5, interval_s=3600) as sink:
        for i in range(4): sink.log(_imp(i))
        assert not path.read_bytes()                       # below every bound: still buffered
        sink.log(_imp(4))
        assert len(path.read_bytes().splitlines()) == 5    # the 5th line reached max_lines
    with FileImpressions(path) as sink: sink.log(_imp(5))  # a second sink appends
    assert [json.loads(l)["request_id"] for l in path.read_text().splitlines()] == [f"t0-r{i}" for i in range(6)]


def _client():
    return boto3.client("firehose", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")

def _ok(n): return {"FailedPutCount": 0, "RequestResponses": [{"RecordId": f"id{i}"} for i in range(n)]}

def _params(lines): return {"DeliveryStreamName": "imps", "Records": [{"Data": d} for d in lines]}


def test_firehose_batches_at_most_500_records():
    "1,201 impressions: calls of 500, 500 and 201 records (the last at close), newline-terminated, validated by Stubber."
    client, imps = _client(), [_imp(i) for i in range(1201)]
    lines = [impression_line(m) for m in imps]
    with Stubber(client) as stub:
        for lo, hi in [(0, 500), (500, 1000), (1000, 1201)]: stub.add_response("put_record_batch", _ok(hi - lo), _params(lines[lo:hi]))
        sink = FirehoseImpressions(client, "imps")
        for m in imps[:1000]: sink.log(m)
        assert sink.calls == 2 and sink.sent == 1000      # sent as each batch filled
        for m in imps[1000:]: sink.log(m)
        sink.close()
        stub.assert_no_pending_responses()
    assert (sink.sent, sink.dropped, sink.calls) == (1201, 0, 3)
    assert all(l.endswith(b"\n") and l.count(b"\n") == 1 for l in lines)


class Recorder:
    "A Firehose client that records each call and fails the records `fail(call, index)` says."
    def __init__(self, fail=lambda call, i: False, raise_on=()):
        self.batches, self.fail, self.raise_on = [], fail, raise_on
    def put_record_batch(self, DeliveryStreamName, Records):
        call = len(self.batches); self.batches.append([r["Data"] for r in Records])
        if call in self.raise_on: raise ConnectionError("network down")
        res = [{"ErrorCode": "ServiceUnavailableException", "ErrorMessage": "slow"} if self.fail(call, i) else {"RecordId": str(i)}
               for i in range(len(Records))]
        return {"FailedPutCount": sum("ErrorCode" in r for r in res), "RequestResponses": res}


def test_firehose_batches_stay_under_4_mib():
    "Records of ~0.9 MiB: at most 4 per call, every call under 4 MiB, nothing lost."
    client = Recorder()
    sink = FirehoseImpressions(client, "imps")
    imps = [_imp(i, n_items=70_000) for i in range(10)]
    size = len(impression_line(imps[0]))
    assert 0.8*2**20 < size < 1000*1024
    for m in imps: sink.log(m)
    sink.close()
    assert all(sum(map(len, b)) <= MAX_BATCH_BYTES for b in client.batches)
    assert [len(b) for b in client.batches] == [4, 4, 2]
    assert [json.loads(d)["request_id"] for b in client.batches for d in b] == [m["request_id"] for m in imps]


def test_firehose_drops_a_record_over_1000_kib(caplog):
    client = Recorder()
    sink = FirehoseImpressions(client, "imps")
    with caplog.at_level(logging.WARNING, logger="ncf.serve.experiment"):
        sink.log(_imp(0, n_items=100_000)); sink.log(_imp(1)); sink.close()
    assert sink.dropped == 1 and sink.sent == 1 and "t0-r0 dropped" in caplog.text


def test_firehose_retries_only_the_failed_records():
    "Call 0 fails records 1 and 3; call 1 (their retry) fails record 3 again; call 2 sends it: nothing resent twice."
    fails = {0: {1, 3}, 1: {1}}
    client = Recorder(fail=lambda call, i: i in fails.get(call, ()))
    sleeps = []
    sink = FirehoseImpressions(client, "imps", max_records=5, sleep=sleeps.append, backoff_s=0.1)
    imps = [_imp(i) for i in range(5)]
    for m in imps: sink.log(m)
    ids = [[json.loads(d)["request_id"] for d in b] for b in client.batches]
    assert ids == [[f"t0-r{i}" for i in range(5)], ["t0-r1", "t0-r3"], ["t0-r3"]]
    assert (sink.sent, sink.dropped) == (5, 0) and sleeps == [0.1, 0.2]


def test_firehose_gives_up_after_max_retries_and_logs_the_drop(caplog):
    client = Recorder(fail=lambda call, i: i == 0, raise_on={1})
    sink = FirehoseImpressions(client, "imps", max_records=3, max_retries=2, sleep=lambda s: None)
    with caplog.at_level(logging.WARNING, logger="ncf.serve.experiment"):
        for i in range(3): sink.log(_imp(i))
        sink.close()
    assert [len(b) for b in client.batches] == [3, 1, 1]  # the batch, then record 0 twice (one call raising)
    assert (sink.sent, sink.dropped) == (2, 1)
    assert "1 impressions dropped after 2 retries to Firehose stream imps" in caplog.text and "network down" in caplog.text


def test_impression_sink_from_the_environment(tmp_path):
    client = _client()
    with Stubber(client) as stub:
        stub.add_response("put_record_batch", _ok(1), {"DeliveryStreamName": "prod-impressions", "Records": [{"Data": ANY}]})
        with impression_sink({"NCF_IMPRESSIONS": "firehose://prod-impressions"}, client=client) as sink: sink.log(_imp(0))
        stub.assert_no_pending_responses()
    with impression_sink({"NCF_IMPRESSIONS": f"file://{tmp_path}/x/imp.jsonl"}) as sink: sink.log(_imp(0))
    assert json.loads((tmp_path/"x"/"imp.jsonl").read_text())["request_id"] == "t0-r0"


# --- the analysis's error rates ---------------------------------------------------------------------------------

SHOP = Shop(SyntheticSpec(n_users=2000, n_items=300, seed=3))
ITEM_INDEX = {sid: i for i, sid in enumerate(SHOP.item_ids(np.arange(300)).tolist())}

def oracle(variant, user, candidates):
    "The shop's true preference order: the best ranking there is."
    idx = np.array([ITEM_INDEX[c] for c in candidates])
    s = SHOP.logits(np.array([int(user[1:])]))[0][idx]
    return [candidates[i] for i in np.argsort(-s, kind="stable")]

def popularity(variant, user, candidates):
    "Everyone gets the same order: the shop's true popularity, without personal taste."
    return sorted(candidates, key=lambda c: -SHOP.item_logpop[ITEM_INDEX[c]])

def serve(tmp_path, rank, n, seed=0, weights=None, name="ab"):
    "Serve `n` synthetic requests through `rank` into a fresh impressions file, and read it back."
    exp = Experiment(name, weights or {"AllTraffic": 0.5, "Challenger": 0.5})
    path = tmp_path/f"imp-{name}-{seed}-{len(list(tmp_path.iterdir()))}.jsonl"   # sinks append: never reuse a file
    with FileImpressions(path) as sink: replay(exp, rank, synthetic_requests(SHOP, n, pool=100, seed=seed), sink)
    return read_impressions(path)


@pytest.fixture(scope="module")
def worse_challenger(tmp_path_factory):
    "2,000 requests, 50/50: the champion ranks by the shop's true tastes, the challenger by popularity only."
    both = lambda v, u, c: oracle(v, u, c) if v == "AllTraffic" else popularity(v, u, c)
    return serve(tmp_path_factory.mktemp("ab"), both, 2000)


@pytest.mark.parametrize("seed", range(5))
def test_a_challenger_known_to_be_worse_loses(worse_challenger, seed):
    """At 2,000 requests (1,075 users), alpha 0.05: `champion wins` on 5 click seeds.

    The false-decision probability is that of missing an effect this size: Phi(z_{alpha/2} - |diff|/se),
    computed from the report and asserted below 1e-4 (measured for seed 0: |diff|/se = 12.5, so below 1e-20)."""
    imps = worse_challenger
    report = analyse(imps, simulate_clicks(SHOP, imps, seed=seed), alpha=0.05)
    assert report.decision == "champion wins", str(report)
    se = (report.diff_high - report.diff_low)/(2*NormalDist().inv_cdf(0.975))
    assert NormalDist().cdf(NormalDist().inv_cdf(0.975) - abs(report.diff)/se) < 1e-4
    assert report.table.loc["AllTraffic", "ctr_low"] > report.table.loc["Challenger", "ctr_high"]


def test_a_small_sample_gives_no_decision_and_asks_for_more_users(tmp_path):
    "With 60 requests the analysis must not decide between two equal models, and must ask for more users than it has."
    imps = serve(tmp_path, oracle, 60)
    report = analyse(imps, simulate_clicks(SHOP, imps))
    assert report.decision == "no decision yet" and report.users_needed > report.table.users.sum()


@pytest.fixture(scope="module")
def aa_runs(tmp_path_factory):
    "200 A/A experiments: the same 2,000 oracle-ranked requests, users re-split by a new experiment name, new click seeds."
    imps = serve(tmp_path_factory.mktemp("aa"), oracle, 2000, weights={"AllTraffic": 1})
    out = []
    for r in range(200):
        exp = Experiment(f"aa-{r}", {"AllTraffic": 0.5, "Challenger": 0.5})
        split = imps.assign(variant=imps.user.map({u: exp.assign(u) for u in imps.user.unique()}))
        out.append((split, simulate_clicks(SHOP, split, seed=r)))
    return out


def test_an_a_a_test_rarely_decides(aa_runs):
    """A correct level-0.05 test decides in ~5% of A/A runs: 10 of 200 expected, Binomial(200, 0.05).

    We assert 2..20 decisions (no-decision rate 90%..99%). A correct test falls outside with probability ~0.2%
    (P(X <= 1) = 0.04%, P(X >= 21) = 0.16%); a test that ignores the variance (decides too often) or always
    answers `no decision` (an infinite interval) fails it. Measured: 6 of 200. In this shop one user's impressions
    are only weakly correlated, so a per-impression test also decides 6 of 200 here: the bound does not tell the two apart."""
    decisions = [analyse(s, c).decision for s, c in aa_runs]
    n = sum(d != "no decision yet" for d in decisions)
    assert 2 <= n <= 20, (n, pd.Series(decisions).value_counts().to_dict())


def test_per_user_clicks_count_only_shown_items(worse_challenger):
    imps = worse_challenger.head(50)
    shown = imps.iloc[0]
    clicks = pd.DataFrame({"request_id": [shown.request_id]*3 + ["unknown"], "item": [shown["items"][0], shown["items"][0], "SKU-999999", shown["items"][0]],
                           "ts": 0.0})
    pu = per_user(imps, clicks)
    assert pu.clicks.sum() == 1 and pu.impressions.sum() == 50


def test_users_seen_in_both_variants_are_left_out_and_counted(worse_challenger):
    "A ramp or a bug that moves a user between variants must not let their clicks count for both."
    imps = worse_challenger
    moved = imps[imps.variant == "AllTraffic"].head(1).assign(variant="Challenger", request_id="moved-1")
    user = moved.user.iloc[0]
    both = pd.concat([imps, moved], ignore_index=True)
    report = analyse(both, simulate_clicks(SHOP, both))
    assert report.mixed_users == 1
    assert report.table.users.sum() == imps.user.nunique() - 1
    assert report.table.impressions.sum() == len(both) - (both.user == user).sum()
