"""The local endpoint speaks SageMaker's runtime API: boto3's real `sagemaker-runtime` client, pointed at a
real `ncf_serve` with `endpoint_url`, gets answers, headers and the exceptions it gets from AWS; and
`ncf.serve.client.RuntimeClient` gets the same answers over one keep-alive connection."""
import json
import threading

import pytest

from ncf.serve.app import MAX_BODY, RUNTIME_MAX_BODY
from ncf.serve.client import EndpointUnreachable, RuntimeClient
from ncf.serve.client import launch as _launch
from ncf.serve.inference import Recommender
from serve_helpers import trained_models, workdir

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402

ENDPOINT, VARIANT = "shop-recs", "Champion"


@pytest.fixture(scope="module")
def rec() -> Recommender:
    return Recommender.load(trained_models()["a"])


@pytest.fixture(scope="module")
def server():
    proc = _launch(trained_models()["a"], port=0, log_path=workdir() / "runtime-api.log", endpoint_name=ENDPOINT, variant_name=VARIANT)
    yield proc
    proc.terminate(); proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sm(server):
    "boto3's own client, unchanged but for where it sends requests; no retries, so a test sees the first answer."
    return boto3.client("sagemaker-runtime", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="x", config=Config(retries={"total_max_attempts": 1}))


def invoke(sm, body, **kw):
    return sm.invoke_endpoint(EndpointName=kw.pop("EndpointName", ENDPOINT), Body=body if isinstance(body, bytes) else json.dumps(body),
                              ContentType="application/json", Accept="application/json", **kw)


def test_seed_request_through_boto3(sm, rec):
    u, items = rec.users.ids[7], rec.items.ids[:25]
    r = invoke(sm, {"user": [u] * 25, "item": items})
    assert json.loads(r["Body"].read()) == rec.rank(u, items)
    assert r["ContentType"] == "application/json" and r["InvokedProductionVariant"] == VARIANT
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-model-version"] == rec.version


def test_target_variant_and_custom_attributes(sm, rec):
    r = invoke(sm, {"user": rec.users.ids[0], "item": rec.items.ids[:3]}, TargetVariant=VARIANT, CustomAttributes="trace=abc")
    assert r["InvokedProductionVariant"] == VARIANT and len(json.loads(r["Body"].read())) == 3
    with pytest.raises(sm.exceptions.ValidationError, match=r"variant\(s\) \[Challenger\]") as e:
        invoke(sm, {"user": rec.users.ids[0], "item": rec.items.ids[:3]}, TargetVariant="Challenger")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(sm.exceptions.ValidationError, match="customAttributes"):
        invoke(sm, {"user": rec.users.ids[0], "item": rec.items.ids[:3]}, CustomAttributes="x" * 1025)


def test_unknown_endpoint_is_a_validation_error(sm):
    with pytest.raises(sm.exceptions.ValidationError) as e:
        invoke(sm, {"user": "C0000000", "item": ["SKU-000000"]}, EndpointName="no-such-endpoint")
    assert e.value.response["Error"] == {"Code": "ValidationError", "Message": "Endpoint no-such-endpoint of account 000000000000 not found."}


