"""The template's own policies decide what each actor of the emulated chain may do (`ncf.emulate`): a permission cut
from `pipelines/template.yaml` fails the call that needs it, naming the role, the action and the resource; and a
definition with a construct the executor does not run fails its execution by name."""
import json
from pathlib import Path
import pytest


from ncf.emulate.world import open_world, invoke_lambda, FunctionError, TEMPLATE
from ncf.emulate.chain import land_partition, settle


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
        bucket = world.stack.resources["DataBucket"].physical_id
        assert [(d["role"], d["action"], d["resource"].rsplit("/", 1)[0]) for d in world.denials()] == [
            (world.stack.role_arn("TriggerRole"), "s3:PutObject", f"arn:aws:s3:::{bucket}/triggers")]   # the claim marker, refused by moto


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
