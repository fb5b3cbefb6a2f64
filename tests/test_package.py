"""`ncf_package` and the archive as SageMaker's PyTorch serving container uses it: unpacked into a fresh
directory and imported from code/ in a process where ncf is not installed."""
import hashlib
import inspect
import json
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
from pathlib import Path

import pytest

from conftest import venv_bin
from ncf.serve.inference import model_fn as repo_model_fn
from ncf.model.modeldir import FILES, MANIFEST
from serve_helpers import damaged_copy, trained_models


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg")
    r = subprocess.run([venv_bin("ncf_package"), str(trained_models()["a"]), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "packaged" in r.stdout
    return out / "model.tar.gz"


def unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as t: t.extractall(dest, filter="data")
    return dest


def test_layout(archive):
    with tarfile.open(archive) as t:
        names = t.getnames()
        reqs = t.extractfile("code/requirements.txt").read().decode()
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in t.getmembers())
    assert names[:7] == [*FILES, MANIFEST]                      # model files at the root
    assert "code/inference.py" in names and "code/ncf/__init__.py" in names
    assert {"code/ncf/serve/inference.py", "code/ncf/model/nets.py", "code/ncf/model/modeldir.py", "code/ncf/core.py"} <= set(names)
    assert not {"code/ncf/train/trainer.py", "code/ncf/serve/app.py", "code/ncf/data/spark.py"} & set(names)
    lines = [l.split(">")[0].split("=")[0].split("<")[0].strip() for l in reqs.splitlines() if l and not l.startswith("#")]
    assert "torch" not in lines and "numpy" not in lines and {"pandas", "pyarrow", "safetensors"} <= set(lines)


def test_archive_is_reproducible(archive, tmp_path):
    again = tmp_path / "again.tar.gz"
    assert subprocess.run([venv_bin("ncf_package"), str(trained_models()["a"]), str(again)], capture_output=True).returncode == 0
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(archive.read_bytes()).digest()


def test_damaged_model_is_not_packaged(tmp_path):
    bad = damaged_copy(trained_models()["a"], tmp_path / "bad", "config.json")
    r = subprocess.run([venv_bin("ncf_package"), str(bad), str(tmp_path / "out.tar.gz")], capture_output=True, text=True)
    assert r.returncode == 2 and "do not match their hash" in r.stderr
    assert not (tmp_path / "out.tar.gz").exists()


# The container's side. `python -S` skips site-packages' .pth files, so the editable install of ncf
# (a meta-path finder installed by a .pth) is not there; site-packages itself is put back for torch.
CONTAINER = textwrap.dedent("""
    import importlib.util, inspect, json, os, sys
    sys.path.append({site!r})
    assert importlib.util.find_spec("ncf") is None, "ncf is installed in this process"
    fake = {fake!r}
    if fake: sys.path.append(fake)      # a stand-in for the container's sagemaker_inference package
    code = os.path.abspath("code")
    sys.path.insert(0, code)            # what the container does with /opt/ml/model/code
    import inference, ncf
    assert os.path.realpath(ncf.__file__).startswith(code + os.sep), ncf.__file__
    arity = {{f: len(inspect.signature(getattr(inference, f)).parameters) for f in ("model_fn", "input_fn", "predict_fn", "output_fn")}}
    model = inference.model_fn(os.getcwd())
    out = {{"ncf_file": ncf.__file__, "arity": arity, "results": [], "errors": []}}
    for body, ctype in json.loads(sys.stdin.read()):
        try:
            data = inference.input_fn(body, ctype)
            out["results"].append(json.loads(inference.output_fn(inference.predict_fn(data, model), "application/json")))
        except Exception as e:
            out["errors"].append([type(e).__name__, getattr(e, "status_code", getattr(e, "status", None)), str(e)])
    print(json.dumps(out))
""")


def run_in_container(model_root: Path, requests: list, fake_toolkit: Path | None = None) -> subprocess.CompletedProcess:
    script = CONTAINER.format(site=sysconfig.get_paths()["purelib"], fake=str(fake_toolkit) if fake_toolkit else "")
    return subprocess.run([sys.executable, "-S", "-c", script], cwd=model_root, input=json.dumps(requests),
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "NCF_SMALL": "1"})


def test_handler_in_the_container_layout(archive, tmp_path):
    root = unpack(archive, tmp_path / "opt-ml-model")
    rec = repo_model_fn(trained_models()["a"])
    users, items = rec.users.ids, rec.items.ids
    seed = {"user": [users[3]] * 25, "item": items[:25]}
    batch = [{"user": users[5], "item": items[10:20], "top_k": 3, "return_scores": True}, {"user": users[6], "item": items[:4]}]
    r = run_in_container(root, [[json.dumps(seed), "application/json"], [json.dumps(batch).encode().decode(), "application/json"]])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ncf_file"].startswith(str(root / "code" / "ncf"))
    assert out["arity"] == {"model_fn": 1, "input_fn": 2, "predict_fn": 2, "output_fn": 2}
    assert out["errors"] == []
    assert out["results"][0] == rec.rank(users[3], items[:25])     # same answer as the repository's package
    assert out["results"][1][0]["items"] == rec.rank(users[5], items[10:20], 3)
    assert out["results"][1][1] == rec.rank(users[6], items[:4])


def test_client_errors_become_toolkit_errors_with_their_status(archive, tmp_path):
    root = unpack(archive, tmp_path / "opt-ml-model")
    fake = tmp_path / "toolkit"
    (fake / "sagemaker_inference").mkdir(parents=True)
    (fake / "sagemaker_inference" / "__init__.py").write_text("")
    (fake / "sagemaker_inference" / "errors.py").write_text(textwrap.dedent("""
        class BaseInferenceToolkitError(Exception):
            def __init__(self, status_code, message, phrase):
                self.status_code, self.message, self.phrase = status_code, message, phrase
                super().__init__(status_code, message, phrase)
        class GenericInferenceToolkitError(BaseInferenceToolkitError):
            def __init__(self, status_code, message=None, phrase=None):
                super().__init__(status_code, message or "Invalid Request", phrase or message)
    """))
    user = repo_model_fn(trained_models()["a"]).users.ids[0]
    r = run_in_container(root, [['{"user": 1', "application/json"],
                                [json.dumps({"user": [user, "someone-else"], "item": ["SKU-000000", "SKU-000001"]}), "application/json"],
                                ["user=1", "text/csv"]], fake_toolkit=fake)
    assert r.returncode == 0, r.stderr
    errors = json.loads(r.stdout)["errors"]
    assert [(e[0], e[1]) for e in errors] == [("GenericInferenceToolkitError", 400)] * 2 + [("GenericInferenceToolkitError", 415)]
    assert "must repeat one user id" in errors[1][2]   # an unknown item is no error any more (a cold start), a malformed body is


def test_a_tampered_archive_does_not_load(archive, tmp_path):
    root = unpack(archive, tmp_path / "opt-ml-model")
    (root / "items.parquet").write_bytes((root / "items.parquet").read_bytes()[:-10])
    r = run_in_container(root, [])
    assert r.returncode != 0 and "ModelError" in r.stderr and "do not match their hash" in r.stderr


def test_entry_point_signatures_match_the_package():
    from ncf.serve import inference
    for f in ("model_fn", "input_fn", "predict_fn", "output_fn"):
        assert len(inspect.signature(getattr(inference, f)).parameters) == (1 if f == "model_fn" else 2)
