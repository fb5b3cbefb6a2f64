"""The retrain chain as AWS would run it (`ncf.emulate`): the stack from `pipelines/template.yaml`, each actor under
its own role, the pipeline's own definition executed, the endpoint's archive answering through `sagemaker-inference`.

One world serves the chain test (it takes minutes: three builds that render the definition with the real SDK, and
three executions that preprocess, train and evaluate); the bad-input tests use their own small worlds."""
import io, json, subprocess, sys
from pathlib import Path
import pytest

pytest.importorskip("moto.server"); pytest.importorskip("policy_sentry"); pytest.importorskip("sagemaker_inference")
pytest.importorskip("sagemaker")

from ncf.data.synthetic import write_days
from ncf.emulate.world import open_world, TEMPLATE
from ncf.emulate.chain import land_partition, settle, endpoint_model, invoke_endpoint
from helpers import SMALL_SHOP



def _days(tmp: Path, days) -> dict:
    "The synthetic shop's partitions as `{day: {name: bytes}}` and its root files (catalogue)."
    root = tmp / "raw"
    write_days(SMALL_SHOP, root, days)
    parts = {}
    for p in sorted(root.glob("dt=*/*.parquet")):
        parts.setdefault(p.parent.name[3:], {})[p.name] = p.read_bytes()
    return parts, {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def _kinds(ran):
    return [r["kind"] for r in ran if r["kind"] != "lambda"]


def _started(ran):
    return [r["result"]["results"] for r in ran if r["kind"] == "lambda" and "result" in r
            and any(x.get("action") == "started" for x in r["result"]["results"])]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emulate")
    with open_world(tmp / "world") as world:
        yield world, tmp


def test_a_completed_partition_retrains_and_deploys(chain):
    world, tmp = chain
    bucket = world.stack.resources["DataBucket"].physical_id
    parts, root_files = _days(tmp, 21)
    s3 = world.client("s3")
    for name, body in root_files.items(): s3.put_object(Bucket=bucket, Key=f"raw/{name}", Body=body)
    *history, last = sorted(parts)
    for day in history: land_partition(world, bucket, day, parts[day], marker=None)   # a backfill: no markers, no runs
    assert _kinds(settle(world)) == []
    land_partition(world, bucket, last, parts[last])
    ran = settle(world)
    assert _kinds(ran) == ["build", "execution"], ran
    build = next(r for r in ran if r["kind"] == "build")
    assert build["buildStatus"] == "SUCCEEDED", Path(build["log"]).read_text()[-3000:]
    ex = next(r["execution"] for r in ran if r["kind"] == "execution")
    assert ex.status == "Succeeded", ex.failure_reason
    assert list(ex.statuses()) == ["Preprocess", "Train", "Evaluate", "QualityGate", "RegisterApproved", "CreateModel", "Deploy"]
    assert world.denials() == []
    served = endpoint_model(world, "ncf")
    assert served["model_package_arn"] == ex.properties["RegisterApproved"]["ModelPackageArn"]
    status, body = invoke_endpoint(world, "ncf", _seed_request(parts[last]))
    assert status == 200, body
    assert sorted(json.loads(body)) == sorted(json.loads(_seed_request(parts[last]))["item"])


def _seed_request(files: dict) -> bytes:
    "A user of the day and 25 items the shop sold that day, as the original system's seed request ranks them."
    import pandas as pd
    day = pd.concat(pd.read_parquet(io.BytesIO(b)) for b in files.values())
    items = list(dict.fromkeys(day["item_id"]))[:25]
    return json.dumps({"user": [day["user_id"].iloc[0]] * len(items), "item": items}).encode()
