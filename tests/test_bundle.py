"""What ships to AWS installs offline: the staged job code and the serving archive into a fresh venv with the
network cut off, the Lambda zip imports its own boto3, and `ship` uploads by content (ncf.pipeline.bundle).

Building the wheels needs PyPI (cached under build/); every install under test runs in `unshare -rn`, a user and
network namespace with no interface but loopback, with pip's configuration files ignored (PIP_CONFIG_FILE=/dev/null),
so neither an index nor a machine-wide --find-links can stand in for the shipped wheels.
"""
import glob, hashlib, json, os, subprocess, sys, tarfile, zipfile
from pathlib import Path

import pytest

from ncf.core import NCFError
from ncf.pipeline import bundle

ROOT = bundle.project_root()
TORCH = "2.13.0"   # constraints.txt's torch: stands in for the image's 2.5.1+cpu (both satisfy torch>=2.2)
OFFLINE = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HOME": "/tmp", "NCF_SMALL": "1"}


def offline(cmd, cwd, timeout=300, **env):
    "Run `cmd` with no network (and no pip config); fail the test with its output when it fails."
    p = subprocess.run(["unshare", "-rn", *map(str, cmd)], cwd=cwd, env={**OFFLINE, **env}, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module", autouse=True)
def needs_unshare():
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rn (user and network namespaces) is not permitted here: the offline install cannot be isolated")


@pytest.fixture(scope="module")
def wheels():
    return bundle.wheelhouse()   # cached under build/wheels/KEY; built from PyPI when missing


@pytest.fixture(scope="module")
def image_wheels():
    """The image's part, for a fresh venv: a torch wheel and torch's own dependencies (the image has them all).

    The torch CPU wheel is taken from disk (/opt/wheels on these machines); elsewhere (CI) it is downloaded once from
    PyTorch's CPU index into build/image-standin/, as are torch's dependencies from PyPI under constraints.txt."""
    dest = ROOT / "build" / "image-standin"
    dest.mkdir(parents=True, exist_ok=True)
    torch = sorted(glob.glob(f"/opt/wheels/torch-{TORCH}+cpu-cp311-*.whl")) or sorted(glob.glob(str(dest / f"torch-{TORCH}*.whl")))
    if not torch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), f"torch=={TORCH}",
                        "--index-url", "https://download.pytorch.org/whl/cpu"], check=True)
        torch = sorted(glob.glob(str(dest / f"torch-{TORCH}*.whl")))
    if not (dest / "DEPS").exists():
        deps = ["filelock", "typing-extensions", "sympy", "networkx", "jinja2", "fsspec", "setuptools"]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(dest), "-c",
                        str(ROOT / "constraints.txt"), *deps], check=True)
        (dest / "DEPS").write_text("\n".join(deps))
    return Path(torch[0]), dest


def image_venv(path: Path, image_wheels) -> Path:
    "A fresh venv (no system site packages) holding what the image holds that matters here: torch and its dependencies."
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    torch, deps = image_wheels
    offline([path / "bin/python", "-m", "pip", "install", "--quiet", "--no-index", "--find-links", deps, torch], cwd=path)
    return path / "bin" / "python"


