"""The trigger and deploy Lambdas, called directly (moto's Lambda invoke needs Docker), against moto or botocore's Stubber."""
import json, subprocess, sys, zipfile
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber
from moto import mock_aws

from ncf.pipeline import lambdas
from ncf.pipeline.lambdas import (DeployError, claim, claim_key, data_object, deploy, deploy_handler, endpoint_config_name,
                         object_events, trigger_handler, wait_in_service)

ROOT = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
FAKE = dict(region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
BUCKET, PROJECT = "shop-data", "ncf-retrain"
ENV = {"NCF_CODEBUILD_PROJECT": PROJECT, "NCF_RAW_PREFIX": "raw/", "NCF_MARKER_PREFIX": "triggers/"}
ROLE = "arn:aws:iam::123456789012:role/ncf"


@pytest.fixture
def aws(monkeypatch):
    for k, v in {"AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        yield


@pytest.fixture
def s3(aws):
    c = boto3.client("s3", **FAKE)
    c.create_bucket(Bucket=BUCKET)
    return c


@pytest.fixture
def codebuild(aws):
    # moto rejects NO_SOURCE projects; the stack's project reads an S3 source bundle anyway.
    c = boto3.client("codebuild", **FAKE)
    c.create_project(name=PROJECT, source={"type": "S3", "location": f"{BUCKET}/ncf/source.zip"}, artifacts={"type": "NO_ARTIFACTS"},
                     environment={"type": "LINUX_CONTAINER", "image": "aws/codebuild/standard:7.0", "computeType": "BUILD_GENERAL1_MEDIUM"},
                     serviceRole="arn:aws:iam::123456789012:role/ncf-codebuild")
    return c


def builds(codebuild) -> int:
    return len(codebuild.list_builds_for_project(projectName=PROJECT)["ids"])


def template_event_pattern(bucket: str) -> dict:
    "The EventBridge rule's pattern from pipelines/template.yaml, with its Refs resolved."
    from cfnlint.decode import decode_str
    t, errors = decode_str((ROOT / "pipelines" / "template.yaml").read_text())
    assert not errors
    refs = {"DataBucket": bucket, **{k: p.get("Default") for k, p in t["Parameters"].items()}}
    def resolve(x):
        if isinstance(x, dict): return refs[x["Ref"]] if set(x) == {"Ref"} else {k: resolve(v) for k, v in x.items()}
        if isinstance(x, list): return [resolve(v) for v in x]
        return x
    return resolve(t["Resources"]["NewDataRule"]["Properties"]["EventPattern"])


# ------------------------------------------------------------------ module boundaries

def test_import_is_standard_library_and_boto3_only():
    code = ("import sys, ncf.pipeline.lambdas; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'pandas', 'numpy', 'sagemaker', 'pyarrow', 'moto'}); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_handlers_run_from_a_one_file_zip(tmp_path):
    "The Lambda deployment package is ncf/pipeline/lambdas.py alone (pipelines/template.yaml: Handler lambdas.*)."
    z = tmp_path / "lambdas.zip"
    with zipfile.ZipFile(z, "w") as f: f.write(ROOT / "ncf" / "pipeline" / "lambdas.py", "lambdas.py")
    code = f"import sys; sys.path.insert(0, {str(z)!r}); import lambdas; print(callable(lambdas.trigger_handler) and callable(lambdas.deploy_handler))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert out.strip() == "True"


def test_data_files_agree_with_the_reader(tmp_path):
    "What the trigger counts as a partition's data is exactly what ncf.data.readers reads from it; only markers start a run."
    from ncf.data.readers import _data_files
    names = ["part-0.parquet", "part-1.csv", "a.tsv", "_SUCCESS", ".part-2.csv", "_tmp.parquet", "notes.txt", "x.json", "data.csv.gz", "manifest.json"]
    part = tmp_path / "dt=2026-02-01"; part.mkdir()
    for n in names: (part / n).write_text("x")
    read = {p.name for p in _data_files(part)}
    assert {n for n in names if lambdas.is_data_file(n)} == read == {"part-0.parquet", "part-1.csv", "a.tsv"}
    assert {n for n in names if data_object(BUCKET, f"raw/dt=2026-02-01/{n}", "v", "raw/")} == {"_SUCCESS", "manifest.json"}


def put_partition(s3, day: str, files=("part-0.parquet", "part-1.parquet"), marker: str | None = "_SUCCESS", body=b"x"):
    "A partition as a producer writes it: its data files, then its completion marker."
    for name in files: s3.put_object(Bucket=BUCKET, Key=f"raw/dt={day}/{name}", Body=body)
    listing = json.dumps({"files": list(files)}).encode() if marker == "manifest.json" else b""   # a manifest lists its files
    if marker: s3.put_object(Bucket=BUCKET, Key=f"raw/dt={day}/{marker}", Body=listing)


# ------------------------------------------------------------------ trigger

def test_eventbridge_rule_routes_and_one_partition_starts_one_build(s3, codebuild):
    "S3 (EventBridge notifications on) -> the template's rule -> SQS (a target moto delivers to) -> handler: N part files, one build."
    events, sqs = boto3.client("events", **FAKE), boto3.client("sqs", **FAKE)
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={"EventBridgeConfiguration": {}})
    q = sqs.create_queue(QueueName="rule-target")["QueueUrl"]
    q_arn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="ncf-new-data", EventPattern=json.dumps(template_event_pattern(BUCKET)))
    events.put_targets(Rule="ncf-new-data", Targets=[{"Id": "trigger", "Arn": q_arn}])
    put_partition(s3, "2026-02-01", files=("part-0.parquet", "part-1.parquet", "part-2.parquet"))
    for key in ("ncf/runs/x/model.tar.gz", "triggers/abc.json", "raw/items.parquet"): s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    delivered = []
    while msgs := sqs.receive_message(QueueUrl=q, MaxNumberOfMessages=10).get("Messages", []):
        delivered += [json.loads(m["Body"]) for m in msgs]
        for m in msgs: sqs.delete_message(QueueUrl=q, ReceiptHandle=m["ReceiptHandle"])
    keys = sorted(e["detail"]["object"]["key"] for e in delivered)
    assert keys == ["raw/dt=2026-02-01/_SUCCESS", "raw/dt=2026-02-01/part-0.parquet", "raw/dt=2026-02-01/part-1.parquet",
                    "raw/dt=2026-02-01/part-2.parquet", "raw/items.parquet"]   # the rule filters on the prefix only
    out = [r for e in delivered for r in trigger_handler(e, s3=s3, codebuild=codebuild, env=ENV)["results"]]
    assert sorted(r["action"] for r in out) == ["ignored"] * 4 + ["started"]
    started = next(r for r in out if r["action"] == "started")
    assert (started["data_uri"], started["run_date"]) == (f"s3://{BUCKET}/raw", "2026-02-01")
    again = trigger_handler(next(e for e in delivered if e["detail"]["object"]["key"].endswith("_SUCCESS")), s3=s3, codebuild=codebuild, env=ENV)
    assert [r["action"] for r in again["results"]] == ["duplicate"]
    assert builds(codebuild) == 1
    markers = [o for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="triggers/")["Contents"] if o["Key"] != "triggers/abc.json"]
    claimed = json.loads(s3.get_object(Bucket=BUCKET, Key=markers[0]["Key"])["Body"].read())
    assert len(markers) == 1 and (claimed["run_date"], claimed["files"], claimed["data_version"]) == ("2026-02-01", 3, started["data_version"])


