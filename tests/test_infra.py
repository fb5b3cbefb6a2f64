"""pipelines/template.yaml and pipelines/buildspec.yml: valid CloudFormation, the wiring between the stack and the code,
least-privilege roles (checked against the calls the code really makes, recorded under moto), and the build commands."""
import os, shutil, subprocess
from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws

from conftest import venv_bin
from ncf.pipeline import lambdas

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE, BUILDSPEC = ROOT / "pipelines" / "template.yaml", ROOT / "pipelines" / "buildspec.yml"
FAKE = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def template() -> dict:
    from cfnlint.decode import decode_str
    t, errors = decode_str(TEMPLATE.read_text())
    assert not errors, errors
    return t


def resources(t, type_) -> dict:
    return {n: r for n, r in t["Resources"].items() if r["Type"] == type_}


def statements(role) -> list[dict]:
    return [s for p in role["Properties"]["Policies"] for s in p["PolicyDocument"]["Statement"]]


def allowed(role) -> set[str]:
    return {a for s in statements(role) if s["Effect"] == "Allow" for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}


def test_cfn_lint_passes():
    exe = venv_bin("cfn-lint") if Path(venv_bin("cfn-lint")).exists() else shutil.which("cfn-lint")
    p = subprocess.run([exe, "--non-zero-exit-code", "error", str(TEMPLATE)], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_stack_has_every_piece(template):
    types = {r["Type"] for r in template["Resources"].values()}
    assert {"AWS::S3::Bucket", "AWS::Events::Rule", "AWS::Lambda::Function", "AWS::Lambda::Permission", "AWS::CodeBuild::Project",
            "AWS::SageMaker::ModelPackageGroup", "AWS::IAM::Role"} <= types
    bucket = template["Resources"]["DataBucket"]["Properties"]
    assert bucket["NotificationConfiguration"]["EventBridgeConfiguration"]["EventBridgeEnabled"] is True
    rule = template["Resources"]["NewDataRule"]["Properties"]
    assert rule["EventPattern"]["source"] == ["aws.s3"] and rule["EventPattern"]["detail-type"] == ["Object Created"]
    assert rule["EventPattern"]["detail"]["object"]["key"] == [{"prefix": {"Ref": "RawPrefix"}}, {"prefix": {"Ref": "PreprocessedPrefix"}}]
    assert rule["Targets"][0]["Arn"] == {"Fn::GetAtt": ["TriggerFunction", "Arn"]}
    # Every way an event reaches the trigger ends in the dead-letter queue when it cannot be handled, and the queue alarms.
    dlq = {"Fn::GetAtt": ["TriggerDeadLetterQueue", "Arn"]}
    ended = template["Resources"]["PipelineEndedRule"]["Properties"]
    assert ended["EventPattern"]["source"] == ["aws.sagemaker"] and ended["Targets"][0]["Arn"] == rule["Targets"][0]["Arn"]
    schedule = template["Resources"]["RawDayRetrain"]["Properties"]["Target"]
    assert schedule["Arn"] == rule["Targets"][0]["Arn"] and '"ncf": "' + lambdas.SCHEDULE_EVENT + '"' in schedule["Input"]
    assert all(x["DeadLetterConfig"]["Arn"] == dlq for x in (rule["Targets"][0], ended["Targets"][0], schedule))
    assert template["Resources"]["TriggerFailureDestination"]["Properties"]["DestinationConfig"]["OnFailure"]["Destination"] == dlq
    alarm = template["Resources"]["DeadLetterAlarm"]["Properties"]
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["TriggerDeadLetterQueue", "QueueName"]}}]
    assert alarm["AlarmActions"] == [{"Ref": "AlertTopic"}] and alarm["Threshold"] == 0
    assert template["Resources"]["RetrainProject"]["Properties"]["ConcurrentBuildLimit"] == 1   # one build checks and starts at a time
    perm = template["Resources"]["TriggerInvokePermission"]["Properties"]
    assert perm["Principal"] == "events.amazonaws.com" and perm["SourceArn"] == {"Fn::GetAtt": ["NewDataRule", "Arn"]}
    params = template["Parameters"]
    assert not params["MarkerPrefix"]["Default"].startswith(params["RawPrefix"]["Default"])  # markers must not trigger runs


