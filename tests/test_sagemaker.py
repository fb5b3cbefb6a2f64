"""The SageMaker executor: the definition `ncf_pipeline definition` prints offline, upsert/start against moto, the
SageMaker registry and rollback, and the container entry points run locally on small data."""
import io, json, os, subprocess, sys, tarfile
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from conftest import venv_bin
from helpers import SMALL_SHOP, small_dataset
from ncf.core import ConfigError, read_json
from ncf.pipeline.params import PipelineParams
from ncf.pipeline import sagemaker as nsm
from ncf.cli.sagemaker import evaluate_entry, preprocess_entry
from ncf.pipeline.aws import AwsSettings
from ncf.pipeline.sagemaker import check_definition
from ncf.pipeline.sagemaker_registry import SageMakerRegistry, deploy_version

REGION, ACCOUNT = "us-east-1", "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/ncf-sagemaker-pipeline"
BUCKET = "ncf-artifacts"
FAST = {"epochs": 1, "batch_size": 512, "factor_num": 8, "num_layers": 2, "full_ranking": False, "precision": "fp32"}


# ------------------------------------------------------------------ `ncf_pipeline definition`, offline

@pytest.fixture(scope="module")
def cli_definition(tmp_path_factory):
    "`ncf_pipeline definition` in a clean environment: no credentials, no region, no NCF_* settings."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "NCF_"))}
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_EC2_METADATA_DISABLED="true")
    cmd = [venv_bin("ncf_pipeline"), "definition", "--data-uri", "s3://shop-data/raw", "--epochs", "2", "--hr-threshold", "0.3"]
    if not Path(cmd[0]).exists(): cmd[:1] = [sys.executable, "-m", "ncf.cli.pipeline"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path_factory.mktemp("cli"))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout), p.stderr


def steps_by_name(d) -> dict:
    out = {}
    def walk(steps):
        for s in steps:
            out[s["Name"]] = s
            if s["Type"] == "Condition": walk(s["Arguments"]["IfSteps"]); walk(s["Arguments"]["ElseSteps"])
    walk(d["Steps"])
    return out


def test_definition_offline_says_so_and_prints_only_json(cli_definition):
    d, err = cli_definition
    assert "moto" in err and "no AWS credentials" in err
    assert d["Version"] == "2020-12-01" and "INFO" not in err


def test_definition_has_every_step_with_its_dependencies(cli_definition):
    d, _ = cli_definition
    g = check_definition(d)  # same steps, types, branches and dependencies as ncf.pipeline.retrain.PIPELINE
    assert {n: v["type"] for n, v in g.items()} == {
        "Preprocess": "Processing", "Train": "Training", "Evaluate": "Processing", "QualityGate": "Condition",
        "RegisterApproved": "RegisterModel", "CreateModel": "Model", "Deploy": "Callback", "RegisterRejected": "RegisterModel", "Fail": "Fail"}
    assert g["Train"]["after"] >= {"Preprocess"} and g["Evaluate"]["after"] >= {"Train", "Preprocess"}
    assert g["QualityGate"]["after"] == {"Evaluate"}
    assert g["CreateModel"]["after"] >= {"RegisterApproved"} and g["Deploy"]["after"] >= {"CreateModel", "RegisterApproved"}
    assert g["Fail"]["after"] >= {"RegisterRejected"} and g["Fail"]["branch"] is False and g["Deploy"]["branch"] is True


