"""The real server on a free loopback port: SageMaker contract, bad input, the admin API, a hot swap
under concurrent load with no failed request, and a fuzz test; and the recommendation API, which is the
gateway's (`ncf_gateway` over this server and a feature store), for what tests/test_realtime.py leaves out."""
import json
import socket
import urllib.parse
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from ncf.core import NCFError
from ncf.serve.inference import Recommender
from ncf.serve.app import MAX_BODY, make_app
from ncf.serve.client import current_version, free_port, launch_gateway, swap_model
from ncf.serve.client import launch as _launch
from ncf.serve.recommend import MAX_K
from ncf.serve.store import load_features, open_store
from serve_helpers import damaged_copy, diverged_copy, shop_partition, trained_models, workdir

JSON = {"content-type": "application/json"}
_logs = iter(range(10**6))


def launch(*args, **kw):
    "`ncf.serve.app.launch` with its log in the session's scratch directory rather than in /tmp."
    return _launch(*args, log_path=workdir() / f"server-{next(_logs)}.log", **kw)


@pytest.fixture(scope="module")
def models() -> dict:
    return trained_models()


@pytest.fixture(scope="module")
def recs(models) -> dict:
    return {name: Recommender.load(path) for name, path in models.items()}


@pytest.fixture(scope="module")
def server(models):
    proc = launch(models["a"], port=0)
    yield proc
    proc.terminate(); proc.wait(timeout=30)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c: yield c


def check_error(r: httpx.Response, status: int, fragment: str = ""):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and r.headers["x-model-version"]
    doc = r.json()
    assert doc["status"] == status and fragment in doc["error"], doc


# -- the SageMaker contract --------------------------------------------------------------------------

def test_ping(http, recs):
    r = http.get("/ping")
    assert r.status_code == 200 and r.headers["x-model-version"] == recs["a"].version == r.json()["model_version"]


def test_invocations_seed_contract(http, recs):
    rec = recs["a"]
    u, items = rec.users.ids[10], rec.items.ids[30:55]
    r = http.post("/invocations", json={"user": [u] * 25, "item": items})
    assert r.status_code == 200 and r.headers["x-model-version"] == rec.version
    assert r.json() == rec.rank(u, items) and sorted(r.json()) == sorted(items)


def test_invocations_batch_with_scores(http, recs):
    rec = recs["a"]
    body = [{"user": rec.users.ids[i], "item": rec.items.ids[:10], "top_k": 4, "return_scores": True} for i in range(3)]
    r = http.post("/invocations", json=body)
    assert r.status_code == 200
    assert r.json() == [rec.rank(q["user"], q["item"], 4, True) for q in body]


