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