def test_direct_s3_notification(s3, codebuild):
    "The direct S3 -> SQS notification shape (keys URL-encoded, no sequencer from moto: the ETag is the version)."
    sqs = boto3.client("sqs", **FAKE)
    q = sqs.create_queue(QueueName="direct")["QueueUrl"]
    q_arn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": q_arn, "Events": ["s3:ObjectCreated:*"]}]})
    put_partition(s3, "2026-02-02", files=("part 0.csv",), marker="manifest.json")
    bodies = [json.loads(m["Body"]) for m in sqs.receive_message(QueueUrl=q, MaxNumberOfMessages=10)["Messages"]]
    events = [b for b in bodies if "Records" in b]
    assert sorted(object_events(e)[0]["key"] for e in events) == ["raw/dt=2026-02-02/manifest.json", "raw/dt=2026-02-02/part 0.csv"]
    out = [trigger_handler(e, s3=s3, codebuild=codebuild, env=ENV)["results"][0] for e in events]
    started = [r for r in out if r["action"] == "started"]
    assert len(started) == 1 and started[0]["run_date"] == "2026-02-02" and started[0]["version"]
    assert trigger_handler({"Service": "Amazon S3", "Event": "s3:TestEvent"}, s3=s3, codebuild=codebuild, env=ENV) == {"results": []}


