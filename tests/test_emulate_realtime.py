"""The real-time stack (`pipelines/realtime.yaml`) deployed into the emulation, and the recommendation Lambda's code run
under its own role: every AWS call it makes (`sagemaker-runtime` InvokeEndpoint, Firehose PutRecordBatch) is checked by
`ncf.emulate.iam` against RecommendRole's policies in the template, and a permission cut from the template shows as a
denial naming the action and the resource.

What is a stand-in here, and why:
- the feature store: the stack's ElastiCache replication group exists in moto, but its primary endpoint is moto's
  made-up DNS name and no Redis answers there, so the Lambda's store is a real local redis-server (the `redis_server`
  fixture) loaded with a few hand-made features, in place of the `NCF_STORE_URL` the stack gives;
- the SageMaker endpoint: the retrain stack's endpoint is not deployed in this world, so moto's InvokeEndpoint answers
  as the model would with `details` (the candidates it was sent, ranked in reverse, with scores and a model version);
  the request still goes through boto3, the IAM check and moto's server, as the Lambda's does on AWS;
- the Lambda runs in this process (`ncf.serve.gateway.handle` with `service_from_env` on the function's environment
  from the deployed stack, then the impressions flushed as `lambda_handler` does), because the emulation's own
  `invoke_lambda` counts a fresh interpreter's start against the function's 3-second timeout, which AWS does not.
"""
import contextlib
import json
from pathlib import Path
from unittest import mock

import pytest

from ncf.data.features import Features
from ncf.emulate import iam
from ncf.emulate.stack import UnsupportedResource
from ncf.emulate.world import REGION, ACCOUNT, TEMPLATE, open_world
from ncf.pipeline.bundle import recommend_zip
from ncf.serve.gateway import handle, service_from_env
from ncf.serve.store import open_store
from ncf.core import NCFError

REALTIME = TEMPLATE.parent / "realtime.yaml"
DATA_BUCKET = "ncf-emulated-data"
INVOKE_ENDPOINT = "Resource: !Sub arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:endpoint/${EndpointName}"
PUT_RECORD_BATCH = "Action: [firehose:PutRecordBatch]"
VPC_INTERFACES = "Action: [ec2:CreateNetworkInterface, ec2:DescribeNetworkInterfaces, ec2:DeleteNetworkInterface,"


def _template(tmp: Path, old: str, new: str) -> Path:
    "A copy of the real-time template with `old` (found once) replaced by `new`."
    text = REALTIME.read_text()
    assert text.count(old) == 1, old
    (tmp / "realtime.yaml").write_text(text.replace(old, new))
    return tmp / "realtime.yaml"


def _prepare(world) -> dict:
    "What the real-time stack takes as given: a VPC with two private subnets, the retrain stack's data bucket and alert topic, and the Lambda's zip."
    ec2 = world.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{z}")["Subnet"]["SubnetId"]
               for i, z in enumerate("ab")]
    world.client("s3").create_bucket(Bucket=DATA_BUCKET)
    topic = world.client("sns").create_topic(Name="ncf-alerts")["TopicArn"]
    world.client("s3").upload_file(str(recommend_zip(world.root / "code" / "recommend.zip")), "ncf-emulated-code", "ncf/recommend.zip")
    return {"VpcId": vpc, "SubnetIds": subnets, "DataBucketName": DATA_BUCKET, "AlertTopicArn": topic}


@contextlib.contextmanager
def _realtime_world(root: Path, template: Path = REALTIME):
    with open_world(root, template=template, prepare=_prepare, log=lambda m: None) as world:
        yield world


@contextlib.contextmanager
def _endpoint_answers():
    "moto's InvokeEndpoint answering as the ncf model does with details: the candidates sent, in reverse, with scores; each call recorded."
    from moto.sagemakerruntime.responses import SageMakerRuntimeResponse
    calls = []
    def invoke_endpoint(self):
        payload = json.loads(self.body)
        calls.append({"endpoint": self.path.split("/")[2], "payload": payload, "variant": self.headers.get("X-Amzn-SageMaker-Target-Variant")})
        items = list(reversed(payload["item"]))[:payload["top_k"]]
        body = {"items": items, "scores": [1.0 - i / 10 for i in range(len(items))], "cold_start": False, "model_version": "stub-1"}
        return 200, {"Content-Type": "application/json", "x-Amzn-Invoked-Production-Variant": "AllTraffic"}, json.dumps(body)
    with mock.patch.object(SageMakerRuntimeResponse, "invoke_endpoint", invoke_endpoint):
        yield calls


