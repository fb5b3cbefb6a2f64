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
from ncf.emulate.world import open_world, invoke_lambda, FunctionError, TEMPLATE
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


def test_a_repeated_completion_starts_nothing(chain):
    "The same marker written again (a new S3 version, the same content) is a duplicate: no build, no execution."
    world, tmp = chain
    bucket = world.stack.resources["DataBucket"].physical_id
    last = sorted(_days(tmp, 21)[0])[-1]
    world.client("s3").put_object(Bucket=bucket, Key=f"raw/dt={last}/_SUCCESS", Body=b"")
    ran = settle(world)
    assert _kinds(ran) == [] and [x["action"] for r in ran for x in r["result"]["results"]] == ["duplicate"]


def test_a_manifest_naming_missing_files_starts_nothing(chain):
    world, tmp = chain
    bucket = world.stack.resources["DataBucket"].physical_id
    day = "2026-01-25"
    ran = [*settle(world)] if land_partition(world, bucket, day, {"part-0.parquet": b"x"}, marker=None) else []
    world.client("s3").put_object(Bucket=bucket, Key=f"raw/dt={day}/manifest.json", Body=json.dumps({"files": ["part-0.parquet", "part-1.parquet"]}).encode())
    ran = settle(world)
    out = [x for r in ran for x in r["result"]["results"]]
    assert _kinds(ran) == [] and out[0]["action"] == "incomplete" and "['part-1.parquet']" in out[0]["reason"]
    world.client("s3").delete_object(Bucket=bucket, Key=f"raw/dt={day}/manifest.json")
    world.client("s3").delete_object(Bucket=bucket, Key=f"raw/dt={day}/part-0.parquet")


def _execution(world, overrides: dict):
    "Start an execution as a person with the build's role would (`ncf_pipeline start` by hand), then let it run."
    sm = _actor(world, "CodeBuildRole").client("sagemaker")
    last = sm.list_pipeline_executions(PipelineName="ncf-retrain")["PipelineExecutionSummaries"][0]["PipelineExecutionArn"]
    params = {p["Name"]: p["Value"] for p in sm.list_pipeline_parameters_for_execution(PipelineExecutionArn=last)["PipelineParameters"]}
    params.update(overrides)
    sm.start_pipeline_execution(PipelineName="ncf-retrain", PipelineParameters=[{"Name": k, "Value": str(v)} for k, v in params.items()])
    ran = settle(world)
    assert _kinds(ran) == ["execution"]
    return ran[0]["execution"]


def _actor(world, logical_id):
    return next(a for a in world.actors.values() if a.role_logical_id == logical_id)


def _packages(world):
    return world.client("sagemaker").list_model_packages(ModelPackageGroupName="ncf")["ModelPackageSummaryList"]


def test_a_failing_job_fails_the_execution_and_changes_nothing_deployed(chain):
    world, tmp = chain
    before, packages = endpoint_model(world, "ncf"), len(_packages(world))
    ex = _execution(world, {"hp_batch_size": 0, "DataVersion": "manual-bad-batch"})
    assert ex.status == "Failed" and ex.statuses()["Train"] == "Failed"
    assert "batch_size" in ex.step("Train")["FailureReason"], ex.step("Train")
    assert "Register" not in " ".join(ex.statuses()) and len(_packages(world)) == packages
    assert endpoint_model(world, "ncf") == before
    assert invoke_endpoint(world, "ncf", _seed_request(_days(tmp, 21)[0][sorted(_days(tmp, 21)[0])[-1]]))[0] == 200


def test_a_zero_epoch_model_is_rejected_and_the_endpoint_keeps_its_model(chain):
    world, tmp = chain
    before = endpoint_model(world, "ncf")
    ex = _execution(world, {"hp_epochs": 0, "DataVersion": "manual-zero-epochs"})
    assert ex.status == "Failed" and ex.statuses()["QualityGate"] == "Succeeded" and ex.statuses()["Fail"] == "Failed"
    assert "The quality gate rejected the new model" in ex.failure_reason
    assert ex.step("Preprocess").get("CacheHitResult") is None           # a new data version: preprocessed again
    rejected = world.client("sagemaker").describe_model_package(ModelPackageName=ex.properties["RegisterRejected"]["ModelPackageArn"])
    assert rejected["ModelApprovalStatus"] == "Rejected"
    assert endpoint_model(world, "ncf") == before