def installed(py: Path) -> dict:
    out = subprocess.run([py, "-c", "import json, importlib.metadata as m; print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_staged_job_code_installs_offline_and_imports(tmp_path, wheels, image_wheels):
    "(a) The training/processing source dir installs its requirements.txt with no network, in the cwd the drivers use."
    code = bundle.stage_code(tmp_path / "code", wheels=wheels)
    py = image_venv(tmp_path / "venv", image_wheels)
    # sm_train.sh and runproc.sh: cd into the code directory, then pip install -r requirements.txt
    offline([py, "-m", "pip", "install", "--quiet", "-r", "requirements.txt"], cwd=code)
    have = installed(py)
    assert have["numpy"].startswith("1.26") and have["torch"].startswith(TORCH) and "orjson" in have and "pyarrow" in have
    out = offline([py, "-c", "import ncf, ncf.cli.train, ncf.cli.sagemaker, ncf.core as c; print(ncf.__file__); print(c.requirements())"], cwd=code)
    assert out.splitlines()[0].startswith(str(code)), out
    # The image's numpy and pandas, not this machine's newer ones: one epoch of the staged train.py, as SageMaker runs it.
    from helpers import small_dataset
    data = small_dataset(tmp_path / "shop", days=12)
    out = offline([py, "train.py", "--epochs", "1", "--batch_size", "512", "--factor_num", "8", "--num_layers", "2", "--full_ranking", "false",
                   "--precision", "fp32"], cwd=code, SM_CHANNEL_TRAIN=str(data.parent), SM_MODEL_DIR=str(tmp_path / "model"))
    assert "HR=" in out and (tmp_path / "model" / "manifest.json").exists(), out[-2000:]


def test_serving_archive_installs_offline_and_imports(tmp_path, wheels, image_wheels):
    "(b) model.tar.gz's code/requirements.txt installs with no network from another cwd, as the inference toolkit runs it."
    from ncf.model.modeldir import random_model_dir
    random_model_dir(tmp_path / "m")
    built = bundle.serving_archive(tmp_path / "m", tmp_path / "model.tar.gz", wheels=wheels)
    model = tmp_path / "opt-ml-model"
    with tarfile.open(built["path"]) as t: t.extractall(model)
    py = image_venv(tmp_path / "venv", image_wheels)
    # sagemaker_inference.model_server: python -m pip install -r /opt/ml/model/code/requirements.txt, from elsewhere
    offline([py, "-m", "pip", "install", "--quiet", "-r", model / "code" / "requirements.txt"], cwd=tmp_path)
    script = ("import os, sys, json; sys.path.insert(0, os.path.abspath('code')); import inference, ncf\n"
              "assert ncf.__file__.startswith(os.path.abspath('code')), ncf.__file__\n"
              "m = inference.model_fn(os.getcwd()); print(type(m).__name__)")
    assert offline([py, "-c", script], cwd=model).strip()


def test_lambda_zip_brings_its_boto3(tmp_path):
    "(c) The Lambda's `import boto3` resolves inside the zip, and that botocore knows IfNoneMatch on PutObject."
    z = bundle.lambda_zip(tmp_path / "lambdas.zip")
    task = tmp_path / "var-task"
    with zipfile.ZipFile(z) as f: f.extractall(task)
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import lambdas, boto3, botocore, json\n"
              "print(json.dumps([boto3.__file__, botocore.__file__, lambdas.__file__, boto3.__version__]))")
    p = subprocess.run([sys.executable, "-c", script, str(task)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": "", "AWS_DEFAULT_REGION": "us-east-1"})
    assert p.returncode == 0, p.stderr[-2000:]
    files = json.loads(p.stdout.strip().splitlines()[-1])
    assert all(Path(f).resolve().is_relative_to(task.resolve()) for f in files[:3]), files
    pin = next(l for l in (ROOT / "constraints.txt").read_text().splitlines() if l.startswith("boto3=="))
    assert files[3] == pin.split("==")[1]
    bundle.check_if_none_match(task)


def test_the_recommendation_lambda_runs_from_its_zip_alone(tmp_path):
    """The recommendation Lambda's handler imports from its zip with no site-packages (`python -S`), numpy and torch
    never load, and it answers an API Gateway event over a SQLite store with the light endpoint client."""
    z = bundle.recommend_zip(tmp_path / "recommend.zip")
    task = tmp_path / "var-task"
    with zipfile.ZipFile(z) as f: f.extractall(task)
    script = ("import sys, json; sys.path.insert(0, sys.argv[1]); import ncf.serve.gateway as g, redis, boto3\n"
              "r = g.lambda_handler({'version': '2.0', 'rawPath': '/recommendations/u1', 'rawQueryString': 'k=0',"
              " 'requestContext': {'http': {'method': 'GET'}}})\n"
              "assert 'numpy' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
              "print(json.dumps([r, g.__file__, redis.__file__]))")
    env = {"PATH": os.environ["PATH"], "NCF_STORE_URL": f"sqlite://{tmp_path / 'store.db'}", "NCF_ENDPOINT_NAME": "ncf",
           "NCF_ENDPOINT_CLIENT": "http", "NCF_ENDPOINT_URL": "http://127.0.0.1:9", "NCF_METRICS": "off"}
    p = subprocess.run([sys.executable, "-S", "-c", script, str(task)], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    answer, *files = json.loads(p.stdout.strip().splitlines()[-1])
    assert all(Path(f).resolve().is_relative_to(task.resolve()) for f in files), files
    assert answer["statusCode"] == 400 and "'k' must be" in json.loads(answer["body"])["error"]


def test_ship_uploads_by_content_under_moto(tmp_path, monkeypatch):
    "(d) `ship` uploads the artifacts and returns the template's parameters; same content, same keys; new content, new keys."
    import boto3
    from moto import mock_aws
    fake = tmp_path / "wh"; fake.mkdir()
    (fake / "WHEELHOUSE.json").write_text(json.dumps({"key": "k1"})); (fake / "x-1-py3-none-any.whl").write_bytes(b"x")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1"); s3.create_bucket(Bucket="code")
        first = bundle.ship(s3, "code", "ncf", tmp_path / "w1", wheels=fake, log=lambda m: None)
        template = (ROOT / "pipelines" / "template.yaml").read_text()
        assert set(first) == set(bundle.TEMPLATE_PARAMETERS) and all(f"\n  {k}:" in template for k in first)
        assert first["CodeBucket"] == "code"
        for k in ("LambdaCodeKey", "SourceKey"):
            body = s3.get_object(Bucket="code", Key=first[k])["Body"].read()
            assert hashlib.sha256(body).hexdigest()[:16] in first[k]
        wheel_key = s3.get_object(Bucket="code", Key="ncf/dist/LATEST")["Body"].read().decode()
        assert wheel_key.endswith(".whl") and s3.head_object(Bucket="code", Key=wheel_key)
        assert s3.head_object(Bucket="code", Key="ncf/wheels/k1/x-1-py3-none-any.whl")
        # EMR's job flow names the bootstrap and the wheel by these keys (pipelines/emr_job_flow.json, with ncf_version)
        flow = json.loads((ROOT / "pipelines" / "emr_job_flow.json").read_text())["BootstrapActions"][0]["ScriptBootstrapAction"]
        for uri in (flow["Path"], flow["Args"][0]):
            key = uri.split("}}/", 1)[1].replace("{{ var.value.ncf_version }}", bundle.ncf.__version__)
            assert s3.head_object(Bucket="code", Key=key), key
        assert bundle.ship(s3, "code", "ncf", tmp_path / "w2", wheels=fake, log=lambda m: None) == first   # same content
        changed = tmp_path / "lambdas.py"; changed.write_text((Path(bundle.ncf.__file__).parent / "pipeline" / "lambdas.py").read_text() + "\n# changed\n")
        real_zip = bundle.lambda_zip
        monkeypatch.setattr(bundle, "lambda_zip", lambda dest: bundle._zip(dest, {**dict(_members(real_zip(dest))), "lambdas.py": changed}))
        second = bundle.ship(s3, "code", "ncf", tmp_path / "w3", wheels=fake, log=lambda m: None)
        assert second["LambdaCodeKey"] != first["LambdaCodeKey"] and second["SourceKey"] == first["SourceKey"]


def _members(z: Path):
    "The files of zip `z`, unpacked beside it: (name, path) pairs."
    out = z.parent / (z.stem + "-members")
    with zipfile.ZipFile(z) as f: f.extractall(out); names = f.namelist()
    return [(n, out / n) for n in names]


def test_image_check_refuses_what_the_image_cannot_meet():
    "(e) A requirement the image's preinstalled versions or its Python exclude is refused, by name."
    with pytest.raises(bundle.ImageMismatch, match="numpy"): bundle.check_against_image(["numpy>=2"])          # training image: numpy<2
    with pytest.raises(bundle.ImageMismatch, match="torch"): bundle.check_against_image(["torch==2.6.0"])       # the image's torch is 2.5.1
    with pytest.raises(bundle.ImageMismatch, match="pyarrow requires Python"):
        bundle.check_against_image(["pyarrow>=15"], requires_python={"pyarrow": ">=3.12"})
    assert issubclass(bundle.ImageMismatch, NCFError)
    assert bundle.check_against_image(bundle.container_requirements()) == bundle.container_requirements()
