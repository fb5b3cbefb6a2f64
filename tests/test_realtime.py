"""The real-time path end to end, as production runs it: client -> gateway (the recommendation Lambda's code) ->
feature store (SQLite and a real redis-server) -> the local endpoint through SageMaker's runtime API (the light
HTTP client, and the real boto3 `sagemaker-runtime` client)."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_helpers import shop_partition, trained_models, workdir
from ncf.serve.client import launch, launch_gateway
from ncf.serve.gateway import handle, service_from_env
from ncf.serve.inference import Recommender
from ncf.serve.store import load_features, open_store

pytestmark = pytest.mark.timeout(300)
ENDPOINT = "ncf-local"


@pytest.fixture(scope="module")
def endpoint():
    proc = launch(trained_models()["a"], port=0, log_path=workdir() / "realtime-endpoint.log")
    yield proc
    os.killpg(proc.pid, signal.SIGTERM); proc.wait()


@pytest.fixture(scope="module")
def rec():
    return Recommender.load(trained_models()["a"])


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    "A loaded feature store of each backend, with the shop's features."
    url = f"sqlite://{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("redis_server").url
    if request.param == "redis": flush(url)
    store = open_store(url)
    load_features(store, shop_partition())
    yield url
    store.close()


def flush(url: str):
    import redis
    redis.Redis.from_url(url).flushdb()


def gateway(store_url: str, endpoint_url: str, *options: str, log: Path):
    return launch_gateway(store_url, endpoint_url, port=0, log_path=log, endpoint_name=ENDPOINT, options=options)


def stop(proc):
    os.killpg(proc.pid, signal.SIGTERM); proc.wait(10)


def env_for(store_url: str, endpoint_url: str, client: str) -> dict:
    return {"NCF_STORE_URL": store_url, "NCF_ENDPOINT_URL": endpoint_url, "NCF_ENDPOINT_NAME": ENDPOINT, "NCF_ENDPOINT_CLIENT": client,
            "NCF_METRICS": "off", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def a_known_user(rec, store_url):
    store = open_store(store_url)
    try:
        for u in rec.users.ids[:50]:
            read = store.read(u, ["popular"])
            if read.known_user and read.recent: return u, read
    finally: store.close()
    raise AssertionError("no user with history in the store")


@pytest.mark.parametrize("client", ["http", "boto3"])
def test_the_lambda_handler_recommends_through_the_store_and_the_endpoint(store_url, endpoint, rec, client, monkeypatch):
    for k, v in env_for(store_url, endpoint.url, client).items(): monkeypatch.setenv(k, v)
    svc = service_from_env()
    user, read = a_known_user(rec, store_url)
    event = {"version": "2.0", "rawPath": f"/recommendations/{user}", "rawQueryString": "k=5", "headers": {},
             "requestContext": {"http": {"method": "GET"}, "requestId": "t1"}}
    r = handle(svc, event)
    assert r["statusCode"] == 200, r
    doc = json.loads(r["body"])
    assert len(doc["items"]) == 5 and doc["fallback"] is None and doc["cold_start"] is False
    assert doc["model_version"] == rec.version and doc["variant"] == "AllTraffic" and doc["data_version"] == read.version
    assert not set(map(str, doc["items"])) & set(map(str, read.recent)), "a seen item was recommended"
    # the endpoint's own ranking of the same candidates decides the order
    assert doc["items"] == rec.rank(user, doc["items"])
    # the REST API's payload format gives the same answer
    v1 = {"httpMethod": "GET", "path": f"/prod/recommendations/{user}", "multiValueQueryStringParameters": {"k": ["5"]},
          "requestContext": {"requestId": "t2"}}
    assert json.loads(handle(svc, v1)["body"])["items"] == doc["items"]


def test_a_purchase_today_is_excluded_today(store_url, endpoint, rec, monkeypatch):
    for k, v in env_for(store_url, endpoint.url, "http").items(): monkeypatch.setenv(k, v)
    svc = service_from_env()
    user, _ = a_known_user(rec, store_url)
    ask = lambda: json.loads(handle(svc, {"version": "2.0", "rawPath": f"/recommendations/{user}", "rawQueryString": "k=3",
                                          "requestContext": {"http": {"method": "GET"}}})["body"])["items"]
    first = ask()
    store = open_store(store_url)
    store.append(user, [first[0]])
    store.close()
    assert first[0] not in ask()


def test_the_local_gateway_serves_the_same_path(store_url, endpoint, rec, tmp_path):
    gw = gateway(store_url, endpoint.url, log=tmp_path / "gateway.log")
    try:
        user, _ = a_known_user(rec, store_url)
        r = httpx.get(f"{gw.url}/recommendations/{user}", params={"k": 4})
        assert r.status_code == 200 and len(r.json()["items"]) == 4 and r.json()["fallback"] is None
        cat = next(iter(rec.categories))
        r = httpx.get(f"{gw.url}/recommendations/{user}", params={"k": 3, "category": cat})
        items = r.json()["items"]
        assert r.status_code == 200 and items and all(rec.items.get(i) in set(rec.categories[cat].tolist()) for i in items)
        # bad input: a 4xx with a message
        for params, fragment in (({"k": 0}, "'k' must be"), ({"category": "no-such-category"}, "unknown category"), ({"kk": 1}, "unknown query parameter")):
            r = httpx.get(f"{gw.url}/recommendations/{user}", params=params)
            assert r.status_code == 400 and fragment in r.json()["error"], r.text
        r = httpx.post(f"{gw.url}/recommendations", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
        r = httpx.post(f"{gw.url}/recommendations", json={"user": user, "k": 2, "exclude": items[:1]})
        assert r.status_code == 200 and items[0] not in r.json()["items"]
        # a user nobody knows: cold start, popularity order from the endpoint
        r = httpx.get(f"{gw.url}/recommendations/nobody-knows-me", params={"k": 3})
        assert r.status_code == 200 and r.json()["cold_start"] is True and len(r.json()["items"]) == 3
    finally: stop(gw)


def test_an_endpoint_that_goes_away_gives_flagged_fallbacks(store_url, rec, tmp_path):
    ep = launch(trained_models()["a"], port=0, log_path=tmp_path / "endpoint.log")
    gw = gateway(store_url, ep.url, "--budget-ms", "200", log=tmp_path / "gateway.log")
    try:
        user, read = a_known_user(rec, store_url)
        assert httpx.get(f"{gw.url}/recommendations/{user}").json()["fallback"] is None
        os.killpg(ep.pid, signal.SIGKILL); ep.wait()
        r = httpx.get(f"{gw.url}/recommendations/{user}", params={"k": 5})
        doc = r.json()
        assert r.status_code == 200 and doc["fallback"].startswith("endpoint unavailable") and len(doc["items"]) == 5
        assert doc["items"] == [i for i in read.pools["popular"] if str(i) not in set(map(str, read.recent))][:5]
        assert "fallback for user" in (tmp_path / "gateway.log").read_text()
    finally:
        stop(gw)
        if ep.poll() is None: stop(ep)


def test_redis_that_goes_away_under_load_gives_fallbacks_then_recovers(redis_server, endpoint, rec, tmp_path):
    flush(redis_server.url)
    store = open_store(redis_server.url)
    load_features(store, shop_partition())
    store.close()
    gw = gateway(redis_server.url, endpoint.url, log=tmp_path / "gateway.log")
    users = rec.users.ids[:40]
    statuses, fallbacks, stop_flag = [], [], threading.Event()

    def load():
        with httpx.Client() as c:
            n = 0
            while not stop_flag.is_set():
                r = c.get(f"{gw.url}/recommendations/{users[n % len(users)]}", params={"k": 5}); n += 1
                statuses.append(r.status_code)
                if r.status_code == 200: fallbacks.append(r.json()["fallback"])
    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads: t.start()
        time.sleep(1.0)
        redis_server.stop()
        time.sleep(1.5)
        during = len(statuses)
        redis_server.start()   # empty: it keeps nothing on disk; the batch loads the features again
        store = open_store(redis_server.url)
        load_features(store, shop_partition())
        store.close()
        time.sleep(2.0)
    finally:
        stop_flag.set()
        for t in threads: t.join()
        stop(gw)
    assert set(statuses) == {200}, f"non-200 answers: {sorted(set(statuses))}"
    assert "store unavailable" in fallbacks, "no fallback while Redis was down"
    assert fallbacks[-1] is None and during < len(statuses), "the path did not recover after Redis restarted"