def test_a_new_partition_updates_the_endpoint(chain):
    world, tmp = chain
    bucket = world.stack.resources["DataBucket"].physical_id
    before = endpoint_model(world, "ncf")
    parts, _ = _days(tmp, 22)
    new = sorted(parts)[-1]
    land_partition(world, bucket, new, parts[new])
    ran = settle(world)
    ex = next(r["execution"] for r in ran if r["kind"] == "execution")
    assert ex.status == "Succeeded", ex.failure_reason
    assert ex.properties["Deploy"]["OutputParameters"]["action"] == "updated"
    after = endpoint_model(world, "ncf")
    assert after["endpoint_config"] != before["endpoint_config"] and after["model_package_arn"] == ex.properties["RegisterApproved"]["ModelPackageArn"]
    assert invoke_endpoint(world, "ncf", _seed_request(parts[new]))[0] == 200


# ------------------------------------------------------------------ IAM: the template's own policies decide

DEPLOY_ENDPOINT_RESOURCES = """                  - !Sub arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:endpoint/${EndpointName}
                  - !Sub arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:endpoint-config/${EndpointName}-*
              - Sid: EndpointConfigs"""
TRIGGER_CLAIMS = "Action: [s3:PutObject, s3:DeleteObject]\n                Resource: !Sub ${DataBucket.Arn}/${MarkerPrefix}*"


def _template(tmp: Path, old: str, new: str) -> Path:
    text = TEMPLATE.read_text()
    assert text.count(old) == 1, old
    (tmp / "template.yaml").write_text(text.replace(old, new))
    return tmp / "template.yaml"


def _deploy(world):
    "The deploy Lambda, run from its zip under its role, for a model the pipeline would have created."
    world.client("sagemaker").create_model(ModelName="ncf-model-1", ExecutionRoleArn=world.stack.role_arn("PipelineRole"),
                                           PrimaryContainer={"Image": "img", "ModelDataUrl": "s3://b/ncf/m.tar.gz"})
    return invoke_lambda(world, "ncf-deploy", {"endpoint_name": "ncf", "model_name": "ncf-model-1", "instance_type": "ml.m5.large"})


def test_the_deploy_role_needs_the_endpoint_config_resource(tmp_path):
    with open_world(tmp_path / "as-is", log=lambda m: None) as world:
        assert _deploy(world)["action"] == "created"
    cut = _template(tmp_path, DEPLOY_ENDPOINT_RESOURCES, DEPLOY_ENDPOINT_RESOURCES.splitlines()[0] + "\n              - Sid: EndpointConfigs")
    with open_world(tmp_path / "cut", template=cut, log=lambda m: None) as world:
        with pytest.raises(FunctionError) as e:
            _deploy(world)
        assert "not authorized to perform: sagemaker:CreateEndpoint on resource" in str(e.value) and ":endpoint-config/ncf-" in str(e.value)
        assert [(d["action"], d["resource"].split(":")[-1].split("/")[0]) for d in world.denials()] == [("sagemaker:CreateEndpoint", "endpoint-config")]


def _trigger(world, day="2026-01-21"):
    "A completed partition's marker event, delivered by the rule to the trigger Lambda (the build it starts is not run)."
    bucket = world.stack.resources["DataBucket"].physical_id
    land_partition(world, bucket, day, {"part-0.parquet": b"x"})
    events = [e for kind, fn, *e in world.queue if kind == "lambda" and e[0]["detail"]["object"]["key"].endswith("_SUCCESS")]
    world.queue.clear()
    return invoke_lambda(world, "ncf-trigger", events[0][0])["results"][0]


def test_the_trigger_needs_to_write_its_claims(tmp_path):
    with open_world(tmp_path / "as-is", log=lambda m: None) as world:
        assert _trigger(world)["action"] == "started"
    cut = _template(tmp_path, TRIGGER_CLAIMS, TRIGGER_CLAIMS.replace("s3:PutObject, ", ""))
    with open_world(tmp_path / "cut", template=cut, log=lambda m: None) as world:
        with pytest.raises(FunctionError) as e:
            _trigger(world)
        assert "AccessDenied" in str(e.value) and "PutObject" in str(e.value)


def test_an_unsupported_construct_fails_the_execution_by_name(tmp_path):
    with open_world(tmp_path / "w", log=lambda m: None) as world:
        sm = world.client("sagemaker")
        definition = {"Version": "2020-12-01", "Parameters": [], "Steps": [{"Name": "Score", "Type": "Transform", "Arguments": {}}]}
        sm.create_pipeline(PipelineName="odd", PipelineDefinition=json.dumps(definition), RoleArn=world.stack.role_arn("PipelineRole"))
        sm.start_pipeline_execution(PipelineName="odd")
        ex = settle(world)[0]["execution"]
        assert ex.status == "Failed" and "UnsupportedConstruct" in ex.failure_reason and "type 'Transform'" in ex.failure_reason
        assert sm.list_endpoints()["Endpoints"] == [] and sm.describe_pipeline_execution(
            PipelineExecutionArn=ex.arn)["PipelineExecutionStatus"] == "Failed"