def test_lambda_handlers_and_environment_match_the_code(template):
    fns = resources(template, "AWS::Lambda::Function")
    assert {f["Properties"]["Handler"] for f in fns.values()} == {"lambdas.trigger_handler", "lambdas.deploy_handler"}
    for f in fns.values():
        assert callable(getattr(lambdas, f["Properties"]["Handler"].split(".")[1]))
    env = fns["TriggerFunction"]["Properties"]["Environment"]["Variables"]
    assert "NCF_CODEBUILD_PROJECT" in env and set(env) <= {"NCF_CODEBUILD_PROJECT", "NCF_RAW_PREFIX", "NCF_MARKER_PREFIX", "NCF_MARKER_BUCKET",
                                                           "NCF_PREPROCESSED_PREFIX", "NCF_PENDING_PREFIX", "NCF_DATA_BUCKET"}
    source = Path(lambdas.__file__).read_text()
    assert all(f'"{n}"' in source for n in env), [n for n in env if f'"{n}"' not in source]   # each is read by the handler
    # The pipeline's Deploy step calls PREFIX-deploy by default (ncf.pipeline.sagemaker): the same name as the stack's function.
    assert fns["DeployFunction"]["Properties"]["FunctionName"] == {"Fn::Sub": "${Prefix}-deploy"} and template["Parameters"]["Prefix"]["Default"] == "ncf"


def test_codebuild_project_runs_the_buildspec_with_the_settings_the_code_reads(template):
    from ncf.pipeline.aws import AwsSettings
    project = template["Resources"]["RetrainProject"]["Properties"]
    assert project["Source"]["BuildSpec"] == "pipelines/buildspec.yml" and BUILDSPEC.exists()
    names = {v["Name"] for v in project["Environment"]["EnvironmentVariables"]}
    read_by_settings = {"NCF_SAGEMAKER_ROLE_ARN", "NCF_MODEL_ROLE_ARN", "NCF_BUCKET", "NCF_PREFIX", "NCF_PIPELINE_NAME", "NCF_DEPLOY_QUEUE_URL"}
    assert read_by_settings <= names
    s = AwsSettings.from_env({n: "x" for n in read_by_settings})
    assert (s.role_arn, s.model_role_arn, s.bucket, s.prefix, s.pipeline_name, s.deploy_queue_url) == ("x",) * 6
    spec = BUILDSPEC.read_text()
    assert all(f"${n}" in spec for n in names - read_by_settings)  # the rest are used by the build commands