def test_definition_details(cli_definition):
    d, _ = cli_definition
    s = steps_by_name(d)
    params = {p["Name"]: p for p in d["Parameters"]}
    assert {"DataUri", "RunDate", "Days", "DataVersion", "hp_epochs", "hp_lr", "HrThreshold", "Tolerance", "ProductionModelUri"} <= set(params)
    assert not [p for p in params if "InstanceType" in p]   # types are definition-time options: the image follows the type
    assert params["DataUri"]["DefaultValue"] == "s3://shop-data/raw" and params["hp_epochs"] == {"Name": "hp_epochs", "Type": "Integer", "DefaultValue": 2}
    assert params["HrThreshold"]["DefaultValue"] == 0.3

    train = s["Train"]["Arguments"]
    assert train["HyperParameters"]["epochs"] == {"Get": "Parameters.hp_epochs"}
    assert {"Name": "HR", "Regex": "HR=(.*?);"} in train["AlgorithmSpecification"]["MetricDefinitions"]
    assert train["ResourceConfig"]["InstanceType"] == PipelineParams().train_instance_type and "cpu" in train["AlgorithmSpecification"]["TrainingImage"]
    channel = next(c for c in train["InputDataConfig"] if c["ChannelName"] == "train")
    assert channel["DataSource"]["S3DataSource"]["S3Uri"]["Get"].startswith("Steps.Preprocess.ProcessingOutputConfig")

    ev = s["Evaluate"]
    assert ev["PropertyFiles"] == [{"PropertyFileName": "Evaluation", "OutputName": "evaluation", "FilePath": "evaluation.json"}]
    args = ev["Arguments"]["AppSpecification"]["ContainerArguments"]
    for p in ("ProductionModelUri", "HrThreshold", "Tolerance"): assert {"Get": f"Parameters.{p}"} in args
    model_in = next(i for i in ev["Arguments"]["ProcessingInputs"] if i["InputName"] == "model")
    assert model_in["S3Input"]["S3Uri"] == {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}

    cond = s["QualityGate"]["Arguments"]["Conditions"][0]
    assert cond["Type"] == "Equals" and cond["RightValue"] is True
    assert cond["LeftValue"]["Std:JsonGet"] == {"PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.Evaluation"}, "Path": "gate.passed"}

    assert s["RegisterApproved"]["Arguments"]["ModelApprovalStatus"] == "Approved"
    assert s["RegisterRejected"]["Arguments"]["ModelApprovalStatus"] == "Rejected"
    container = s["RegisterApproved"]["Arguments"]["InferenceSpecification"]["Containers"][0]
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert "Outputs['package']" in json.dumps(container["ModelDataUrl"])
    assert s["RegisterApproved"]["Arguments"]["ModelPackageGroupName"] == "ncf"
    assert s["CreateModel"]["Arguments"]["PrimaryContainer"] == {"ModelPackageName": {"Get": "Steps.RegisterApproved.ModelPackageArn"}}
    deploy = s["Deploy"]
    assert deploy["SqsQueueUrl"] == f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/ncf-deploy"   # the callback's queue, read by the deploy Lambda
    assert [o["OutputName"] for o in deploy["OutputParameters"]] == ["action", "endpoint_config_name"]
    assert deploy["Arguments"]["model_name"] == {"Get": "Steps.CreateModel.ModelName"} and deploy["Arguments"]["endpoint_name"] == "ncf"


