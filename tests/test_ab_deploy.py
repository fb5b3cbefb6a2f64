"""A/B in the deploy path, as AWS would run it (`ncf.emulate`): the endpoint serves a champion; a retrain deployed with
`DeployAs=challenger` serves beside it as variant `Challenger`; requests split by weight, `TargetVariant` pins one; the
weights change in place; the challenger is promoted, or removed; a challenger that fails its health check leaves the
champion alone. One world serves the tests of this module, in order (minutes: three executions that train)."""
import pytest

from ncf.emulate.world import open_world
from ncf.emulate.chain import settle
from ncf.emulate.hosting import endpoint_model, config_model, invoke, InvocationError
from ncf.cli.pipeline import main as ncf_pipeline
from test_emulate import _days, _kinds, _execution, _seed_request, _served_users


@pytest.fixture(scope="module")
def ab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ab")
    with open_world(tmp / "world", parameters={"HrThreshold": "0.15", "Tolerance": "0.15"}) as world:
        bucket = world.stack.resources["DataBucket"].physical_id
        parts, root_files = _days(tmp, 21)
        s3 = world.client("s3")
        for name, body in root_files.items(): s3.put_object(Bucket=bucket, Key=f"raw/{name}", Body=body)
        from ncf.emulate.chain import land_partition
        *history, last = sorted(parts)
        for day in history: land_partition(world, bucket, day, parts[day], marker=None)
        land_partition(world, bucket, last, parts[last])
        assert _kinds(settle(world)) == ["build", "execution"]
        yield world, _seed_request(parts[last], known=_served_users(world))


def _variants(world) -> dict:
    "The endpoint's variants: name -> (current weight, the model package it serves)."
    sm = world.client("sagemaker")
    ep = sm.describe_endpoint(EndpointName="ncf")
    return {v["VariantName"]: (v.get("CurrentWeight"), config_model(world, ep["EndpointConfigName"], v["VariantName"])["model_package_arn"])
            for v in ep["ProductionVariants"]}


def _targets(world) -> dict:
    aas = world.client("application-autoscaling")
    return {t["ResourceId"]: t["MinCapacity"] for t in aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]}


def _split(world, request: bytes, n: int = 10) -> list[str]:
    out = [invoke(world, "ncf", request) for _ in range(n)]
    assert all(r["status"] == 200 for r in out), out
    return [r["variant"] for r in out]


@pytest.fixture
def as_admin(ab, monkeypatch):
    "The commands' AWS clients reach the emulated account, with the harness's credentials."
    world, _ = ab
    for k, v in {"AWS_ENDPOINT_URL": world.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": world.admin["aws_access_key_id"],
                 "AWS_SECRET_ACCESS_KEY": world.admin["aws_secret_access_key"]}.items(): monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False); monkeypatch.delenv("AWS_PROFILE", raising=False)


def test_a_challenger_that_fails_its_health_check_leaves_the_champion_alone(ab):
    world, request = ab
    before = endpoint_model(world, "ncf")
    def corrupt(endpoint, config, percent):   # the challenger's archive is damaged between registration and deployment
        if percent == 0 and len(world.client("sagemaker").describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]) == 2:
            bucket, _, key = config_model(world, config, "Challenger")["model_data_url"][len("s3://"):].partition("/")
            world.client("s3").put_object(Bucket=bucket, Key=key, Body=b"not a gzip archive")
    world.while_baking.append(corrupt)
    try: ex = _execution(world, {"DataVersion": "ab-broken", "DeployAs": "challenger", "ChallengerWeight": "0.2"})
    finally: world.while_baking.remove(corrupt)
    assert ex.status == "Failed" and "production variant Challenger did not pass the ping health check" in ex.step("Deploy")["FailureReason"], ex.step("Deploy")
    package = world.client("sagemaker").describe_model_package(ModelPackageName=ex.properties["RegisterApproved"]["ModelPackageArn"])
    assert package["ModelApprovalStatus"] == "Rejected"
    assert endpoint_model(world, "ncf") == before and list(_variants(world)) == ["AllTraffic"]
    assert set(_split(world, request, 3)) == {"AllTraffic"}
    assert list(_targets(world)) == ["endpoint/ncf/variant/AllTraffic"]


