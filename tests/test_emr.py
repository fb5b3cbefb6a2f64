"""The EMR preprocessing files: the Airflow DAG, the step, the job flow and the bootstrap action.

Checked without Airflow and without AWS: the DAG is imported against a small stand-in of the Airflow names it
uses, so its task graph, trigger rules and the Python task bodies can be exercised; the templated requests are
rendered with Jinja2 (as Airflow renders them), validated against botocore's own EMR shapes and submitted to
moto's EMR; the step's arguments are parsed with ncf's own preprocessing CLI; the bootstrap script runs with a
fake `aws` on PATH and a locally built wheel. Set NCF_AIRFLOW_PYTHON to a Python with apache-airflow and the
Amazon provider to also parse the DAG with Airflow's DagBag."""
import fnmatch, importlib.util, json, os, re, shutil, subprocess, sys, sysconfig, types
from pathlib import Path

import jinja2
import pytest

import ncf, ncf.cli.spark
from ncf.cli.preprocess import parser
from ncf.data.split import partition_uri

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
BOOTSTRAP = PIPELINES / "emr_bootstrap.sh"
VARS = {"ncf_data_bucket": "ncf-data-123", "ncf_code_bucket": "ncf-code-123", "ncf_version": "0.1.0",
        "ncf_emr_cluster_id": "j-EXISTING"}
DS = "2026-03-04"
PARAMS = {"cluster": "", "service_role": "EMR_DefaultRole", "job_flow_role": "EMR_EC2_DefaultRole"}


# ---- the DAG against a stand-in of Airflow ---------------------------------------------------------

class Task:
    "One task of the stand-in: its id, constructor arguments and upstream task ids."
    def __init__(self, dag, task_id, kind, **kw):
        self.task_id, self.kind, self.kw, self.up = task_id, kind, kw, set()
        self.trigger_rule = str(kw.get("trigger_rule", "all_success"))
        self.up |= {v.task_id for v in kw.get("args", ()) if isinstance(v, Task)}
        self.up |= {v.task_id for v in kw.values() if isinstance(v, Task)}  # an XComArg makes a dependency
        dag.tasks[task_id] = self
    @property
    def output(self): return self
    def __rshift__(self, other):
        for o in other if isinstance(other, list) else [other]: o.up.add(self.task_id)
        return other
    def __rrshift__(self, others):
        for o in others: self.up.add(o.task_id)
        return self


def fake_airflow(variables:dict, hook_client=None) -> dict:
    "Modules standing in for the Airflow names the DAG imports; the DAG object is `mods['airflow.sdk'].DAG.current`."
    mod = lambda name, **attrs: types.SimpleNamespace(__name__=name, __path__=[], **attrs)

    class DAG:
        current = None
        def __init__(self, **kw): self.kw, self.tasks = kw, {}
        def __enter__(self): DAG.current = self; return self
        def __exit__(self, *a): return False
    def operator(kind):
        return lambda task_id, **kw: Task(DAG.current, task_id, kind, **kw)
    def task(task_id, kind="python", **opts):
        return lambda fn: lambda *args: Task(DAG.current, task_id, kind, fn=fn, args=args, **opts)
    task.branch = lambda task_id, **opts: task(task_id, "branch", **opts)
    class Skip(Exception): pass
    class Fail(Exception): pass
    class Variable:
        @staticmethod
        def get(key, default_var=None): return variables.get(key, default_var)
    class EmrHook:
        def __init__(self, aws_conn_id): self.conn = hook_client
    emr = "airflow.providers.amazon.aws"
    return {"airflow": mod("airflow"), "airflow.sdk": mod("airflow.sdk", DAG=DAG, task=task, Param=lambda default, **kw: default),
            "airflow.models": mod("airflow.models", Variable=Variable),
            "airflow.exceptions": mod("airflow.exceptions", AirflowSkipException=Skip, AirflowFailException=Fail),
            **{n: mod(n) for n in ("airflow.providers", "airflow.providers.amazon", emr, f"{emr}.operators", f"{emr}.sensors", f"{emr}.hooks")},
            f"{emr}.operators.emr": mod("emr", EmrAddStepsOperator=operator("add_steps"), EmrCreateJobFlowOperator=operator("create")),
            f"{emr}.sensors.emr": mod("emr", EmrStepSensor=operator("step_sensor")),
            f"{emr}.hooks.emr": mod("emr", EmrHook=EmrHook)}