def test_the_definition_on_a_preprocessed_partition_has_no_preprocessing(aws):
    "EMR's partition is the training data: the pipeline NAME-preprocessed trains on the DataUri parameter itself."
    from ncf.pipeline.retrain import pipeline_steps
    params = PipelineParams(data_uri="s3://shop-data/preprocessed/dt=2026-02-01", preprocessed=True, train_instance_type="ml.g5.xlarge",
                            train_instance_count=2, train_processes_per_instance=4)
    d = json.loads(nsm.definition(params, AwsSettings(bucket=BUCKET, role_arn=ROLE)))
    g = check_definition(d, pipeline_steps(True))
    assert "Preprocess" not in g and g["Train"]["after"] == set()
    s = steps_by_name(d)
    channel = next(c for c in s["Train"]["Arguments"]["InputDataConfig"] if c["ChannelName"] == "train")
    assert channel["DataSource"]["S3DataSource"]["S3Uri"] == {"Get": "Parameters.DataUri"}
    train = s["Train"]["Arguments"]
    assert train["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge" and "gpu" in train["AlgorithmSpecification"]["TrainingImage"]   # the image follows the type
    # torchrun on every instance: the count is a run's parameter, the processes per instance are in the drivers' distributed.json
    assert train["ResourceConfig"]["InstanceCount"] == {"Get": "Parameters.TrainInstanceCount"}
    assert {p["Name"]: p for p in d["Parameters"]}["TrainInstanceCount"] == {"Name": "TrainInstanceCount", "Type": "Integer", "DefaultValue": 2}
    drivers = next(c for c in train["InputDataConfig"] if c["ChannelName"] == "sm_drivers")["DataSource"]["S3DataSource"]["S3Uri"]
    bucket, prefix = drivers.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", region_name=REGION)
    assert json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/distributed.json")["Body"].read()) == {"process_count_per_node": 4, "smp": None}
    assert any(k["Key"].endswith("distributed_drivers/torchrun_driver.py") for k in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"])
    assert s["CreateModel"]["Arguments"]["ExecutionRoleArn"] == f"arn:aws:iam::{ACCOUNT}:role/ncf-sagemaker-model"   # not the pipeline's role
    with pytest.raises(Exception, match="does not match PIPELINE"): check_definition(d)


def test_check_definition_catches_drift(cli_definition):
    d = json.loads(json.dumps(cli_definition[0]))
    cond = steps_by_name(d)["QualityGate"]["Arguments"]
    cond["IfSteps"] = [x for x in cond["IfSteps"] if x["Name"] != "Deploy"]
    with pytest.raises(Exception, match="does not match PIPELINE"): check_definition(d)


# ------------------------------------------------------------------ upsert / start under moto

@pytest.fixture(scope="module")
def aws():
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("NCF_")]: mp.delenv(k)
        for k, v in {"AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(k, v)
        with mock_aws():
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield


SETTINGS = AwsSettings(bucket=BUCKET, role_arn=ROLE)


def test_upsert_creates_then_keeps_then_updates(aws, capsys):
    sm = boto3.client("sagemaker")
    params = PipelineParams(data_uri="s3://shop-data/raw", hyperparameters={"epochs": 2})
    arn = nsm.upsert(params, settings=SETTINGS)
    assert arn.endswith(":pipeline/ncf-retrain") and "created" in capsys.readouterr().err
    first = sm.describe_pipeline(PipelineName="ncf-retrain")
    assert nsm.code_version() in first["PipelineDescription"] and first["RoleArn"] == ROLE
    check_definition(first["PipelineDefinition"])

    # Same code and parameters: the masked definitions of the two builds are equal, so the pipeline (and its step cache)
    # is left alone although the SDK's timestamped training-code URI differs.
    nsm.upsert(params, settings=SETTINGS)
    assert "unchanged" in capsys.readouterr().err

    nsm.upsert(PipelineParams(data_uri="s3://shop-data/raw", hyperparameters={"epochs": 5}), settings=SETTINGS)
    assert "updated" in capsys.readouterr().err
    defaults = {p["Name"]: p.get("DefaultValue") for p in json.loads(sm.describe_pipeline(PipelineName="ncf-retrain")["PipelineDefinition"])["Parameters"]}
    assert defaults["hp_epochs"] == 5


def test_upsert_needs_a_role(aws):
    with pytest.raises(ConfigError, match="execution role"):
        nsm.upsert(PipelineParams(data_uri="s3://shop-data/raw"), settings=AwsSettings(bucket=BUCKET))


def test_start_passes_the_run_and_the_production_model(aws):
    sm = boto3.client("sagemaker")
    params = PipelineParams(data_uri="s3://shop-data/raw", run_date="2026-02-01", hyperparameters={"epochs": 5}, tolerance=0.05)
    arn = nsm.start(params, settings=SETTINGS, data_version="2026-02-01:v1")
    assert ":pipeline/ncf-retrain/execution/" in arn
    got = {p["Name"]: p["Value"] for p in sm.list_pipeline_parameters_for_execution(PipelineExecutionArn=arn)["PipelineParameters"]}
    assert (got["DataUri"], got["RunDate"], got["hp_epochs"], got["Tolerance"], got["DataVersion"], got["ProductionModelUri"]) == \
           ("s3://shop-data/raw", "2026-02-01", "5", "0.05", "2026-02-01:v1", "")
    assert "2026-02-01:v1" in sm.describe_pipeline_execution(PipelineExecutionArn=arn)["PipelineExecutionDescription"]

    # Once an endpoint serves a registered version, the run compares against that version's archive.
    put_version(sm, "ncf", "Approved", "m-prod")
    reg = SageMakerRegistry("ncf", SETTINGS)
    reg.set_production("ncf", 1)
    arn = nsm.start(params, settings=SETTINGS, data_version="2026-02-01:v2")
    got = {p["Name"]: p["Value"] for p in sm.list_pipeline_parameters_for_execution(PipelineExecutionArn=arn)["PipelineParameters"]}
    assert got["ProductionModelUri"] == f"s3://{BUCKET}/ncf/registry/ncf/m-prod/model.tar.gz"


def test_start_refuses_a_local_data_path(aws):
    with pytest.raises(ConfigError, match="must be an s3:// URI"):
        nsm.start(PipelineParams(data_uri="/tmp/raw"), settings=SETTINGS)


def put_raw(bucket: str, key: str, body: bytes = b"x"):
    s3 = boto3.client("s3")
    try: s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou: pass
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def test_a_start_without_a_data_version_gets_one_from_the_data(aws):
    "The GitLab retrain job and a start by hand pass no data version: the listing's hash is one, so new logs never hit an old cache."
    sm = boto3.client("sagemaker")
    put_raw("listing-data", "raw/dt=2026-02-01/part-0.parquet")
    params = PipelineParams(data_uri="s3://listing-data/raw")
    version = lambda arn: {p["Name"]: p["Value"] for p in sm.list_pipeline_parameters_for_execution(PipelineExecutionArn=arn)["PipelineParameters"]}["DataVersion"]
    first, same = version(nsm.start(params, settings=SETTINGS)), version(nsm.start(params, settings=SETTINGS))
    put_raw("listing-data", "raw/dt=2026-02-02/part-0.parquet")
    assert first.startswith("listing:") and same == first and version(nsm.start(params, settings=SETTINGS)) != first
    with pytest.raises(ConfigError, match="holds no data files"):
        nsm.start(PipelineParams(data_uri="s3://listing-data/elsewhere"), settings=SETTINGS)


def test_start_request_token_is_idempotent_per_data_version(aws):
    # moto ignores ClientRequestToken, so the requests are recorded and compared instead.
    sm, sent = boto3.client("sagemaker"), []
    sm.meta.events.register("provide-client-params.sagemaker.StartPipelineExecution", lambda params, **kw: sent.append(dict(params)))
    put_raw("token-data", "raw/dt=2026-02-01/part-0.parquet")
    params = PipelineParams(data_uri="s3://token-data/raw", run_date="2026-02-01")
    arns = [nsm.start(params, settings=SETTINGS, data_version=version, sagemaker=sm) for version in ("2026-02-01:a", "2026-02-01:a", "2026-02-01:b", None, None)]
    tokens = [p["ClientRequestToken"] for p in sent]
    assert arns[0] == arns[1] and len(sent) == 4   # the same run again (moto's executions succeed at once): nothing new is started
    assert len(set(tokens)) == 4 and len(set(arns)) == 4
    assert all(32 <= len(t) <= 128 for t in tokens)


# ------------------------------------------------------------------ registry

def put_version(sm, group, status, model_version, hr="0.61"):
    "A model package as the pipeline registers it: metadata, the evaluation as model quality, the serving archive."
    try: sm.create_model_package_group(ModelPackageGroupName=group)
    except sm.exceptions.ClientError: pass
    uri = f"s3://{BUCKET}/ncf/registry/{group}/{model_version}"
    r = sm.create_model_package(
        ModelPackageGroupName=group, ModelApprovalStatus=status,
        InferenceSpecification={"Containers": [{"Image": "pytorch-inference", "ModelDataUrl": f"{uri}/model.tar.gz"}],
                                "SupportedContentTypes": ["application/json"], "SupportedResponseMIMETypes": ["application/json"]},
        ModelMetrics={"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": f"{uri}/evaluation.json"}}},
        CustomerMetadataProperties={"model_version": model_version, "data_version": f"data-{model_version}", "code_version": "0.1.0+abc",
                                    "hr": hr, "ndcg": "0.4", "k": "10", "reason": "gate passed"})
    return r["ModelPackageArn"]