def eb_event(key: str, seq: str = "01") -> dict:
    return {"source": "aws.s3", "detail-type": "Object Created", "detail": {"bucket": {"name": BUCKET}, "object": {"key": key, "sequencer": seq}}}


def test_one_retrain_per_partition_content(s3, codebuild):
    "Both markers, a rewritten marker and a repeated event are one retrain; new content in the partition is a new one."
    put_partition(s3, "2026-02-01")
    act = lambda key, seq="01": trigger_handler(eb_event(key, seq), s3=s3, codebuild=codebuild, env=ENV)["results"][0]["action"]
    day = "raw/dt=2026-02-01/"
    s3.put_object(Bucket=BUCKET, Key=day + "manifest.json", Body=json.dumps({"files": ["part-0.parquet", "part-1.parquet"]}).encode())
    assert [act(day + "_SUCCESS"), act(day + "_SUCCESS"), act(day + "manifest.json"), act(day + "_SUCCESS", "02")] == \
           ["started", "duplicate", "duplicate", "duplicate"]
    put_partition(s3, "2026-02-01", files=("part-1.parquet",), body=b"a corrected day")
    assert act(day + "_SUCCESS", "03") == "started" and builds(codebuild) == 2


def test_a_partition_without_data_starts_nothing(s3, codebuild):
    put_partition(s3, "2026-02-05", files=())
    out = trigger_handler(eb_event("raw/dt=2026-02-05/_SUCCESS"), s3=s3, codebuild=codebuild, env=ENV)["results"][0]
    assert out["action"] == "empty" and out["reason"] == f"s3://{BUCKET}/raw/dt=2026-02-05/ has no data files"
    assert builds(codebuild) == 0 and "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="triggers/")


def test_partition_listing_pages(s3):
    "A partition of more files than one listing page returns (1000) is listed whole."
    for i in range(1003): s3.put_object(Bucket=BUCKET, Key=f"raw/dt=2026-02-06/part-{i:04d}.parquet", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key="raw/dt=2026-02-06/nested/part-x.parquet", Body=b"x")   # not a file of this partition
    files = lambdas.partition_files(s3, BUCKET, "raw/dt=2026-02-06/")
    assert len(files) == 1003 and files[0]["name"] == "part-0000.parquet" and files[0]["size"] == 1


def test_claim_is_a_conditional_put(s3):
    # moto 5.2 implements put_object(IfNoneMatch="*") with HTTP 412 for an existing key.
    key = claim_key("triggers/", BUCKET, "raw/dt=2026-02-01/", "v1")
    assert claim(s3, BUCKET, key, {"a": 1}) is True
    assert claim(s3, BUCKET, key, {"a": 2}) is False
    assert json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()) == {"a": 1}