def test_invocations_tolerate_unknown_ids(http, recs):
    rec = recs["a"]
    u, items = rec.users.ids[10], rec.items.ids[30:40]
    r = http.post("/invocations", json={"user": [u] * 12, "item": ["SKU-new"] + items + ["SKU-newer"]},
                  headers={"accept": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json() == rec.rank(u, items) + ["SKU-new", "SKU-newer"]
    r = http.post("/invocations", content=json.dumps({"user": "nobody", "item": items, "details": True}),
                  headers={"content-type": "application/json; charset=utf-8"})
    doc = r.json()
    assert r.status_code == 200 and doc["cold_start"] and doc["unknown_user"] and doc["model_version"] == rec.version
    assert doc["scores"] == sorted(doc["scores"], reverse=True)


# -- the recommendation API: the gateway's, over this server --------------------------------------
# tests/test_realtime.py has the path end to end (seen items, one category, k=0, exclude, cold start,
# fallbacks); here: default k, several categories, GET exclude, and the 4xx answers it leaves out.

@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    store_url = f"sqlite://{tmp_path_factory.mktemp('store') / 'store.db'}"
    store = open_store(store_url)
    try: load_features(store, shop_partition())   # the partition the models learned from
    finally: store.close()
    proc = launch_gateway(store_url, server.url, port=0, log_path=workdir() / "gateway.log")
    yield proc
    proc.terminate(); proc.wait(timeout=30)


def test_gateway_default_k_categories_and_exclude(gateway, recs):
    rec, url = recs["a"], f"{gateway.url}/recommendations/{recs['a'].users.ids[3]}"
    category = {i: c.casefold() for i, c in zip(rec.md.items.item_id, rec.md.items.category)}
    assert len(httpx.get(url).json()["items"]) == 10
    cats = sorted(rec.categories)[:2]
    listed = httpx.get(url, params={"k": 20, "category": ",".join(cats)}).json()
    assert listed["items"] and {category[i] for i in listed["items"]} <= set(cats) and listed["fallback"] is None
    assert httpx.get(url, params=[("k", "20"), ("category", cats[0].upper()), ("category", cats[1])]).json()["items"] == listed["items"]
    posted = httpx.post(f"{gateway.url}/recommendations", json={"user": rec.users.ids[3], "k": 20, "categories": cats}).json()
    assert posted["items"] == listed["items"]
    top = httpx.get(url, params={"k": 5}).json()["items"]
    rest = httpx.get(url, params={"k": 5, "exclude": ",".join(top[:2])}).json()["items"]
    assert len(rest) == 5 and not set(top[:2]) & set(rest)


GATEWAY_BAD = [  # method, query or JSON body, status, fragment of the error
    ("get", {"k": MAX_K + 1}, 400, "'k' must be an integer in 1..100"),
    ("get", {"k": "ten"}, 400, "'k' must be an integer"),
    ("get", {"items": "SKU-1"}, 400, "unknown query parameter(s) ['items']"),
    ("post", {"k": 3}, 400, "'user' must be"),
    ("post", {"user": "C0000001", "exclude": "SKU-000001"}, 400, "'exclude' must be an array"),
    ("post", {"user": "C0000001", "items": ["SKU-1"]}, 400, "unknown field(s) ['items']"),
]


@pytest.mark.parametrize("method,args,status,fragment", GATEWAY_BAD, ids=[f"{b[0]} {b[1]}" for b in GATEWAY_BAD])
def test_gateway_bad_input(gateway, method, args, status, fragment):
    if method == "get": r = httpx.get(f"{gateway.url}/recommendations/C0000001", params=args)
    else: r = httpx.post(f"{gateway.url}/recommendations", json=args)
    assert r.status_code == status and fragment in r.json()["error"], r.text


def test_gateway_refuses_a_form_body(gateway):
    r = httpx.post(f"{gateway.url}/recommendations", content=b"user=C1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "content type" in r.json()["error"], r.text


# -- bad input ----------------------------------------------------------------------------------

BAD = [  # method, path, kwargs, status, fragment of the error
    ("post", "/invocations", {"content": b'{"user": ', "headers": JSON}, 400, "malformed JSON"),
    ("post", "/invocations", {"content": b'{"user": "C0000001", "item": ["SKU-000001"]}', "headers": {"content-type": "text/plain"}}, 415, "content type"),
    ("post", "/invocations", {"content": b'{"user": "C0000001", "item": ["SKU-000001"]}'}, 415, "content type"),
    ("post", "/invocations", {"json": {"user": 1.5, "item": ["SKU-000001"]}}, 400, "'user' must be an id"),
    ("post", "/invocations", {"json": {"user": ["C0000001"] * 2, "item": ["SKU-000001"]}}, 400, "one user id per item"),
    ("post", "/invocations", {"json": {"user": ["C0000001", "C0000002"], "item": ["SKU-1", "SKU-2"]}}, 400, "must repeat one user id"),
    ("post", "/invocations", {"json": {"user": "C0000001", "item": ["SKU-1"], "details": "yes"}}, 400, "'details' must be true or false"),
    ("post", "/invocations", {"json": {"user": [], "item": []}}, 400, "non-empty array"),
    ("post", "/invocations", {"json": []}, 400, "empty batch"),
    ("post", "/invocations", {"json": {"user": "C0000001", "item": ["SKU-000001"], "top_k": 0}}, 400, "top_k"),
    ("post", "/invocations", {"json": {"user": "C0000001", "item": ["SKU-000001"]}, "headers": {"accept": "text/csv"}}, 406, "Accept"),
    ("post", "/invocations", {"content": b"[" + b"1," * MAX_BODY + b"1]", "headers": JSON}, 413, "over the limit"),
    ("get", "/recommendations/C0000001?k=5", {}, 404, "Not Found"),   # the gateway's route, not the endpoint's
    ("post", "/recommendations", {"json": {"user": "C0000001"}}, 404, "Not Found"),
    ("get", "/ping/", {}, 404, "Not Found"),                            # a JSON 404, not a bare redirect
    ("get", "/nowhere", {}, 404, "Not Found"),
    ("get", "/invocations", {}, 405, "Method Not Allowed"),
    ("delete", "/ping", {}, 405, ""),
]


@pytest.mark.parametrize("method,path,kw,status,fragment", BAD, ids=[f"{b[0]} {b[1][:40]} {b[3]}" for b in BAD])
def test_bad_input(http, method, path, kw, status, fragment):
    check_error(http.request(method.upper(), path, **kw), status, fragment)


def test_oversize_chunked_body_is_refused(http):
    def chunks():
        for _ in range(40): yield b"x" * 65536     # no content-length: the server counts as it reads
    check_error(http.post("/invocations", content=chunks(), headers=JSON), 413, "over the limit")
    assert http.get("/ping").status_code == 200


def test_server_survives_a_broken_connection(server, http):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"user\"")
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GARBAGE\r\n\r\n"); s.recv(1024)
    assert http.get("/ping").status_code == 200


# -- admin API and hot swap ---------------------------------------------------------------------

def test_admin_refuses_non_loopback_clients(models, recs):
    app = make_app(recs["a"])
    for host in ("10.1.2.3", "192.168.0.7", "2001:db8::1", "testclient"):
        r = TestClient(app, client=(host, 40000)).post("/admin/model", json={"model_dir": str(models["b"])})
        assert r.status_code == 403 and "loopback" in r.json()["error"]
    assert TestClient(app, client=("10.1.2.3", 1)).get("/admin/model").status_code == 403
    assert TestClient(app, client=("::1", 1)).get("/admin/model").json()["model_version"] == recs["a"].version


def _local_address():
    "A non-loopback address of this machine, or None."
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try: s.connect(("10.255.255.255", 1)); ip = s.getsockname()[0]
        except OSError: return None
    return None if ip.startswith("127.") else ip


def test_admin_refuses_non_loopback_over_the_network(models, recs):
    ip = _local_address()
    if ip is None: pytest.skip("no non-loopback interface")
    proc = launch(models["a"], host="0.0.0.0", port=0)
    try:
        r = httpx.post(f"http://{ip}:{proc.port}/admin/model", json={"model_dir": str(models["b"])}, timeout=30)
        assert r.status_code == 403
        assert httpx.get(f"http://{ip}:{proc.port}/ping").status_code == 200
        assert current_version(proc.url) == recs["a"].version
    finally:
        proc.terminate(); proc.wait(timeout=30)


def test_swap_under_concurrent_load(models, recs, tmp_path):
    "Clients hammer the server while it swaps a→b, refuses a damaged model and a diverged one, swaps b→a: no request fails."
    a, b = recs["a"], recs["b"]
    bad, diverged = damaged_copy(models["b"], tmp_path / "bad"), diverged_copy(models["b"], tmp_path / "nan")
    queries = [{"user": [a.users.ids[i]] * 25, "item": a.items.ids[i:i + 25]} for i in range(0, 200, 10)]
    expected = {m.version: [m.rank(q["user"][0], q["item"]) for q in queries] for m in (a, b)}
    proc = launch(models["a"], port=0)
    log, errors, stop = [], [], threading.Event()

    def client(n):
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            i = n
            while not stop.is_set():
                i = (i + 1) % len(queries)
                t0 = time.monotonic()
                try:
                    if i % 4 == 0:   # the body names its model too
                        r = c.post("/invocations", json={**queries[i], "details": True})
                        ok = r.status_code == 200 and r.json()["model_version"] == r.headers["x-model-version"]
                    else:
                        r = c.post("/invocations", json=queries[i])
                        # the answer is the one of the model named in its header: a request runs on one model
                        ok = r.status_code == 200 and r.json() == expected[r.headers["x-model-version"]][i]
                    log.append((t0, time.monotonic(), r.headers.get("x-model-version"), ok))
                except Exception as e:  # a refused or reset connection is a failed request too
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    try:
        for t in threads: t.start()
        time.sleep(1.0)
        assert swap_model(proc.url, models["b"]) == b.version
        t_b = time.monotonic()
        time.sleep(1.0)
        with pytest.raises(NCFError, match="HTTP 422"): swap_model(proc.url, bad)          # does not load
        with pytest.raises(NCFError, match="HTTP 422.*smoke request"): swap_model(proc.url, diverged)   # loads, answers NaN
        time.sleep(0.5)
        assert current_version(proc.url) == b.version          # the refused model changed nothing
        t_a0 = time.monotonic()
        assert swap_model(proc.url, models["a"]) == a.version
        t_a = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads: t.join(timeout=60)
        proc.terminate(); proc.wait(timeout=30)
    assert errors == [] and len(log) > 200
    assert all(ok for *_, ok in log), [e for e in log if not e[3]][:5]
    # a request that started after a swap returned ran on the new model
    assert all(v == b.version for t0, t1, v, _ in log if t_b < t0 and t1 < t_a0)
    assert all(v == a.version for t0, t1, v, _ in log if t0 > t_a)
    versions = [v for *_, v, _ in sorted(log)]
    assert versions[0] == a.version and b.version in versions and versions[-1] == a.version


def test_several_workers_serve_but_refuse_swaps(models, recs):
    proc = launch(models["a"], port=0, workers=2)
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            rec = recs["a"]
            for i in range(20):   # spread over both workers
                r = c.post("/invocations", json={"user": rec.users.ids[i], "item": rec.items.ids[:5]})
                assert r.status_code == 200 and r.json() == rec.rank(rec.users.ids[i], rec.items.ids[:5])
            check_error(c.post("/admin/model", json={"model_dir": str(models["b"])}), 409, "--workers 1")
            assert current_version(proc.url) == rec.version
    finally:
        proc.terminate(); proc.wait(timeout=30)
    time.sleep(0.5)
    assert current_version(proc.url) is None   # terminate() stops the workers too


# -- lifecycle helpers ------------------------------------------------------------------------------

def test_a_model_that_fails_to_load_never_serves(models, tmp_path):
    bad = damaged_copy(models["a"], tmp_path / "bad", "model.safetensors")
    port = free_port()
    with pytest.raises(NCFError, match="exited with status 2.*do not match their hash"):
        launch(bad, port=port, timeout=60)
    assert current_version(f"http://127.0.0.1:{port}") is None
    with pytest.raises(NCFError, match="exited with status 2.*not a model directory"):
        launch(tmp_path, port=0)


def test_launch_refuses_a_busy_port(server, models):
    with pytest.raises(NCFError, match="already answers"): launch(models["b"], port=server.port)


def test_current_version_when_nothing_answers():
    assert current_version(f"http://127.0.0.1:{free_port()}") is None
    with pytest.raises(NCFError, match="model swap at .* failed"): swap_model(f"http://127.0.0.1:{free_port()}", "/tmp")


# -- fuzz ---------------------------------------------------------------------------------------

def _ids(rec):
    known_users, known_items = st.sampled_from(rec.users.ids[:50]), st.sampled_from(rec.items.ids[:80])
    junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.integers(-2**70, 2**70), st.text(max_size=12),
                     st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    return known_users, known_items, junk


def _mutate(base, fields, junk):
    "Valid objects, and the same with one field dropped or replaced by junk."
    def change(d, field, value, drop):
        d = dict(d)
        if drop: d.pop(field, None)
        else: d[field] = value
        return d
    return st.one_of(base, st.builds(change, base, st.sampled_from(fields), junk, st.booleans()))


def query_strategy(rec):
    "Objects near the seed contract: valid ones, one field off, and random shapes."
    users, items, junk = _ids(rec)
    some_id = st.one_of(users, items, st.text(max_size=10), st.integers(-5, 10**6))

    def valid(u, its, repeat, top, scores):
        q = {"user": [u] * len(its) if repeat else u, "item": its}
        if top is not None: q["top_k"] = top
        if scores is not None: q["return_scores"] = scores
        return q
    base = st.builds(valid, users, st.lists(items, min_size=1, max_size=30), st.booleans(),
                     st.one_of(st.none(), st.integers(1, 40)), st.one_of(st.none(), st.booleans()))
    near = _mutate(base, ["user", "item", "top_k", "return_scores", "extra"],
                   st.one_of(junk, some_id, st.lists(some_id, max_size=5), st.integers(-3, 2000)))
    shapes = st.fixed_dictionaries({}, optional={"user": st.one_of(users, st.lists(some_id, max_size=5), junk),
                                                 "item": st.one_of(st.lists(some_id, max_size=30), junk), "top_k": junk})
    return st.one_of(near, near, st.lists(near, min_size=1, max_size=4), shapes, st.lists(shapes, max_size=3), junk)


def request_strategy(rec):
    "(method, path, body bytes, content type): valid-ish JSON, raw bytes, odd paths and query strings."
    json_body = query_strategy(rec).map(lambda d: json.dumps(d).encode())
    raw = st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode), json_body.map(lambda b: b[: len(b) // 2]))
    ctype = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", "", "APPLICATION/JSON", "multipart/form-data"])
    path_seg = st.one_of(st.sampled_from(rec.users.ids[:20]), st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12))
    query = st.lists(st.tuples(st.sampled_from(["k", "user", "item", "x"]),
                               st.one_of(st.integers(-5, 2000).map(str), st.text(max_size=10), st.sampled_from(rec.items.ids[:10]))), max_size=4)
    post = st.tuples(st.just("POST"), st.just("/invocations"), st.one_of(json_body, json_body, raw), ctype)
    get = st.builds(lambda root, seg, q: ("GET", root + urllib.parse.quote(seg, safe="")
                                          + ("?" + urllib.parse.urlencode(q) if q else ""), b"", ""),
                    st.sampled_from(["/", "/ping/", "/recommendations/", "/invocations/"]), path_seg, query)
    other = st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]), st.sampled_from(["/ping", "/invocations", "/admin/model", "/x"]), raw, ctype)
    return st.one_of(post, post, get, other)


def assert_clean_answer(r, version):
    assert r.status_code < 500, (r.status_code, r.text)
    assert r.headers["x-model-version"] == version
    doc = r.json()
    if r.status_code >= 400: assert doc["status"] == r.status_code and doc["error"]


def fuzz(client, rec, examples: int):
    "Send `examples` generated requests through `client`; every answer must be clean."
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request_strategy(rec))
    def run(req):
        method, path, body, ctype = req
        assert_clean_answer(client.request(method, path, content=body, headers={"content-type": ctype} if ctype else {}), rec.version)
    run()


def test_fuzz_in_process(recs):
    rec = recs["a"]
    with TestClient(make_app(rec), client=("203.0.113.9", 1)) as client:   # not loopback: admin answers 403
        fuzz(client, rec, 3000)


def test_fuzz_real_server(http, recs):
    rec = recs["a"]
    fuzz(http, rec, 600)