class UpdatableSageMaker:
    """moto's SageMaker client plus `update_endpoint`, which moto does not implement (NotImplementedError). It applies
    the end state of SageMaker's blue/green update (the endpoint on the new config); the request itself is checked
    with botocore's Stubber in tests/test_lambdas.py."""
    def __init__(self, client): self._c, self.updates = client, []
    def __getattr__(self, name): return getattr(self._c, name)
    def update_endpoint(self, EndpointName, EndpointConfigName, RetainAllVariantProperties=False, DeploymentConfig=None):
        self.updates.append(EndpointConfigName)
        self._c.delete_endpoint(EndpointName=EndpointName)
        return self._c.create_endpoint(EndpointName=EndpointName, EndpointConfigName=EndpointConfigName)


def test_registry_versions_status_and_lookups(aws):
    sm = boto3.client("sagemaker")
    group = "reg-lookups"
    reg = SageMakerRegistry("ep-lookups", SETTINGS)
    assert reg.versions(group) == [] and reg.latest_approved(group) is None and reg.production(group) is None
    put_version(sm, group, "Approved", "m1", hr="0.55"); put_version(sm, group, "Rejected", "m2"); put_version(sm, group, "PendingManualApproval", "m3")
    vs = reg.versions(group)
    assert [(v.version, v.status, v.model_version) for v in vs] == [(1, "Approved", "m1"), (2, "Rejected", "m2"), (3, "PendingManualApproval", "m3")]
    v1 = vs[0]
    assert (v1.data_version, v1.code_version, v1.metrics["test"]["hr"], v1.reason) == ("data-m1", "0.1.0+abc", 0.55, "gate passed")
    assert v1.model_uri.endswith("/m1/model.tar.gz") and v1.metrics["evaluation_uri"].endswith("/m1/evaluation.json")
    assert "HR@10 0.5500" in v1.summary()
    assert reg.find(group, "m2").version == 2 and reg.find(group, "nope") is None
    assert reg.latest_approved(group).version == 1
    assert reg.set_status(group, 3, "Approved", "approved by hand").status == "Approved"
    assert reg.latest_approved(group).version == 3 and reg.get(group, 3).reason == "approved by hand"
    from ncf.core import RegistryError
    with pytest.raises(RegistryError, match="no version 9"): reg.get(group, 9)
    with pytest.raises(RegistryError, match="does not exist"): reg.get("no-such-group", 1)
    with pytest.raises(RegistryError, match="status must be one of"): reg.set_status(group, 1, "Maybe")