def test_codebuild_gets_the_run_as_environment_overrides(s3):
    # Stubber: moto's start_build ignores environmentVariablesOverride and idempotencyToken.
    cb = boto3.client("codebuild", **FAKE)
    put_partition(s3, "2026-02-03")
    event = {"source": "aws.s3", "detail-type": "Object Created",
             "detail": {"bucket": {"name": BUCKET}, "object": {"key": "raw/dt=2026-02-03/_SUCCESS", "version-id": "v7", "sequencer": "0F"}}}
    version = lambdas.partition_version(lambdas.partition_files(s3, BUCKET, "raw/dt=2026-02-03/"))
    marker = claim_key("triggers/", BUCKET, "raw/dt=2026-02-03/", version)
    expected = {"projectName": PROJECT, "idempotencyToken": marker.rsplit("/", 1)[-1][:64], "environmentVariablesOverride": [
        {"name": "NCF_DATA_URI", "value": f"s3://{BUCKET}/raw", "type": "PLAINTEXT"},
        {"name": "NCF_RUN_DATE", "value": "2026-02-03", "type": "PLAINTEXT"},
        {"name": "NCF_DATA_VERSION", "value": f"2026-02-03:{version}", "type": "PLAINTEXT"},
        {"name": "NCF_PREPROCESSED", "value": "", "type": "PLAINTEXT"},   # raw logs: the pipeline with preprocessing
        {"name": "NCF_TRIGGER_OBJECT", "value": f"s3://{BUCKET}/raw/dt=2026-02-03/_SUCCESS", "type": "PLAINTEXT"}]}
    with Stubber(cb) as stub:
        stub.add_response("start_build", {"build": {"id": f"{PROJECT}:1"}}, expected)
        out = trigger_handler(event, s3=s3, codebuild=cb, env=ENV)["results"][0]
        stub.assert_no_pending_responses()
    assert (out["action"], out["build_id"], out["version"], out["data_version"]) == ("started", f"{PROJECT}:1", "v7", version)


def test_a_failed_start_releases_the_claim_so_the_retry_runs(s3, codebuild):
    # Stubber for the failure: moto's CodeBuild has no way to make start_build fail.
    put_partition(s3, "2026-02-04")
    event = eb_event("raw/dt=2026-02-04/_SUCCESS", "0A")
    failing = boto3.client("codebuild", **FAKE)
    with Stubber(failing) as stub:
        stub.add_client_error("start_build", "AccountLimitExceededException", "too many concurrent builds")
        with pytest.raises(ClientError, match="too many concurrent builds"):
            trigger_handler(event, s3=s3, codebuild=failing, env=ENV)
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="triggers/")
    assert trigger_handler(event, s3=s3, codebuild=codebuild, env=ENV)["results"][0]["action"] == "started"


def test_trigger_needs_its_project():
    with pytest.raises(RuntimeError, match="NCF_CODEBUILD_PROJECT"):
        trigger_handler({"Records": []}, env={})


# ------------------------------------------------------------------ deploy

@pytest.fixture
def sm(aws):
    c = boto3.client("sagemaker", **FAKE)
    for name in ("ncf-v1", "ncf-v2"):
        c.create_model(ModelName=name, PrimaryContainer={"Image": "img", "ModelDataUrl": f"s3://{BUCKET}/{name}.tar.gz"}, ExecutionRoleArn=ROLE)
    return c


def test_deploy_creates_then_is_idempotent(sm):
    event = {"endpoint_name": "ncf", "model_name": "ncf-v1", "instance_type": "ml.m5.large", "instance_count": "1"}
    first = deploy_handler(event, sagemaker=sm)
    assert first["action"] == "created"
    ep = sm.describe_endpoint(EndpointName="ncf")
    assert ep["EndpointConfigName"] == first["endpoint_config_name"] == endpoint_config_name("ncf", "ncf-v1", "ml.m5.large", 1)
    assert deploy_handler(event, sagemaker=sm)["action"] == "unchanged"
    assert len(sm.list_endpoint_configs()["EndpointConfigs"]) == 1
    assert wait_in_service(sm, "ncf", first["endpoint_config_name"], timeout_s=1)["EndpointStatus"] == "InService"


def test_deploy_handler_validates_its_event():
    with pytest.raises(ValueError, match=r"lacks \['model_name'\]"):
        deploy_handler({"endpoint_name": "ncf"}, sagemaker=object())