def _store(redis_server, name: str):
    "The Lambda's feature store: a real Redis, loaded with one user's recent items and two pools."
    store = open_store(redis_server.url, prefix=f"{{ncf-emulate-{name}}}:")
    store.load(Features("v1", 1000, {"u1": ["i9"]}, {"popular": ["i1", "i2", "i3", "i9"], "new": ["i4"]},
                        {i: {"category": None, "first_seen": 1} for i in ("i1", "i2", "i3", "i4", "i9")}))
    return store


def _recommend(world, store, monkeypatch, k: int = 3) -> dict:
    "One `GET /recommendations/u1?k=...` through the Lambda's code, as RecommendRole, every boto3 call checked; the response."
    import boto3
    fn = world.stack.function("RecommendFunction")
    c = world.actor(fn.role_arn).credentials
    for var, value in {"AWS_ACCESS_KEY_ID": c["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": c["SecretAccessKey"],
                       "AWS_SESSION_TOKEN": c["SessionToken"], "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)   # the Lambda's own default session, from the role's credentials
    event = {"version": "2.0", "routeKey": "GET /recommendations/{user+}", "rawPath": "/recommendations/u1", "rawQueryString": f"k={k}",
             "headers": {}, "requestContext": {"http": {"method": "GET", "path": "/recommendations/u1"}, "requestId": "req-1"}}
    undo = iam.install_everywhere(world.actor(fn.role_arn).principal, log_path=world.iam_log, endpoint_url=world.endpoint_url)
    try:
        service = service_from_env(fn.environment, store=store, metrics=None)
        response = handle(service, event)
        service.impressions.flush()   # as lambda_handler does after each invocation
    finally: undo()
    return {**response, "body": json.loads(response["body"]), "impressions": service.impressions}


def _warm(world):
    "One call to moto's runtime API first: its first request imports the service, which can outlast the Lambda's 300 ms budget."
    world.client("sagemaker-runtime").invoke_endpoint(EndpointName="warm-up", Body=json.dumps({"item": [], "top_k": 1}).encode())


def _decisions(world) -> list[tuple]:
    return [(d["action"], d["resource"], d["allowed"]) for d in map(json.loads, world.iam_log.read_text().splitlines())] if world.iam_log.exists() else []


def test_the_recommendation_lambda_makes_only_calls_its_role_allows(tmp_path, redis_server, monkeypatch):
    store = _store(redis_server, "as-is")
    with _realtime_world(tmp_path / "w") as world, _endpoint_answers() as calls:
        fn = world.stack.function("RecommendFunction")
        assert fn.handler == "ncf.serve.gateway.lambda_handler" and fn.role_arn == world.stack.role_arn("RecommendRole")
        primary = world.client("elasticache").describe_replication_groups(
            ReplicationGroupId=world.stack.resources["FeatureStore"].physical_id)["ReplicationGroups"][0]["NodeGroups"][0]["PrimaryEndpoint"]
        assert fn.environment["NCF_STORE_URL"] == f"rediss://{primary['Address']}:{primary['Port']}/0"   # moto's address: the stand-in above
        _warm(world); calls.clear()
        out = _recommend(world, store, monkeypatch)
        assert out["statusCode"] == 200 and out["body"]["fallback"] is None, out["body"]
        assert out["body"]["items"] == ["i3", "i2", "i4"] and out["body"]["model_version"] == "stub-1"   # the endpoint's ranking of the pools taken in turn, i9 (recent) blocked
        assert [(c["endpoint"], c["payload"]["item"], c["variant"]) for c in calls] == [("ncf-endpoint", ["i1", "i4", "i2", "i3"], None)]
        stream = world.stack.resources["ImpressionsStream"]
        endpoint_arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/ncf-endpoint"
        assert _decisions(world) == [("sagemaker:InvokeEndpoint", endpoint_arn, True), ("firehose:PutRecordBatch", stream.arn, True)]
        assert world.denials() == [] and out["impressions"].sent == 1
        objects = world.client("s3").list_objects_v2(Bucket=DATA_BUCKET, Prefix="impressions/")["Contents"]
        record = json.loads(world.client("s3").get_object(Bucket=DATA_BUCKET, Key=objects[0]["Key"])["Body"].read())
        assert (record["request_id"], record["items"], record["model_version"]) == ("req-1", ["i3", "i2", "i4"], "stub-1")
        # Firehose writes with its own role, which moto does not check: may ImpressionsRole write that key?
        assert iam.allowed(world.stack.role_policies("ImpressionsRole"), "s3:PutObject", f"arn:aws:s3:::{DATA_BUCKET}/{objects[0]['Key']}").allowed
        assert not iam.allowed(world.stack.role_policies("ImpressionsRole"), "s3:PutObject", f"arn:aws:s3:::{DATA_BUCKET}/raw/x").allowed


def test_without_put_record_batch_the_impressions_are_denied(tmp_path, redis_server, monkeypatch):
    store = _store(redis_server, "no-firehose")
    cut = _template(tmp_path, PUT_RECORD_BATCH, "Action: [firehose:PutRecord]")
    with _realtime_world(tmp_path / "w", cut) as world, _endpoint_answers():
        _warm(world)
        out = _recommend(world, store, monkeypatch)
        assert out["statusCode"] == 200 and out["body"]["fallback"] is None   # the answer does not wait on impressions
        stream = world.stack.resources["ImpressionsStream"].arn
        denied = {(d["role"], d["action"], d["resource"]) for d in world.denials()}
        assert denied == {(world.stack.role_arn("RecommendRole"), "firehose:PutRecordBatch", stream)}
        assert out["impressions"].sent == 0 and out["impressions"].dropped == 1   # retried, then dropped: AWS's AccessDenied each time
        assert "Contents" not in world.client("s3").list_objects_v2(Bucket=DATA_BUCKET, Prefix="impressions/")


def test_invoke_endpoint_on_another_endpoint_is_denied(tmp_path, redis_server, monkeypatch):
    store = _store(redis_server, "other-endpoint")
    cut = _template(tmp_path, INVOKE_ENDPOINT, INVOKE_ENDPOINT + "-other")
    with _realtime_world(tmp_path / "w", cut) as world, _endpoint_answers() as calls:
        _warm(world); calls.clear()
        out = _recommend(world, store, monkeypatch)
        body = out["body"]
        assert out["statusCode"] == 200 and body["model_version"] is None and body["fallback"].startswith("endpoint unavailable: AccessDeniedException")
        assert "not authorized to perform: sagemaker:InvokeEndpoint" in body["fallback"] and calls == []   # refused before it reached the endpoint
        assert [(d["action"], d["resource"]) for d in world.denials()] == [("sagemaker:InvokeEndpoint", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/ncf-endpoint")]


def test_a_vpc_function_whose_role_cannot_manage_network_interfaces_is_refused(tmp_path):
    cut = _template(tmp_path, VPC_INTERFACES, "Action: [ec2:DescribeNetworkInterfaces, ec2:DeleteNetworkInterface,")
    with pytest.raises(NCFError, match="RecommendFunction: InvalidParameterValueException: The provided execution role does not have "
                                       "permissions to call CreateNetworkInterface on EC2"):
        with _realtime_world(tmp_path / "w", cut): pass


def test_an_unknown_type_still_fails_by_name(tmp_path):
    text = REALTIME.read_text().replace("  StoreSubnetGroup:\n    Type: AWS::ElastiCache::SubnetGroup",
                                        "  Accelerator:\n    Type: AWS::GlobalAccelerator::Accelerator\n    Properties: {Name: x}\n\n"
                                        "  StoreSubnetGroup:\n    Type: AWS::ElastiCache::SubnetGroup")
    (tmp_path / "realtime.yaml").write_text(text)
    with pytest.raises(UnsupportedResource, match=r"no creator for Accelerator \(AWS::GlobalAccelerator::Accelerator\)"):
        with _realtime_world(tmp_path / "w", tmp_path / "realtime.yaml"): pass