@pytest.mark.parametrize("body,fragment", [
    (b'{"user": [1, 2', "malformed JSON"),
    (b'{"user": ["a", "b"], "item": ["SKU-000000", "SKU-000001"]}', "must repeat one user id"),
    (b'{"user": "a", "item": []}', "'item' must be a non-empty array"),
])
def test_container_errors_are_model_errors(sm, body, fragment):
    with pytest.raises(sm.exceptions.ModelError) as e: invoke(sm, body)
    resp = e.value.response
    assert resp["Error"]["Code"] == "ModelError" and resp["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert resp["OriginalStatusCode"] == 400 and fragment in json.loads(resp["OriginalMessage"])["error"]
    assert resp["LogStreamArn"].startswith(f"arn:aws:logs:us-east-1:000000000000:log-group:/aws/sagemaker/Endpoints/{ENDPOINT}")
    assert resp["Error"]["Message"].startswith("Received client error (400) from primary with message")


def test_body_limits(sm):
    with pytest.raises(sm.exceptions.ModelError) as e: invoke(sm, b"[" + b"1," * (MAX_BODY // 2) + b"1]")
    assert e.value.response["OriginalStatusCode"] == 413            # the container's limit, under SageMaker's
    with pytest.raises(sm.exceptions.ClientError) as e: invoke(sm, b"x" * (RUNTIME_MAX_BODY + 1))
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413 and "6291456" in e.value.response["Error"]["Message"]


def test_unknown_ids_get_a_tolerant_answer(sm, rec):
    u, items = rec.users.ids[3], rec.items.ids[:6]
    got = json.loads(invoke(sm, {"user": [u] * 8, "item": ["SKU-new"] + items + ["SKU-newer"], "details": True})["Body"].read())
    assert got["items"] == rec.rank(u, items) + ["SKU-new", "SKU-newer"]
    assert (got["cold_start"], got["unknown_user"], got["unknown_items"]) == (False, False, ["SKU-new", "SKU-newer"])
    cold = json.loads(invoke(sm, {"user": [0] * 4, "item": items[:4], "return_scores": True})["Body"].read())
    assert sorted(cold["items"]) == sorted(items[:4]) and cold["scores"] == sorted(cold["scores"], reverse=True)


def test_runtime_client_matches_boto3(server, sm, rec):
    body = json.dumps({"user": rec.users.ids[5], "item": rec.items.ids[10:35], "return_scores": True}).encode()
    with RuntimeClient(server.url, ENDPOINT, timeout_s=10) as rc:
        status, out, variant = rc.invoke(body)
        assert (status, variant) == (200, VARIANT) and out == invoke(sm, body)["Body"].read()
        assert rc.invoke(body, target_variant=VARIANT)[0] == 200
        status, out, _ = rc.invoke(body, target_variant="Challenger")
        assert status == 400 and "Challenger" in json.loads(out)["message"]
        status, out, _ = rc.invoke(b'{"user": ')
        assert status == 424 and json.loads(out)["OriginalStatusCode"] == 400
        conn = rc._sock
        for _ in range(20): assert rc.invoke(body)[0] == 200
        assert rc._sock is conn   # one keep-alive connection for every call
    with RuntimeClient(server.url, "other", timeout_s=10) as rc:
        assert rc.invoke(body)[0] == 400


def test_runtime_client_one_per_thread(server, rec):
    body = json.dumps({"user": rec.users.ids[1], "item": rec.items.ids[:25]}).encode()
    expected, errors = rec.rank(rec.users.ids[1], rec.items.ids[:25]), []

    def worker():
        with RuntimeClient(server.url, ENDPOINT, timeout_s=10) as rc:
            for _ in range(50):
                status, out, _ = rc.invoke(body)
                if status != 200 or json.loads(out) != expected: errors.append((status, out[:200]))
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert errors == []


def test_runtime_client_after_the_server_stops(rec):
    proc = _launch(trained_models()["a"], port=0, log_path=workdir() / "runtime-api-stop.log")
    rc = RuntimeClient(proc.url, "ncf-local", timeout_s=5)
    body = json.dumps({"user": rec.users.ids[1], "item": rec.items.ids[:2]}).encode()
    assert rc.invoke(body)[:1] == (200,)
    proc.terminate(); proc.wait(timeout=30)
    with pytest.raises(EndpointUnreachable, match="ConnectionRefusedError"): rc.invoke(body)   # resent once, then refused


def test_several_workers_answer_as_the_variant(rec):
    # a long timeout: on a loaded machine uvicorn's 5 s health check can kill a worker still importing torch, and restart it
    proc = _launch(trained_models()["a"], port=0, workers=2, log_path=workdir() / "runtime-api-workers.log",
                   endpoint_name=ENDPOINT, variant_name="Challenger", timeout=180)
    try:
        with RuntimeClient(proc.url, ENDPOINT) as rc:
            status, out, variant = rc.invoke(json.dumps({"user": rec.users.ids[2], "item": rec.items.ids[:5]}).encode())
        assert (status, variant, sorted(json.loads(out))) == (200, "Challenger", sorted(rec.items.ids[:5]))
    finally: proc.terminate(); proc.wait(timeout=30)


def test_fuzz_runtime_route_in_process(rec):
    "Any body, content type and variant: an answer SageMaker could give (200, 400 ValidationError, 424 ModelError), never a 5xx."
    from hypothesis import HealthCheck, given, settings, strategies as st
    from starlette.testclient import TestClient
    from ncf.serve.app import make_app
    client = TestClient(make_app(rec, endpoint_name=ENDPOINT, variant_name=VARIANT))
    ids = st.one_of(st.sampled_from(rec.items.ids[:30]), st.text(max_size=8), st.integers(-3, 10**6))
    query = st.fixed_dictionaries({"user": st.one_of(st.sampled_from(rec.users.ids[:10]), st.lists(ids, max_size=4), ids, st.none())},
                                  optional={"item": st.one_of(st.lists(ids, max_size=30), ids), "top_k": st.integers(-2, 40),
                                            "return_scores": st.one_of(st.booleans(), st.integers()), "details": st.one_of(st.booleans(), st.text(max_size=3))})
    body = st.one_of(query.map(lambda q: json.dumps(q).encode()), st.lists(query, max_size=3).map(lambda q: json.dumps(q).encode()), st.binary(max_size=100))

    @settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body, st.sampled_from(["application/json", "application/json; charset=utf-8", "text/csv", ""]),
           st.one_of(st.none(), st.just(VARIANT), st.text("ABCxyz019-", min_size=1, max_size=6)), st.sampled_from([ENDPOINT, "x"]))
    def run(b, ctype, variant, name):
        headers = {"content-type": ctype} if ctype else {}
        if variant: headers["x-amzn-sagemaker-target-variant"] = variant
        r = client.post(f"/endpoints/{name}/invocations", content=b, headers=headers)
        assert r.status_code in (200, 400, 424), (r.status_code, r.text)
        if r.status_code == 200:
            assert r.headers["x-amzn-invoked-production-variant"] == VARIANT and name == ENDPOINT and variant in (None, VARIANT)
            assert isinstance(r.json(), (list, dict))
        else:
            kind = r.headers["x-amzn-errortype"].split(":")[0]
            assert (kind, r.status_code) in (("ValidationError", 400), ("ModelError", 424)), r.headers
            if kind == "ModelError": assert 400 <= r.json()["OriginalStatusCode"] < 500, r.text   # a client error, never the container's 500
    run()


# -- an endpoint with two production variants ----------------------------------------------------------

CHAMPION, CHALLENGER = "AllTraffic", "Challenger"


@pytest.fixture(scope="module")
def recs() -> dict:
    return {name: Recommender.load(d) for name, d in trained_models().items()}


@pytest.fixture(scope="module")
def ab_server():
    "One `ncf_serve` with the champion (model a) and the challenger (model b), at equal weights."
    models = trained_models()
    proc = _launch(models["a"], port=0, log_path=workdir() / "runtime-api-ab.log", endpoint_name=ENDPOINT, variant_name=CHAMPION,
                   variants={CHALLENGER: models["b"]}, variant_weights={CHAMPION: 0.5, CHALLENGER: 0.5})
    yield proc
    proc.terminate(); proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ab_sm(ab_server):
    return boto3.client("sagemaker-runtime", endpoint_url=ab_server.url, region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="x", config=Config(retries={"total_max_attempts": 1}))


def ranked(sm, u, items, **kw):
    r = invoke(sm, {"user": [u] * len(items), "item": items}, **kw)
    return json.loads(r["Body"].read()), r["InvokedProductionVariant"], r["ResponseMetadata"]["HTTPHeaders"]["x-model-version"]


def test_target_variant_routes_to_its_model(ab_sm, recs):
    "TargetVariant reaches that variant's model: the answer is its `Recommender.rank`, and both headers name it."
    a, b = recs["a"], recs["b"]
    assert a.version != b.version
    u, items = a.users.ids[4], a.items.ids[:40]
    assert a.rank(u, items) != b.rank(u, items)   # the two models disagree, so the answer tells which one ranked
    assert ranked(ab_sm, u, items, TargetVariant=CHAMPION) == (a.rank(u, items), CHAMPION, a.version)
    assert ranked(ab_sm, u, items, TargetVariant=CHALLENGER) == (b.rank(u, items), CHALLENGER, b.version)


def test_without_target_variant_the_weights_route(ab_sm, recs):
    "Without TargetVariant, each request goes to one variant drawn by weight (0.5/0.5), and the answer is that variant's."
    u, items = recs["a"].users.ids[9], recs["a"].items.ids[:20]
    expected = {CHAMPION: (recs["a"].rank(u, items), recs["a"].version), CHALLENGER: (recs["b"].rank(u, items), recs["b"].version)}
    seen = {CHAMPION: 0, CHALLENGER: 0}
    for _ in range(200):
        out, variant, version = ranked(ab_sm, u, items)
        assert (out, version) == expected[variant]
        seen[variant] += 1
    # P(a fair coin gives fewer than 60 of 200) is about 1e-8: this bound does not flake, and a router stuck on one variant fails it
    assert min(seen.values()) >= 60, seen


def test_unknown_variant_names_the_endpoints_variants(ab_sm, recs):
    with pytest.raises(ab_sm.exceptions.ValidationError) as e:
        invoke(ab_sm, {"user": recs["a"].users.ids[0], "item": recs["a"].items.ids[:3]}, TargetVariant="Blue")
    assert e.value.response["Error"]["Message"] == (f"The variant(s) [Blue] of endpoint {ENDPOINT} of account 000000000000 not found; "
                                                    f"the endpoint has [{CHAMPION}, {CHALLENGER}].")


def test_ping_and_invocations_answer_for_the_champion(ab_server, recs):
    import urllib.request
    doc = json.loads(urllib.request.urlopen(ab_server.url + "/ping", timeout=10).read())
    assert doc == {"status": "healthy", "model_version": recs["a"].version, "variants": {CHAMPION: recs["a"].version, CHALLENGER: recs["b"].version}}
    assert ab_server.variants == [CHAMPION, CHALLENGER]


def test_swapping_the_challenger_leaves_the_champion_serving(recs):
    "A hot swap of the challenger (to model a) changes its answers; the champion's answers, during and after the swap, stay model a's."
    from ncf.serve.client import _http, swap_model
    models = trained_models()
    proc = _launch(models["a"], port=0, log_path=workdir() / "runtime-api-ab-swap.log", endpoint_name=ENDPOINT,
                   variants={CHALLENGER: models["b"]})
    try:
        u, items = recs["a"].users.ids[2], recs["a"].items.ids[:30]
        body = json.dumps({"user": u, "item": items}).encode()
        champion_answers, errors = [], []

        def champion_calls(stop):
            with RuntimeClient(proc.url, ENDPOINT, timeout_s=10) as rc:
                while not stop.is_set():
                    status, out, variant = rc.invoke(body, CHAMPION)
                    champion_answers.append((status, json.loads(out), variant))
        stop = threading.Event()
        t = threading.Thread(target=champion_calls, args=(stop,)); t.start()
        try:
            status, _, raw = _http("POST", proc.url + "/admin/model", {"model_dir": str(models["a"]), "variant": CHALLENGER}, timeout=120)
        finally: stop.set(); t.join()
        doc = json.loads(raw)
        assert (status, doc["variant"], doc["previous_version"], doc["model_version"]) == (200, CHALLENGER, recs["b"].version, recs["a"].version)
        assert champion_answers and all(a == (200, recs["a"].rank(u, items), CHAMPION) for a in champion_answers)
        with RuntimeClient(proc.url, ENDPOINT, timeout_s=10) as rc:
            status, out, variant = rc.invoke(body, CHALLENGER)
        assert (status, json.loads(out), variant) == (200, recs["a"].rank(u, items), CHALLENGER)
        variants = json.loads(_http("GET", proc.url + "/admin/model")[2])["variants"]
        assert {n: i["model_version"] for n, i in variants.items()} == {CHAMPION: recs["a"].version, CHALLENGER: recs["a"].version}
        assert swap_model(proc.url, models["b"]) == recs["b"].version   # no variant named: the champion's
    finally: proc.terminate(); proc.wait(timeout=30)


@pytest.mark.parametrize("variants,weights,message", [
    ({CHAMPION: "b"}, None, "variant 'AllTraffic' is named twice"),
    ({"Chal_lenger": "b"}, None, "variant name 'Chal_lenger' is not valid"),
    ({CHALLENGER: "b"}, {CHAMPION: 1}, "give one weight per variant"),
    ({CHALLENGER: "b"}, {CHAMPION: -1, CHALLENGER: 2}, "must be finite numbers >= 0"),
    ({CHALLENGER: "b"}, {CHAMPION: 0, CHALLENGER: 0}, "must sum to more than 0"),
    ({CHALLENGER: "/nonexistent/model"}, None, "did not load (variant Challenger)"),
])
def test_bad_variant_options_stop_the_server(variants, weights, message):
    from ncf.core import NCFError
    models = trained_models()
    variants = {n: models.get(d, d) for n, d in variants.items()}
    with pytest.raises(NCFError, match="exited with status 2") as e:
        _launch(models["a"], port=0, log_path=workdir() / "runtime-api-bad-variant.log", variants=variants, variant_weights=weights, timeout=120)
    assert message in str(e.value)


def test_bad_variant_option_syntax():
    import contextlib, io
    from ncf.cli.serve import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err): rc = main(["--model-dir", str(trained_models()["a"]), "--variant", "Challenger"])
    assert rc == 2 and "--variant 'Challenger' is not NAME=MODEL_DIR" in err.getvalue()


def test_several_workers_carry_the_variants(recs):
    models = trained_models()
    proc = _launch(models["a"], port=0, workers=2, log_path=workdir() / "runtime-api-ab-workers.log", endpoint_name=ENDPOINT,
                   variants={CHALLENGER: models["b"]}, variant_weights={CHAMPION: 0, CHALLENGER: 1}, timeout=180)
    try:
        u, items = recs["a"].users.ids[6], recs["a"].items.ids[:15]
        body = json.dumps({"user": u, "item": items}).encode()
        with RuntimeClient(proc.url, ENDPOINT) as rc:
            for _ in range(20):   # the champion weighs 0: every untargeted call, in whichever worker, is the challenger's
                status, out, variant = rc.invoke(body)
                assert (status, json.loads(out), variant) == (200, recs["b"].rank(u, items), CHALLENGER)
            status, out, variant = rc.invoke(body, CHAMPION)
            assert (status, json.loads(out), variant) == (200, recs["a"].rank(u, items), CHAMPION)
    finally: proc.terminate(); proc.wait(timeout=30)