def test_describe_endpoint_not_found_is_none_other_errors_raise(sm):
    assert lambdas.describe_endpoint(sm, "nope") is None  # moto: ValidationException "Could not find endpoint"
    # Stubber: moto cannot deny access.
    denied = boto3.client("sagemaker", **FAKE)
    with Stubber(denied) as stub:
        stub.add_client_error("describe_endpoint", "AccessDeniedException", "not authorized")
        with pytest.raises(ClientError, match="not authorized"):
            lambdas.describe_endpoint(denied, "ncf")


ENDPOINT = {"EndpointName": "ncf", "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/ncf",
            "CreationTime": "2026-01-01T00:00:00Z", "LastModifiedTime": "2026-01-01T00:00:00Z"}


def stub_config_exists(stub, name):
    stub.add_response("describe_endpoint_config", {"EndpointConfigName": name, "EndpointConfigArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/{name}",
                                                   "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "ncf-v2"}],
                                                   "CreationTime": "2026-01-01T00:00:00Z"}, {"EndpointConfigName": name})


def test_deploy_updates_an_endpoint_in_service_and_deletes_nothing():
    # Stubber: moto raises NotImplementedError for update_endpoint. A Stubber fails on any call not queued,
    # so this also proves that no delete_endpoint / delete_endpoint_config is made.
    sm = boto3.client("sagemaker", **FAKE)
    new = endpoint_config_name("ncf", "ncf-v2", "ml.m5.large")
    with Stubber(sm) as stub:
        stub.add_client_error("describe_endpoint_config", "ValidationException", f'Could not find endpoint configuration "{new}".')
        stub.add_response("create_endpoint_config", {"EndpointConfigArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/{new}"}, {"EndpointConfigName": new, "ProductionVariants": ANY})
        stub.add_response("describe_endpoint", {**ENDPOINT, "EndpointConfigName": "ncf-old", "EndpointStatus": "InService"}, {"EndpointName": "ncf"})
        stub.add_response("update_endpoint", {"EndpointArn": ENDPOINT["EndpointArn"]},
                          {"EndpointName": "ncf", "EndpointConfigName": new, "RetainAllVariantProperties": True, "DeploymentConfig": ANY})
        r = deploy_handler({"endpoint_name": "ncf", "model_name": "ncf-v2", "instance_type": "ml.m5.large"}, sagemaker=sm)
        stub.assert_no_pending_responses()
    assert (r["action"], r["previous_endpoint_config_name"]) == ("updated", "ncf-old")


@pytest.mark.parametrize("status,current,pending,expect", [
    ("Updating", "ncf-old", "NEW", "in-progress"),     # a duplicate invocation while our update runs
    ("Creating", "NEW", None, "in-progress"),
    ("Updating", "ncf-old", "ncf-other", DeployError),  # someone else's update: retry later
    ("Failed", "ncf-old", None, DeployError),
])
def test_deploy_while_the_endpoint_is_busy(status, current, pending, expect):
    # Stubber: moto's endpoints are InService at once, so these states cannot be reached there.
    sm = boto3.client("sagemaker", **FAKE)
    new = endpoint_config_name("ncf", "ncf-v2", "ml.m5.large")
    ep = {**ENDPOINT, "EndpointStatus": status, "EndpointConfigName": current.replace("NEW", new)}
    if pending: ep["PendingDeploymentSummary"] = {"EndpointConfigName": pending.replace("NEW", new)}
    with Stubber(sm) as stub:
        stub_config_exists(stub, new)
        stub.add_response("describe_endpoint", ep, {"EndpointName": "ncf"})
        if expect is DeployError:
            with pytest.raises(DeployError, match=status): deploy(sm, "ncf", "ncf-v2", "ml.m5.large")
        else:
            assert deploy(sm, "ncf", "ncf-v2", "ml.m5.large")["action"] == expect
        stub.assert_no_pending_responses()


class Script:
    "A SageMaker client whose describe_endpoint plays a script of states (the last one repeats)."
    def __init__(self, *states): self.states = list(states)
    def describe_endpoint(self, EndpointName):
        return {"EndpointName": EndpointName, **(self.states.pop(0) if len(self.states) > 1 else self.states[0])}


