"""The commands as users and scripts call them: documented options, one spelling, one error line, and the
core install's commands running without the optional extras."""
import configparser, importlib, json, os, shutil, subprocess, sys, textwrap
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from conftest import ROOT, venv_bin
from helpers import SMALL_SHOP, small_dataset
from ncf.options import DefaultsHelp

EXTRAS_BLOCKED = ("starlette", "uvicorn", "sagemaker", "pyspark", "matplotlib")


def console_scripts() -> dict:
    "`{script: module}` of the console scripts `settings.ini` installs."
    cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
    lines = [l.strip() for l in cfg["DEFAULT"]["console_scripts"].splitlines() if l.strip()]
    return {name: target.split(":")[0] for name, target in (l.split("=", 1) for l in lines)}


# Every command with a parser: the console scripts and the `python -m` commands.
COMMANDS = sorted({*console_scripts().values(), "ncf.cli.evaluate", "ncf.cli.demo"})


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_has_help_and_shows_its_default(module):
    p = importlib.import_module(module).parser()
    assert p.description, module
    fmt = DefaultsHelp(p.prog)
    for a in p._actions:
        if a.dest == "help": continue
        assert a.help, f"{module}: {a.option_strings or a.dest} has no help text"
        required = a.required or (not a.option_strings and a.nargs not in ("?", "*"))
        if not required: assert "(default" in fmt._get_help_string(a), f"{module}: {a.option_strings or a.dest} shows no default"


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_help_of_every_console_script(script):
    p = subprocess.run([venv_bin(script), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith(f"usage: {script}") and p.stderr == "", p.stderr
    assert importlib.import_module(console_scripts()[script]).parser().description in " ".join(p.stdout.split())


def test_one_spelling_and_sagemakers_underscores():
    from ncf.cli.train import parser
    from ncf.cli.pipeline import parser as pipeline_parser
    dashed = parser().parse_args(["--batch-size", "64", "--lr-scaling", "sqrt", "--model-dir", "m"])
    underscored = parser().parse_args(["--batch_size", "64", "--lr_scaling", "sqrt", "--model_dir", "m"])
    assert vars(dashed) == vars(underscored)
    assert pipeline_parser().parse_args(["run", "--data_uri", "x", "--hr_threshold", "0.3"]).hr_threshold == 0.3


def test_a_bad_value_is_one_error_line(tmp_path):
    p = subprocess.run([venv_bin("ncf_train"), "--data", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--lr_scaling", "cube"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert p.stderr.startswith("ncf_train: error: lr_scaling must be none, sqrt or linear")


# ------------------------------------------------------------------ deploy on a busy endpoint

def test_deploy_on_a_busy_endpoint_prints_one_error_line(monkeypatch, capsys):
    from test_sagemaker import ROLE, BUCKET, REGION, UpdatableSageMaker, put_version
    from ncf.pipeline import lambdas
    from ncf.pipeline.aws import AwsSettings
    from ncf.pipeline.sagemaker_registry import SageMakerRegistry
    from ncf.cli.pipeline import main
    for k in [k for k in os.environ if k.startswith("NCF_")]: monkeypatch.delenv(k)
    for k, v in {"AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_EC2_METADATA_DISABLED": "true", "NCF_SAGEMAKER_ROLE_ARN": ROLE, "NCF_BUCKET": BUCKET}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        sm = UpdatableSageMaker(boto3.client("sagemaker"))
        for mv in ("b1", "b2"): put_version(sm, "busy", "Approved", mv)
        SageMakerRegistry("ep-busy", AwsSettings(bucket=BUCKET, role_arn=ROLE), sagemaker=sm).set_production("busy", 1)
        real = lambdas.describe_endpoint
        def updating(client, name):   # SageMaker is still rolling out an earlier update
            ep = real(client, name)
            return ep and {**ep, "EndpointStatus": "Updating"}
        monkeypatch.setattr(lambdas, "describe_endpoint", updating)
        capsys.readouterr()
        rc = main(["deploy", "2", "--model-group", "busy", "--endpoint-name", "ep-busy"])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith("ncf_pipeline: error: endpoint ep-busy is Updating") and "deploy again when it is InService" in err
        monkeypatch.setattr(lambdas, "describe_endpoint", real)
        assert SageMakerRegistry("ep-busy", AwsSettings(bucket=BUCKET), sagemaker=sm).production("busy").version == 1


# ------------------------------------------------------------------ the core install, without the extras

BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED: raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
sys.meta_path.insert(0, Blocked())
"""


def without_extras(tmp_path: Path) -> dict:
    "An environment whose interpreters cannot import the optional extras (a `sitecustomize` blocks them)."
    site = tmp_path / "site"; site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=EXTRAS_BLOCKED))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "NCF_SMALL": "1"}


def test_the_blocker_blocks(tmp_path):
    p = subprocess.run([sys.executable, "-c", "import starlette"], env=without_extras(tmp_path), capture_output=True, text=True)
    assert p.returncode == 1 and "blocked by the test" in p.stderr


def test_train_and_the_local_pipeline_run_without_the_extras(tmp_path):
    env = without_extras(tmp_path)
    data = small_dataset(tmp_path / "d", days=20)
    fast = ["--epochs", "1", "--full-ranking", "false", "--precision", "fp32", "--refit", "false"]
    p = subprocess.run([venv_bin("ncf_train"), "--data", str(data), "--model-dir", str(tmp_path / "model"), *fast],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").exists()
    work = tmp_path / "pipe"
    shutil.copytree(tmp_path / "d" / "raw", work / "raw")
    p = subprocess.run([venv_bin("ncf_pipeline"), "run", "--local", "--data-uri", str(work / "raw"), "--work-dir", str(work),
                        "--endpoint-url", "http://127.0.0.1:9", "--hr-threshold", "0", "--tolerance", "1",
                        "--hp", "epochs=1", "--hp", "full_ranking=false", "--hp", "precision=fp32"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "result: APPROVED and deployed" in p.stdout and "Deploy" in p.stdout


def test_a_step_that_needs_an_extra_names_it(tmp_path):
    env = without_extras(tmp_path)
    p = subprocess.run([venv_bin("ncf_serve"), "--model-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "ncf_serve: error: ncf_serve needs uvicorn, from the 'serve' extra: pip install 'ncf[serve]'"
    p = subprocess.run([venv_bin("ncf_preprocess"), str(tmp_path), str(tmp_path / "out"), "--engine", "spark"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "pip install 'ncf[spark]'" in p.stderr and p.stderr.count("\n") == 1, p.stderr


# ------------------------------------------------------------------ repository tooling is not product code

def test_changing_the_repository_tooling_keeps_the_retrain_cached(tmp_path):
    "The code version hashes the package only: editing the docs builder or the repo checks changes nothing a retrain caches on."
    repo = tmp_path / "repo"
    for name in ("ncf", "tools", "settings.ini"):
        src = ROOT / name
        if src.is_dir(): shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else: shutil.copy2(src, repo / name)
    shutil.copytree(small_dataset(tmp_path / "d", days=20).parent.parent / "raw", tmp_path / "raw")
    script = textwrap.dedent(f"""
        import json
        from ncf.pipeline.retrain import run_local
        from ncf.pipeline.params import PipelineParams
        r = run_local(PipelineParams(data_uri={str(tmp_path / 'raw')!r}, work_dir={str(tmp_path / 'work')!r}, endpoint_url="http://127.0.0.1:9",
                                     hr_threshold=0, tolerance=1, hyperparameters={{"epochs": 1, "full_ranking": False, "precision": "fp32"}}), log=lambda *a: None)
        print(json.dumps({{s.name: s.status for s in r.records}}))""")
    env = {**os.environ, "PYTHONPATH": str(repo), "NCF_SMALL": "1"}
    def retrain() -> dict:
        p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900, cwd=repo)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])
    first = retrain()
    assert first["Preprocess"] == "ran" and first["Train"] == "ran"
    second = retrain()   # evaluates the same model again, now against itself in production
    assert second["Preprocess"] == second["Train"] == "cached", second
    for f in ("tools/docs.py", "tools/repo.py"):
        (repo / f).write_text((repo / f).read_text() + "\n# an edit to the repository tooling\n")
    third = retrain()
    assert third["Preprocess"] == third["Train"] == third["Evaluate"] == "cached", third
    (repo / "ncf" / "data" / "readers.py").write_text((repo / "ncf" / "data" / "readers.py").read_text() + "\n# an edit to the product\n")
    assert retrain()["Preprocess"] == "ran"   # the control: a change to the package itself is a new code version