def test_promote_and_roll_back_with_one_command(aws):
    sm = UpdatableSageMaker(boto3.client("sagemaker"))
    group, endpoint = "reg-rollback", "ep-rollback"
    for status, mv in (("Approved", "r1"), ("Approved", "r2"), ("Rejected", "r3")): put_version(sm, group, status, mv)
    reg = SageMakerRegistry(endpoint, SETTINGS, sagemaker=sm)
    params = PipelineParams(model_group=group, endpoint_name=endpoint)

    assert "serves" in deploy_version(params, 2, registry=reg)
    assert reg.production(group).version == 2
    ep = sm.describe_endpoint(EndpointName=endpoint)
    model = sm.describe_model(ModelName=sm.describe_endpoint_config(EndpointConfigName=ep["EndpointConfigName"])["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["ModelPackageName"].endswith(f"model-package/{group}/2")

    # Rollback, by a registry without a configured role: the new model reuses the serving model's role.
    reg2 = SageMakerRegistry(endpoint, AwsSettings(bucket=BUCKET), sagemaker=sm)
    msg = deploy_version(params, 1, registry=reg2)
    assert "(was v2)" in msg and reg2.production(group).version == 1 and len(sm.updates) == 1
    assert "already serves" in deploy_version(params, 1, registry=reg2) and len(sm.updates) == 1
    from ncf.core import RegistryError
    with pytest.raises(RegistryError, match="only an Approved version"): deploy_version(params, 3, registry=reg2)
    assert reg2.production(group).version == 1


def tiny_model_dir(dest: Path) -> Path:
    from ncf.model.modeldir import random_model_dir, METRICS_SCHEMA
    m = {"schema": METRICS_SCHEMA, "k": 10, "best_epoch": 1, "history": [], "validation": {"hr": .5, "ndcg": .3}, "test": {"hr": .6, "ndcg": .4, "k": 10}}
    random_model_dir(dest, 3, 4, num_layers=1, user_ids=["a", "b", "c"], item_ids=["w", "x", "y", "z"], seen=[(0, 1)], metrics=m, data_version="data-v1")
    return dest


def test_register_a_local_model_directory(aws, tmp_path):
    from ncf.model.modeldir import verify_model_dir
    md = tiny_model_dir(tmp_path / "m")
    reg = SageMakerRegistry("ncf", SETTINGS)
    v = reg.register("reg-local", md, "PendingManualApproval", "trained by hand", "0.1.0+local", {"note": "x"})
    assert (v.version, v.status, v.model_version, v.data_version, v.code_version) == \
           (1, "PendingManualApproval", verify_model_dir(md)["model_version"], "data-v1", "0.1.0+local")
    assert v.metrics["test"]["hr"] == 0.6 and v.reason == "trained by hand"
    bucket, key = v.model_uri[5:].split("/", 1)
    with tarfile.open(fileobj=io.BytesIO(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())) as t:
        names = t.getnames()
    assert "code/inference.py" in names and "manifest.json" in names
    container = boto3.client("sagemaker").describe_model_package(ModelPackageName=f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/reg-local/1")
    assert "pytorch-inference" in container["InferenceSpecification"]["Containers"][0]["Image"]
    assert reg.find("reg-local", v.model_version).version == 1


# ------------------------------------------------------------------ the containers' code, run here

@pytest.fixture(scope="module")
def shop_data(tmp_path_factory) -> Path:
    return small_dataset(tmp_path_factory.mktemp("shop"))


def test_preprocess_entry_maps_pipeline_values(tmp_path):
    from ncf.data.synthetic import write_days
    write_days(SMALL_SHOP, tmp_path / "raw", 10)
    assert preprocess_entry(["--data-uri", str(tmp_path / "raw"), "--run-date", "2026-03-01", "--days", "0",
                                 "--data-version", "2026-03-01:v1", "--out", str(tmp_path / "data")]) == 0
    assert (tmp_path / "data" / "dt=2026-03-01" / "manifest.json").exists()


def test_training_entry_script_and_evaluation_entry(shop_data, tmp_path):
    "The staged train.py runs ncf_train the way SageMaker does (SM_* variables, --name value flags); evaluate.py judges it."
    code = nsm.stage_code(tmp_path / "code")
    model_dir = tmp_path / "opt-ml-model"
    env = {**os.environ, "SM_CHANNEL_TRAIN": str(shop_data.parent), "SM_MODEL_DIR": str(model_dir), "PYTHONPATH": ""}
    args = [a for k, v in FAST.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
    p = subprocess.run([sys.executable, "train.py", *args], cwd=code, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "HR=" in p.stdout and "NDCG=" in p.stdout   # what the metric definitions' regexes read
    model_in = tmp_path / "processing-model"; model_in.mkdir()
    with tarfile.open(model_in / "model.tar.gz", "w:gz") as t:   # SageMaker's model.tar.gz: the model directory's files at the root
        for f in model_dir.iterdir(): t.add(f, arcname=f.name)

    out, pkg = tmp_path / "evaluation", tmp_path / "package"
    run = lambda prod: evaluate_entry(["--model", str(model_in), "--data", str(shop_data.parent), "--production-uri", prod,
                                           "--hr-threshold", "0.0", "--tolerance", "0.02", "--out", str(out), "--package-out", str(pkg)])
    assert run("") == 0
    ev = read_json(out / "evaluation.json")
    assert ev["gate"]["passed"] is True and ev["production"] is None and ev["new"]["model_version"]
    with tarfile.open(pkg / "model.tar.gz") as t: assert "code/inference.py" in t.getnames()

    prod = tmp_path / "prod.tar.gz"; (pkg / "model.tar.gz").rename(prod)   # last run's serving archive as production
    assert run(str(prod)) == 0
    ev = read_json(out / "evaluation.json")
    assert ev["production"]["model_version"] == ev["new"]["model_version"] and ev["production"]["hr"] == ev["new"]["hr"]


def test_staged_code_runs_where_ncf_is_not_installed(tmp_path):
    "A SageMaker job runs the staged source, not an installed package: the requirements come from the staged requirements.json."
    from ncf.serve import package
    code = nsm.stage_code(tmp_path / "code")
    site = tmp_path / "site"; site.mkdir()
    (site / "sitecustomize.py").write_text("import importlib.metadata as m\n_requires = m.requires\n"
                                           "def requires(name):\n    if name == 'ncf': raise m.PackageNotFoundError(name)\n    return _requires(name)\n"
                                           "m.requires = requires\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{code}"}
    script = ("import json, ncf, ncf.cli.sagemaker, ncf.serve.package as p, ncf.pipeline.sagemaker as s\n"
              "print(json.dumps([ncf.__file__, list(p.REQUIREMENTS), list(s.CONTAINER_REQUIREMENTS)]))")
    run = lambda: subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    p = run()
    assert p.returncode == 0, p.stderr[-2000:]
    where, serving, containers = json.loads(p.stdout.strip().splitlines()[-1])
    assert where.startswith(str(code)) and serving == list(package.REQUIREMENTS) and containers == list(nsm.CONTAINER_REQUIREMENTS)
    (code / "ncf" / "requirements.json").unlink()
    p = run()
    assert p.returncode != 0 and "requirements.json is missing" in p.stderr


def test_every_artifact_is_under_the_artifact_prefix(cli_definition, aws):
    "The template lets CodeBuild and the pipeline write under the artifact prefix only: every S3 location is there (issue 14, defect 1)."
    import re
    from cfnlint.decode import decode_str
    t, _ = decode_str((Path(__file__).resolve().parents[1] / "pipelines" / "template.yaml").read_text())
    prefix = t["Parameters"]["ArtifactPrefix"]["Default"]
    assert prefix == AwsSettings().prefix
    definition, _ = cli_definition
    uris = set(re.findall(r"s3://[^\"\\ ]+", json.dumps(definition))) - {"s3://shop-data/raw"}   # the data, which the pipeline only reads
    outside = sorted(u for u in uris if not re.match(rf"s3://[^/]+/{prefix}/", u))
    assert uris and not outside, outside
    # And what building the definition uploads, under moto, with the artifact bucket of the stack.
    s3 = boto3.client("s3")
    nsm.upsert(PipelineParams(data_uri="s3://shop-data/raw", hyperparameters={"epochs": 1}), settings=SETTINGS)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])]
    assert keys and all(k.startswith(f"{prefix}/") for k in keys), sorted(k for k in keys if not k.startswith(f"{prefix}/"))[:5]


def test_the_training_step_trains_on_two_processes_of_one_emulated_instance(aws, shop_data, tmp_path):
    "The Train step of the definition, resolved and run as SageMaker runs it (its drivers, torchrun): 2 ranks, one log, one model."
    from ncf.emulate.definition import Context, bind_parameters, resolve, as_request
    from ncf.emulate.jobs import run_training_job
    s3 = boto3.client("s3")
    for f in (p for p in shop_data.rglob("*") if p.is_file()): s3.upload_file(str(f), BUCKET, f"data/{f.relative_to(shop_data)}")
    params = PipelineParams(data_uri=f"s3://{BUCKET}/data/", preprocessed=True, train_processes_per_instance=2, hyperparameters=FAST)
    d = json.loads(nsm.definition(params, SETTINGS))
    ctx = Context(parameters=bind_parameters(d), execution={})
    request = as_request("Training", resolve(steps_by_name(d)["Train"]["Arguments"], ctx))
    job = run_training_job("ncf-train-two-ranks", request, s3=s3, workdir=tmp_path / "job")
    log = Path(job["Log"]).read_text()
    assert job["TrainingJobStatus"] == "Completed", (job.get("FailureReason"), log[-3000:])
    assert "--nproc_per_node=2" in log and "rank 0 of 2 training processes" in log
    assert len([l for l in log.splitlines() if "epoch 1/1: HR=" in l]) == 1   # rank 0 alone logs the metric lines
    bucket, key = job["ModelArtifacts"]["S3ModelArtifacts"].removeprefix("s3://").split("/", 1)
    names = tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())).getnames()
    assert "model.safetensors" in {Path(n).name for n in names}