def test_a_retrain_deploys_its_package_as_the_challenger(ab):
    world, request = ab
    champion = endpoint_model(world, "ncf")["model_package_arn"]
    ex = _execution(world, {"DataVersion": "ab-challenger", "DeployAs": "challenger", "ChallengerWeight": "0.2"})
    assert ex.status == "Succeeded", ex.failure_reason
    assert ex.properties["Deploy"]["OutputParameters"]["action"] == "challenger started"
    challenger = ex.properties["RegisterApproved"]["ModelPackageArn"]
    # the weights come from the config (ExcludeRetainedVariantProperties=[DesiredWeight]), the champion's model stays
    assert _variants(world) == {"AllTraffic": (0.8, champion), "Challenger": (0.2, challenger)}
    targets = _targets(world)   # the challenger scales from one instance, the champion from the stack's EndpointMinInstances
    assert set(targets) == {"endpoint/ncf/variant/AllTraffic", "endpoint/ncf/variant/Challenger"} and targets["endpoint/ncf/variant/Challenger"] == 1
    split = _split(world, request)
    assert (split.count("AllTraffic"), split.count("Challenger")) == (8, 2), split
    pinned = [invoke(world, "ncf", request, target_variant="Challenger") for _ in range(3)]
    assert {(r["status"], r["variant"]) for r in pinned} == {(200, "Challenger")}
    with pytest.raises(InvocationError, match="no variant 'Shadow'"): invoke(world, "ncf", request, target_variant="Shadow")


def test_the_weights_change_in_place(ab, as_admin, capsys):
    world, request = ab
    sm = world.client("sagemaker")
    configs, before = len(sm.list_endpoint_configs()["EndpointConfigs"]), sm.describe_endpoint(EndpointName="ncf")["EndpointConfigName"]
    assert ncf_pipeline(["ab-weights", "--weight", "0.5"]) == 0
    assert "weights set" in capsys.readouterr().out
    assert sm.describe_endpoint(EndpointName="ncf")["EndpointStatus"] == "Updating"
    assert _kinds(settle(world)) == ["weights"]
    ep = sm.describe_endpoint(EndpointName="ncf")
    assert (ep["EndpointStatus"], ep["EndpointConfigName"]) == ("InService", before)
    assert {v["VariantName"]: v["CurrentWeight"] for v in ep["ProductionVariants"]} == {"AllTraffic": 0.5, "Challenger": 0.5}
    assert len(sm.list_endpoint_configs()["EndpointConfigs"]) == configs   # no new config, no redeployment
    split = _split(world, request)
    assert (split.count("AllTraffic"), split.count("Challenger")) == (5, 5), split
    with pytest.raises(Exception, match="not part of endpoint"):
        sm.update_endpoint_weights_and_capacities(EndpointName="ncf", DesiredWeightsAndCapacities=[{"VariantName": "Shadow", "DesiredWeight": 1.0}])


def test_promote_serves_the_challengers_model_as_alltraffic(ab, as_admin, capsys):
    world, request = ab
    challenger = _variants(world)["Challenger"][1]
    assert ncf_pipeline(["ab-promote"]) == 0, capsys.readouterr()
    assert "promoted" in capsys.readouterr().out
    ran = settle(world)
    assert _kinds(ran) == ["deployment"] and ran[0]["status"] == "InService" and not ran[0]["reason"], ran
    assert _variants(world) == {"AllTraffic": (1.0, challenger)}
    assert endpoint_model(world, "ncf")["model_package_arn"] == challenger
    assert list(_targets(world)) == ["endpoint/ncf/variant/AllTraffic"]   # the endpoint's event: the challenger's target is gone
    assert set(_split(world, request, 3)) == {"AllTraffic"}
    assert ncf_pipeline(["ab-promote"]) == 2
    assert "has no challenger" in capsys.readouterr().err


def test_remove_goes_back_to_the_champion_alone(ab, as_admin, capsys):
    world, request = ab
    champion = endpoint_model(world, "ncf")["model_package_arn"]
    first = next(p for p in world.client("sagemaker").list_model_packages(ModelPackageGroupName="ncf", SortBy="CreationTime", SortOrder="Ascending")["ModelPackageSummaryList"]
                 if p["ModelApprovalStatus"] == "Approved")
    assert ncf_pipeline(["ab-start", str(first["ModelPackageVersion"]), "--weight", "0.3"]) == 0, capsys.readouterr()
    settle(world)
    assert _variants(world) == {"AllTraffic": (0.7, champion), "Challenger": (0.3, first["ModelPackageArn"])}
    assert set(_targets(world)) == {"endpoint/ncf/variant/AllTraffic", "endpoint/ncf/variant/Challenger"}
    assert ncf_pipeline(["ab-remove"]) == 0, capsys.readouterr()
    settle(world)
    assert _variants(world) == {"AllTraffic": (1.0, champion)}
    assert list(_targets(world)) == ["endpoint/ncf/variant/AllTraffic"]
    assert set(_split(world, request, 3)) == {"AllTraffic"}
    # no role was refused anything on the A/B path: the only refusals are the build's two SDK probes (see test_emulate.py)
    assert {(d["role"].rsplit("/", 1)[-1], d["action"]) for d in world.denials()} == {
        ("ncf-retrain-codebuild", "iam:SimulatePrincipalPolicy"), ("ncf-retrain-codebuild", "s3:ListAllMyBuckets")}