def fast_clock():
    t = iter(range(10_000))
    return {"sleep": lambda s: None, "clock": lambda: next(t), "poll_s": 1}


def test_wait_in_service_outcomes():
    ok = Script({"EndpointStatus": "Updating", "EndpointConfigName": "old"}, {"EndpointStatus": "InService", "EndpointConfigName": "new"})
    assert wait_in_service(ok, "ncf", "new", timeout_s=100, **fast_clock())["EndpointConfigName"] == "new"
    with pytest.raises(DeployError, match="failed: bad image"):
        wait_in_service(Script({"EndpointStatus": "Failed", "FailureReason": "bad image"}), "ncf", "new", **fast_clock())
    with pytest.raises(DeployError, match="rolled back to old"):
        wait_in_service(Script({"EndpointStatus": "Updating", "EndpointConfigName": "old"},
                               {"EndpointStatus": "InService", "EndpointConfigName": "old", "FailureReason": "health check"}), "ncf", "new", **fast_clock())
    with pytest.raises(DeployError, match=r"after 30s \(status Updating, config old\)"):
        wait_in_service(Script({"EndpointStatus": "Updating", "EndpointConfigName": "old"}), "ncf", "new", timeout_s=30, **fast_clock())


# ------------------------------------------------------------------ A/B: a challenger beside the champion

def _ab_endpoint(config, status="InService", variants=(("AllTraffic", 1.0, 2),)):
    return {**ENDPOINT, "EndpointConfigName": config, "EndpointStatus": status,
            "ProductionVariants": [{"VariantName": n, "CurrentWeight": w, "CurrentInstanceCount": c} for n, w, c in variants]}


def _ab_config(name, *models):
    names = ("AllTraffic", "Challenger")
    return {"EndpointConfigName": name, "EndpointConfigArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/{name}",
            "CreationTime": "2026-01-01T00:00:00Z", "ProductionVariants": [
                {"VariantName": n, "ModelName": m, "InstanceType": "ml.m5.large", "InitialInstanceCount": 1, "InitialVariantWeight": 1.0}
                for n, m in zip(names, models)]}