def load_dag(monkeypatch, variables=None, hook_client=None):
    "Import `airflow_dag.py` against the stand-in; return (module, dag, exceptions module)."
    mods = fake_airflow(variables or {}, hook_client)
    for name, m in mods.items(): monkeypatch.setitem(sys.modules, name, m)
    spec = importlib.util.spec_from_file_location("ncf_airflow_dag", PIPELINES / "airflow_dag.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module, module.dag, mods["airflow.exceptions"]


def render(obj, **ctx):
    "Render every string in a templated request as Airflow does (Jinja2, undefined names are errors)."
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    context = {"ds": DS, "var": {"value": VARS}, "params": PARAMS, **ctx}
    if isinstance(obj, str): return env.from_string(obj).render(context)
    if isinstance(obj, list): return [render(v, **ctx) for v in obj]
    if isinstance(obj, dict): return {k: render(v, **ctx) for k, v in obj.items()}
    return obj


def test_airflow_dag_structure(monkeypatch):
    "The task graph: a branch on the cluster mode, each path ending in a step sensor, clean-up and a run that fails."
    _, dag, _ = load_dag(monkeypatch)
    assert dag.kw["schedule"] == "@daily" and dag.kw["catchup"] is False and dag.kw["max_active_runs"] == 1
    assert dag.kw["params"] == PARAMS  # the roles are params, the mode defaults to the Variable
    t = dag.tasks
    up = {k: v.up for k, v in t.items()}
    assert up == {"choose_cluster": set(), "create_cluster": {"choose_cluster"}, "add_step": {"choose_cluster"},
                  "batch_step_id": {"create_cluster"}, "wait_for_batch_step": {"create_cluster", "batch_step_id"},
                  "terminate_cluster": {"wait_for_batch_step"}, "wait_for_step": {"add_step"},
                  "fail_run": {"create_cluster", "batch_step_id", "wait_for_batch_step", "terminate_cluster", "wait_for_step"}}
    assert {k: v.kind for k, v in t.items() if v.kind != "python"} == {
        "choose_cluster": "branch", "create_cluster": "create", "add_step": "add_steps",
        "wait_for_batch_step": "step_sensor", "wait_for_step": "step_sensor"}
    # failure handling: clean-up runs whatever happened; the run fails when anything failed
    assert t["terminate_cluster"].trigger_rule == "all_done" and t["fail_run"].trigger_rule == "one_failed"
    assert {v.trigger_rule for k, v in t.items() if k not in ("terminate_cluster", "fail_run")} == {"all_success"}
    leaves = set(t) - set().union(*up.values())
    assert leaves == {"fail_run"}  # Airflow judges a run by its leaves
    for s in ("wait_for_batch_step", "wait_for_step"):
        assert {"FAILED", "CANCELLED"} <= set(t[s].kw["failed_states"]) and "COMPLETED" not in t[s].kw["failed_states"]
    assert t["wait_for_batch_step"].kw["job_flow_id"] is t["create_cluster"] and t["wait_for_batch_step"].kw["step_id"] is t["batch_step_id"]
    assert t["wait_for_step"].kw["step_id"] == "{{ task_instance.xcom_pull(task_ids='add_step')[0] }}"
    assert render(t["add_step"].kw["job_flow_id"]) == render(t["wait_for_step"].kw["job_flow_id"]) == "j-EXISTING"


def test_dag_task_bodies(monkeypatch):
    "The branch follows the param, then the Variable, then `per_batch`; `fail_run` fails; clean-up skips without a cluster."
    for variables, param, first in (({}, "", "create_cluster"), ({"ncf_emr_mode": "existing"}, "", "add_step"),
                                    ({"ncf_emr_mode": "existing"}, "per_batch", "create_cluster")):
        _, dag, _ = load_dag(monkeypatch, variables)
        assert dag.tasks["choose_cluster"].kw["fn"](params={"cluster": param}) == first
    _, dag, exc = load_dag(monkeypatch, {"ncf_emr_mode": "spot"})
    with pytest.raises(ValueError, match="'per_batch' or 'existing', got 'spot'"): dag.tasks["choose_cluster"].kw["fn"](params={"cluster": ""})
    with pytest.raises(exc.AirflowFailException, match="EMR preprocessing step"): dag.tasks["fail_run"].kw["fn"]()
    ti = types.SimpleNamespace(xcom_pull=lambda task_ids: None)
    with pytest.raises(exc.AirflowSkipException): dag.tasks["terminate_cluster"].kw["fn"](ti=ti)


@pytest.fixture
def requests(monkeypatch):
    "The rendered RunJobFlow and AddJobFlowSteps requests, as the DAG builds them."
    module, _, _ = load_dag(monkeypatch)
    return {"RunJobFlow": render(module.JOB_FLOW), "AddJobFlowSteps": {"JobFlowId": "j-EXISTING", "Steps": render(module.STEPS)}}


def test_requests_match_botocore_shapes(requests):
    "Each request is valid for botocore's EMR model, and says what a failure does."
    import botocore.session
    from botocore.validate import ParamValidator
    model = botocore.session.get_session().get_service_model("emr")
    for op, params in requests.items():
        report = ParamValidator().validate(params, model.operation_model(op).input_shape)
        assert not report.has_errors(), f"{op}: {report.generate_report()}"
    flow, (step,) = requests["RunJobFlow"], requests["AddJobFlowSteps"]["Steps"]
    assert [s["ActionOnFailure"] for s in flow["Steps"]] == ["TERMINATE_CLUSTER"] and step["ActionOnFailure"] == "CANCEL_AND_WAIT"
    assert flow["Steps"][0]["HadoopJarStep"] == step["HadoopJarStep"]  # one step definition for both modes
    assert flow["Instances"]["KeepJobFlowAliveWhenNoSteps"] is False and flow["Applications"] == [{"Name": "Spark"}]
    assert re.fullmatch(r"emr-7\.\d+\.\d+", flow["ReleaseLabel"])
    groups = {g["InstanceRole"]: g["Market"] for g in flow["Instances"]["InstanceGroups"]}
    assert groups == {"MASTER": "ON_DEMAND", "CORE": "ON_DEMAND", "TASK": "SPOT"}
    assert (flow["ServiceRole"], flow["JobFlowRole"]) == ("EMR_DefaultRole", "EMR_EC2_DefaultRole")
    assert flow["LogUri"].startswith(f"s3://{VARS['ncf_data_bucket']}/")
    (boot,) = flow["BootstrapActions"]
    code = VARS["ncf_code_bucket"]
    assert boot["ScriptBootstrapAction"] == {"Path": f"s3://{code}/ncf/emr/emr_bootstrap.sh",
                                             "Args": [f"s3://{code}/ncf/wheels/ncf-{VARS['ncf_version']}-py3-none-any.whl"]}


def test_emr_step_definition(requests):
    "The step is spark-submit of ncf's Spark module in the bootstrap's venv, reading raw/ and writing what the stack watches."
    args = requests["AddJobFlowSteps"]["Steps"][0]["HadoopJarStep"]["Args"]
    assert requests["AddJobFlowSteps"]["Steps"][0]["HadoopJarStep"]["Jar"] == "command-runner.jar" and args[0] == "spark-submit"
    script = next(a for a in args if a.endswith(".py"))
    a = parser().parse_args(args[args.index(script) + 1:] + ["--engine", "spark"])
    bucket = VARS["ncf_data_bucket"]
    assert a.src == f"s3://{bucket}/raw/" and a.format == "partitioned" and a.days == 30
    assert a.run_date == a.end_date == DS
    dest = partition_uri(a.out, a.run_date)
    assert dest == f"s3://{bucket}/preprocessed/dt={DS}"
    assert fnmatch.fnmatch(f"{dest[len(f's3://{bucket}/'):]}/manifest.json", "preprocessed/*/manifest.json")  # the stack's trigger
    # the script and interpreter are where the bootstrap puts them
    boot = BOOTSTRAP.read_text()
    venv = re.search(r"NCF_VENV:-([^}]+)}", boot).group(1); py = re.search(r"NCF_PYTHON:-([^}]+)}", boot).group(1)
    pkg = Path(ncf.cli.spark.__file__).relative_to(Path(ncf.__file__).parents[1]).as_posix()
    assert script == f"{venv}/lib/{py}/site-packages/{pkg}"
    assert f"spark.pyspark.python={venv}/bin/python" in args and f"spark.pyspark.driver.python={venv}/bin/python" in args


def test_job_flow_under_moto(monkeypatch, requests):
    "moto's EMR takes both requests as they are; the DAG's own tasks find the step and terminate the cluster."
    boto3 = pytest.importorskip("boto3"); moto = pytest.importorskip("moto")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"): monkeypatch.setenv(k, "testing")
    with moto.mock_aws():
        emr = boto3.client("emr")
        cluster = emr.run_job_flow(**requests["RunJobFlow"])["JobFlowId"]
        desc = emr.describe_cluster(ClusterId=cluster)["Cluster"]
        assert desc["AutoTerminate"] is True and desc["ReleaseLabel"] == requests["RunJobFlow"]["ReleaseLabel"]
        assert sorted(g["Market"] for g in emr.list_instance_groups(ClusterId=cluster)["InstanceGroups"]) == ["ON_DEMAND", "ON_DEMAND", "SPOT"]
        assert [b["ScriptPath"] for b in emr.list_bootstrap_actions(ClusterId=cluster)["BootstrapActions"]] == [
            requests["RunJobFlow"]["BootstrapActions"][0]["ScriptBootstrapAction"]["Path"]]
        _, dag, _ = load_dag(monkeypatch, hook_client=emr)
        step_id = dag.tasks["batch_step_id"].kw["fn"](cluster)
        step = emr.describe_step(ClusterId=cluster, StepId=step_id)["Step"]
        assert step["ActionOnFailure"] == "TERMINATE_CLUSTER" and step["Config"]["Args"] == requests["RunJobFlow"]["Steps"][0]["HadoopJarStep"]["Args"]
        dag.tasks["terminate_cluster"].kw["fn"](ti=types.SimpleNamespace(xcom_pull=lambda task_ids: cluster))
        assert emr.describe_cluster(ClusterId=cluster)["Cluster"]["Status"]["State"] == "TERMINATED"
        # an existing, long-running cluster takes the step with CANCEL_AND_WAIT
        alive = {**requests["RunJobFlow"], "Steps": [], "Instances": {**requests["RunJobFlow"]["Instances"], "KeepJobFlowAliveWhenNoSteps": True}}
        existing = emr.run_job_flow(**alive)["JobFlowId"]
        (added,) = emr.add_job_flow_steps(**{**requests["AddJobFlowSteps"], "JobFlowId": existing})["StepIds"]
        step = emr.describe_step(ClusterId=existing, StepId=added)["Step"]
        assert step["ActionOnFailure"] == "CANCEL_AND_WAIT" and step["Name"] == f"ncf-preprocess {DS}"
        assert step["Status"]["State"] in ("PENDING", "RUNNING")  # moto runs no step: success and failure are Airflow's side


@pytest.mark.skipif(not os.environ.get("NCF_AIRFLOW_PYTHON"), reason="NCF_AIRFLOW_PYTHON (a Python with apache-airflow) not set")
def test_dag_parses_with_airflow(tmp_path):
    "With real Airflow (optional): the DagBag has no import errors and the same tasks and trigger rules."
    code = ("import json; from airflow.dag_processing.dagbag import DagBag; b = DagBag(dag_folder=%r); "
            "d = b.dags['ncf_preprocess_daily']; print(json.dumps({'errors': {str(k): str(v) for k, v in b.import_errors.items()}, "
            "'tasks': {t.task_id: [str(t.trigger_rule.value), sorted(t.upstream_task_ids)] for t in d.tasks}}))") % str(PIPELINES / "airflow_dag.py")
    r = subprocess.run([os.environ["NCF_AIRFLOW_PYTHON"], "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "AIRFLOW_HOME": str(tmp_path)})
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["errors"] == {}
    assert got["tasks"]["terminate_cluster"][0] == "all_done" and got["tasks"]["fail_run"][0] == "one_failed"
    assert sorted(got["tasks"]) == sorted(["choose_cluster", "create_cluster", "batch_step_id", "wait_for_batch_step",
                                           "terminate_cluster", "add_step", "wait_for_step", "fail_run"])


# ---- the bootstrap action ----------------------------------------------------------------------------

def test_bootstrap_lint():
    "shellcheck when it is installed (apt-get install shellcheck), else bash's own syntax check."
    lint = [shutil.which("shellcheck")] if shutil.which("shellcheck") else ["bash", "-n"]
    r = subprocess.run([*lint, str(BOOTSTRAP)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    "The ncf wheel, built from a copy of this checkout (so no build/ or egg-info lands in it), without network."
    d = tmp_path_factory.mktemp("wheel")
    src = d/"src"
    for name in ("ncf", "setup.py", "settings.ini", "pyproject.toml", "README.md"):
        (shutil.copytree if (ROOT/name).is_dir() else shutil.copy)(ROOT/name, src/name if (ROOT/name).is_dir() else src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(d/"dist")],
                   check=True, capture_output=True, timeout=300)
    (whl,) = (d/"dist").glob("ncf-*-py3-none-any.whl")
    return whl


FAKE_AWS = """#!/usr/bin/env bash
# `aws s3 cp [--only-show-errors] s3://BUCKET/KEY DEST`, served from $FAKE_S3/BUCKET/KEY; each call logged.
echo "$*" >> "$FAKE_S3/calls.log"
[ "$1 $2" = "s3 cp" ] || { echo "fake aws: unsupported: $*" >&2; exit 2; }
shift 2; [ "$1" = "--only-show-errors" ] && shift
src="$FAKE_S3/${1#s3://}"
[ -f "$src" ] || { echo "fatal error: An error occurred (404) when calling the HeadObject operation: Key \\"${1#s3://*/}\\" does not exist" >&2; exit 1; }
cp "$src" "$2"
"""


def bootstrap_env(tmp_path, wheel) -> tuple[dict, str]:
    """A fake `aws` serving the wheel at its CI address, and the environment to run the bootstrap in, offline.

    No index can be reached here, and torch & co. have no wheel files to `--find-links`: the requirements come from
    the venv running the tests, through PYTHONPATH (a folder of links to its packages, less ncf and pip).
    pip sees them as installed and `--no-index` proves nothing is fetched; ncf itself still has to come from the
    new venv, which the test checks."""
    store = tmp_path/"s3"; (store/"code/ncf/wheels").mkdir(parents=True)
    shutil.copy(wheel, store/"code/ncf/wheels"/wheel.name)
    bin_ = tmp_path/"bin"; bin_.mkdir(); (bin_/"aws").write_text(FAKE_AWS); (bin_/"aws").chmod(0o755)
    deps = tmp_path/"deps"; deps.mkdir()
    skip = re.compile(r"(ncf|__editable__|pip|_distutils_hack|__pycache__)([-_.]|$)", re.I)
    site = Path(sysconfig.get_paths()["purelib"])
    for p in site.iterdir():
        if not skip.match(p.name) and not p.name.endswith(".pth"): (deps/p.name).symlink_to(p)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "FAKE_S3": str(store), "PYTHONPATH": str(deps),
           "NCF_VENV": str(tmp_path/"opt/ncf/venv"), "NCF_PYTHON": sys.executable, "NCF_PIP_ARGS": "--no-index",
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    return env, f"s3://code/ncf/wheels/{wheel.name}"


def test_bootstrap_installs_ncf(tmp_path, wheel):
    "The bootstrap downloads the wheel with `aws s3 cp`, makes the venv, installs ncf and its non-pyspark requirements."
    env, uri = bootstrap_env(tmp_path, wheel)
    r = subprocess.run(["bash", str(BOOTSTRAP), uri], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (call,) = (tmp_path/"s3/calls.log").read_text().splitlines()
    assert call.startswith(f"s3 cp --only-show-errors {uri} ")
    reqs = next(l for l in r.stdout.splitlines() if l.startswith("emr_bootstrap.sh: requirements:"))
    assert "torch" in reqs and "pandas" in reqs and "pyspark" not in reqs
    venv = Path(env["NCF_VENV"])
    out = subprocess.run([str(venv/"bin/python"), "-c", "import ncf, ncf.data.split, ncf.cli.spark; print(ncf.__file__); print(ncf.cli.spark.__file__)"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in out), out  # ncf from the wheel in the venv, not from the checkout
    assert out[1] == f"{venv}/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/ncf/cli/spark.py"
    again = subprocess.run(["bash", str(BOOTSTRAP), uri], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # a rerun on the same node reuses the venv


def test_bootstrap_fails_loudly(tmp_path, wheel):
    "A missing wheel or a URI that is not an s3://...whl fails the bootstrap action (and so the cluster's start)."
    env, uri = bootstrap_env(tmp_path, wheel)
    r = subprocess.run(["bash", str(BOOTSTRAP), uri.replace("ncf-", "ncf-9")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "does not exist" in r.stderr and not list(Path(env["NCF_VENV"]).glob("lib/*/site-packages/ncf"))
    r = subprocess.run(["bash", str(BOOTSTRAP), "https://example.invalid/ncf.whl"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "must be an s3://...whl URI" in r.stderr
    r = subprocess.run(["bash", str(BOOTSTRAP)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "usage: emr_bootstrap.sh" in r.stderr