# Resource "*" is allowed only for actions that have no resource-level permissions.
# RegisterScalableTarget and PutScalingPolicy name a scalable target by a generated id, unknown before it exists.
STAR_OK = {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData", "application-autoscaling:RegisterScalableTarget", "application-autoscaling:PutScalingPolicy"}


def test_roles_are_least_privilege(template):
    roles = resources(template, "AWS::IAM::Role")
    assert set(roles) == {"TriggerRole", "DeployRole", "CodeBuildRole", "PipelineRole", "ModelRole", "SchedulerRole"}
    services = {n: r["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"]["Service"] for n, r in roles.items()}
    assert services == {"TriggerRole": "lambda.amazonaws.com", "DeployRole": "lambda.amazonaws.com", "CodeBuildRole": "codebuild.amazonaws.com",
                        "PipelineRole": "sagemaker.amazonaws.com", "ModelRole": "sagemaker.amazonaws.com", "SchedulerRole": "scheduler.amazonaws.com"}
    # The endpoint's model reads its archives and writes only the captured requests: no other write, no SageMaker, no PassRole.
    assert not {a for a in allowed(roles["ModelRole"]) if a.startswith(("s3:Delete", "sagemaker:", "iam:"))}
    writes = [s for s in statements(roles["ModelRole"]) if "s3:PutObject" in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
    assert [s["Resource"]["Fn::Sub"] for s in writes] == ["${DataBucket.Arn}/${ArtifactPrefix}/data-capture/*"]
    for name, role in roles.items():
        assert "ManagedPolicyArns" not in role["Properties"], f"{name} uses a managed policy"
        for s in statements(role):
            actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
            assert s["Effect"] == "Allow"
            assert not any(a == "*" or a.endswith(":*") for a in actions), f"{name}: wildcard action in {s.get('Sid')}"
            res = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
            if "*" in res: assert set(actions) <= STAR_OK, f"{name}: Resource '*' for {actions}"
            if "iam:PassRole" in actions:
                assert s["Condition"]["StringEquals"]["iam:PassedToService"] == "sagemaker.amazonaws.com"
    assert not allowed(roles["DeployRole"]) & {"sagemaker:DeleteEndpoint", "sagemaker:DeleteEndpointConfig"}


def test_the_deploy_role_creates_and_updates_the_endpoint_with_its_configs(template):
    "SageMaker authorises CreateEndpoint and UpdateEndpoint against the endpoint and the endpoint config the call names."
    role = resources(template, "AWS::IAM::Role")["DeployRole"]
    as_list = lambda x: x if isinstance(x, list) else [x]
    for action in ("sagemaker:CreateEndpoint", "sagemaker:UpdateEndpoint"):
        arns = [r["Fn::Sub"] if isinstance(r, dict) else r for s in statements(role) if action in as_list(s["Action"]) for r in as_list(s["Resource"])]
        assert any(a.endswith(":endpoint/${EndpointName}") for a in arns), (action, arns)
        assert any(a.endswith(":endpoint-config/${EndpointName}-*") for a in arns), (action, arns)


def operations(client) -> list[str]:
    "Record `service:Operation` for every call the client makes."
    calls = []
    prefix = client.meta.service_model.signing_name if client.meta.service_model.service_name != "s3" else "s3"
    client.meta.events.register("before-call", lambda model, **kw: calls.append(f"{prefix}:{model.name}"))
    return calls


def test_lambda_roles_allow_exactly_what_the_handlers_call(template, monkeypatch):
    roles = resources(template, "AWS::IAM::Role")
    for k, v in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        s3, cb, sm = (boto3.client(n, **FAKE) for n in ("s3", "codebuild", "sagemaker"))
        s3.create_bucket(Bucket="data")
        cb.create_project(name="ncf-retrain", source={"type": "S3", "location": "data/src.zip"}, artifacts={"type": "NO_ARTIFACTS"},
                          environment={"type": "LINUX_CONTAINER", "image": "aws/codebuild/standard:7.0", "computeType": "BUILD_GENERAL1_SMALL"},
                          serviceRole="arn:aws:iam::123456789012:role/cb")
        sm.create_model(ModelName="m1", PrimaryContainer={"Image": "img"}, ExecutionRoleArn="arn:aws:iam::123456789012:role/x")
        s3_calls, cb_calls, sm_calls = operations(s3), operations(cb), operations(sm)
        s3.put_object(Bucket="data", Key="raw/dt=2026-02-01/a.csv", Body=b"x")
        s3_calls.clear()
        event = {"source": "aws.s3", "detail-type": "Object Created",
                 "detail": {"bucket": {"name": "data"}, "object": {"key": "raw/dt=2026-02-01/_SUCCESS", "sequencer": "01"}}}
        assert lambdas.trigger_handler(event, s3=s3, codebuild=cb, env={"NCF_CODEBUILD_PROJECT": "ncf-retrain"})["results"][0]["action"] == "started"
        lambdas.deploy_handler({"endpoint_name": "ncf", "model_name": "m1"}, sagemaker=sm)
    iam_action = {"s3:ListObjectsV2": "s3:ListBucket"}   # the S3 operations whose IAM action has another name
    trigger_calls = {iam_action.get(c, c) for c in s3_calls + cb_calls}
    assert trigger_calls == {"s3:ListBucket", "s3:PutObject", "codebuild:StartBuild"}
    assert trigger_calls <= allowed(roles["TriggerRole"])
    # The direct deploy path under moto; the callback path (queue, records, callbacks, autoscaling, rejection) runs under the
    # emulation's IAM check in tests/test_emulate.py, which fails on any denial.
    assert set(sm_calls) <= allowed(roles["DeployRole"]) and "sagemaker:UpdateEndpoint" in allowed(roles["DeployRole"])


def run_build(tmp_path, **env) -> list[list[str]]:
    "Run the buildspec's build commands with bash, a stub `ncf_pipeline` recording its arguments."
    spec = yaml.safe_load(BUILDSPEC.read_text())
    assert spec["version"] == 0.2 and spec["env"]["shell"] == "bash"
    install = " ".join(spec["phases"]["install"]["commands"])
    assert ".[aws]" in install and "constraints.txt" in install
    bin_ = tmp_path / "bin"; bin_.mkdir(exist_ok=True)
    log = tmp_path / "calls.txt"
    (bin_ / "ncf_pipeline").write_text(f'#!/bin/bash\nprintf "%s\\x1f" "$@" >> {log}\necho >> {log}\n')
    (bin_ / "ncf_pipeline").chmod(0o755)
    base = {"PATH": f"{bin_}:{os.environ['PATH']}", **{k: str(v) for k, v in spec["env"]["variables"].items()},
            "NCF_MODEL_GROUP": "ncf", "NCF_ENDPOINT_NAME": "ncf", "NCF_ENDPOINT_INSTANCE_TYPE": "ml.m5.large",
            "NCF_HR_THRESHOLD": "0.5", "NCF_TOLERANCE": "0.02", **env}
    for cmd in spec["phases"]["build"]["commands"]:
        p = subprocess.run(["bash", "-c", cmd], env=base, capture_output=True, text=True)
        if p.returncode: return p
    return [line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines() if line] if log.exists() else []


def test_buildspec_upserts_then_starts_with_the_trigger_values(tmp_path):
    calls = run_build(tmp_path, NCF_DATA_URI="s3://data/raw", NCF_RUN_DATE="2026-02-01", NCF_DATA_VERSION="2026-02-01:v1")
    assert [c[0] for c in calls] == ["upsert", "start"]
    for c in calls:
        assert c[c.index("--data-uri") + 1] == "s3://data/raw" and c[c.index("--run-date") + 1] == "2026-02-01"
        assert c[c.index("--endpoint-name") + 1] == "ncf" and c[c.index("--hr-threshold") + 1] == "0.5"
    # The CLI accepts exactly these arguments.
    from ncf.cli.pipeline import parser
    for c in calls: parser().parse_args(c)


def test_buildspec_without_run_date_and_without_data(tmp_path):
    calls = run_build(tmp_path, NCF_DATA_URI="s3://data/raw")
    assert all("--run-date" not in c for c in calls) and len(calls) == 2
    (tmp_path / "again").mkdir()
    failed = run_build(tmp_path / "again")
    assert failed.returncode == 2 and "NCF_DATA_URI is not set" in failed.stdout


REALTIME = ROOT / "pipelines" / "realtime.yaml"


@pytest.fixture(scope="module")
def realtime() -> dict:
    from cfnlint.decode import decode_str
    t, errors = decode_str(REALTIME.read_text())
    assert not errors, errors
    return t


def test_the_realtime_stack_lints_clean():
    exe = venv_bin("cfn-lint") if Path(venv_bin("cfn-lint")).exists() else shutil.which("cfn-lint")
    p = subprocess.run([exe, str(REALTIME)], capture_output=True, text=True, timeout=180)   # warnings count too
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_realtime_stack_wires_the_lambda_the_code_reads(realtime):
    "The handler exists, every variable the Lambda gets is one the service reads, and the API routes are the gateway's."
    import importlib, inspect
    from ncf.serve import gateway
    fn = realtime["Resources"]["RecommendFunction"]["Properties"]
    module, name = fn["Handler"].rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))
    code = inspect.getsource(gateway) + inspect.getsource(importlib.import_module("ncf.serve.experiment"))
    assert all(f'"{v}"' in code for v in fn["Environment"]["Variables"]), fn["Environment"]["Variables"]
    assert fn["VpcConfig"]["SubnetIds"] == {"Ref": "SubnetIds"}   # in the VPC, beside the store
    services = {r["Properties"]["ServiceName"]["Fn::Sub"] for r in resources(realtime, "AWS::EC2::VPCEndpoint").values()}
    assert services == {"com.amazonaws.${AWS::Region}.sagemaker.runtime", "com.amazonaws.${AWS::Region}.kinesis-firehose"}
    routes = {r["Properties"]["RouteKey"]: r["Properties"] for r in resources(realtime, "AWS::ApiGatewayV2::Route").values()}
    assert set(routes) == {"GET /recommendations/{user+}", "POST /recommendations"}
    assert all(r["AuthorizationType"] == "AWS_IAM" for r in routes.values())
    stage = resources(realtime, "AWS::ApiGatewayV2::Stage")["RecommendStage"]["Properties"]["DefaultRouteSettings"]
    assert stage["ThrottlingRateLimit"] == {"Ref": "ThrottleRate"} and realtime["Parameters"]["ThrottleRate"]["Default"] == 1000


def test_the_recommendation_role_is_least_privilege(realtime):
    role = realtime["Resources"]["RecommendRole"]
    assert allowed(role) == {"logs:CreateLogStream", "logs:PutLogEvents", "sagemaker:InvokeEndpoint", "firehose:PutRecordBatch",
                             "ec2:CreateNetworkInterface", "ec2:DescribeNetworkInterfaces", "ec2:DeleteNetworkInterface",
                             "ec2:AssignPrivateIpAddresses", "ec2:UnassignPrivateIpAddresses"}
    invoke = next(s for s in statements(role) if s["Action"] == "sagemaker:InvokeEndpoint")
    assert invoke["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:endpoint/${EndpointName}"}