def test_a_challenger_deploy_message_starts_a_two_variant_update_and_waits(s3):
    "The callback step's `deploy_as: challenger`: a config with both variants, the guarded update, the record; the step waits for the endpoint."
    sm = boto3.client("sagemaker", **FAKE)
    env = {"NCF_DEPLOYMENTS_URI": f"s3://{BUCKET}/ncf/deployments/", "NCF_ROLLBACK_ALARMS": "ncf-5xx", "NCF_MIN_INSTANCES": "2"}
    both = [lambdas.production_variant("AllTraffic", "ncf-v1", "ml.m5.large", 2, 0.75), lambdas.production_variant("Challenger", "ncf-v2", "ml.m5.large", 2, 0.25)]
    new = lambdas.variants_config_name("ncf", both)
    with Stubber(sm) as stub:
        stub.add_response("describe_endpoint", _ab_endpoint("ncf-old"), {"EndpointName": "ncf"})
        stub.add_response("describe_endpoint_config", _ab_config("ncf-old", "ncf-v1"), {"EndpointConfigName": "ncf-old"})
        stub.add_client_error("describe_endpoint_config", "ValidationException", f'Could not find endpoint configuration "{new}".')
        stub.add_response("create_endpoint_config", {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/x"},
                          {"EndpointConfigName": new, "ProductionVariants": both})
        stub.add_response("update_endpoint", {"EndpointArn": ENDPOINT["EndpointArn"]},
                          {"EndpointName": "ncf", "EndpointConfigName": new, "RetainAllVariantProperties": True,
                           "ExcludeRetainedVariantProperties": [{"VariantPropertyType": "DesiredWeight"}],
                           "DeploymentConfig": lambdas.guardrails(["ncf-5xx"], 2)})
        stub.add_response("describe_endpoint", _ab_endpoint("ncf-old", "Updating"), {"EndpointName": "ncf"})
        msg = {"token": "abcDEF1234", "arguments": {"endpoint_name": "ncf", "model_name": "ncf-v2", "deploy_as": "challenger",
                                                    "challenger_weight": "0.25", "model_package_arn": "arn:p/2"}}
        out = deploy_handler({"Records": [{"body": json.dumps(msg)}]}, sagemaker=sm, s3=s3, env=env)
        stub.assert_no_pending_responses()
    assert out["results"] == [{"endpoint_name": "ncf", "outcome": "waiting", "status": "Updating"}]
    record = lambdas.deployment_record(s3, env, "ncf")
    assert (record["endpoint_config_name"], record["action"], record["token"]) == (new, "challenger started", "abcDEF1234")


def test_a_challenger_without_an_endpoint_fails_the_step_and_changes_nothing(s3):
    sm = boto3.client("sagemaker", **FAKE)
    sent = []
    with Stubber(sm) as stub:
        stub.add_client_error("describe_endpoint", "ValidationException", f'Could not find endpoint "{ENDPOINT["EndpointArn"]}".')
        msg = {"token": "abcDEF1234", "arguments": {"endpoint_name": "ncf", "model_name": "ncf-v2", "deploy_as": "challenger"}}
        class Recording:
            def __getattr__(self, n): return getattr(sm, n)
            def send_pipeline_execution_step_failure(self, **kw): sent.append(kw)
        out = deploy_handler({"Records": [{"body": json.dumps(msg)}]}, sagemaker=Recording(), s3=s3, env={"NCF_DEPLOYMENTS_URI": f"s3://{BUCKET}/d/"})
        stub.assert_no_pending_responses()
    assert out["results"][0]["outcome"] == "not started" and "deploy a champion first" in sent[0]["FailureReason"]


@pytest.mark.parametrize("op", ["promote", "remove_challenger", "set_weights"])
def test_promote_remove_and_weights_need_a_challenger(op):
    sm = boto3.client("sagemaker", **FAKE)
    with Stubber(sm) as stub:
        stub.add_response("describe_endpoint", _ab_endpoint("ncf-old"), {"EndpointName": "ncf"})
        stub.add_response("describe_endpoint_config", _ab_config("ncf-old", "ncf-v1"), {"EndpointConfigName": "ncf-old"})
        args = (0.5,) if op == "set_weights" else ()
        with pytest.raises(lambdas.ABError, match="has no challenger"): getattr(lambdas, op)(sm, "ncf", *args)


def test_an_endpoint_event_without_a_deployment_keeps_autoscaling_matching_the_variants(aws):
    "A command's promote or remove ends with the endpoint InService: the Lambda registers or deregisters the challenger's target."
    aas = boto3.client("application-autoscaling", **FAKE)
    class Endpoint:
        def __init__(self, *names): self.names = names
        def describe_endpoint(self, **kw): return {"EndpointStatus": "InService", "ProductionVariants": [{"VariantName": n} for n in self.names]}
    env = {"NCF_DEPLOYMENTS_URI": f"s3://{BUCKET}/d/", "NCF_MIN_INSTANCES": "2", "NCF_MAX_INSTANCES": "4"}
    s3 = boto3.client("s3", **FAKE); s3.create_bucket(Bucket=BUCKET)
    event = {"source": "aws.sagemaker", "detail-type": "SageMaker Endpoint State Change", "detail": {"EndpointName": "ncf", "EndpointStatus": "IN_SERVICE"}}
    out = deploy_handler(event, sagemaker=Endpoint("AllTraffic", "Challenger"), s3=s3, autoscaling=aas, env=env)
    assert out["results"][0]["autoscaling"] == ["endpoint/ncf/variant/AllTraffic", "endpoint/ncf/variant/Challenger"]
    deploy_handler(event, sagemaker=Endpoint("AllTraffic"), s3=s3, autoscaling=aas, env=env)
    targets = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [("endpoint/ncf/variant/AllTraffic", 2, 4)]
    updating = {**event, "detail": {**event["detail"], "EndpointStatus": "UPDATING"}}
    assert "autoscaling" not in deploy_handler(updating, sagemaker=object(), s3=s3, autoscaling=object(), env=env)["results"][0]
