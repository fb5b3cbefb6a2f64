"""The pipeline notebooks, run headless with papermill the way CI runs them: retrain, promote, roll back."""
import base64, json, re, subprocess
from pathlib import Path

import nbformat
import pytest
import yaml

from conftest import ROOT, venv_bin
from helpers import SMALL_SHOP
from ncf.model.modeldir import validate_metrics
from ncf.pipeline.registry import LocalRegistry
from ncf.serve.client import free_port
from ncf.data.synthetic import next_day, write_days


def papermill(nb: str, out: Path, cwd: Path, **params):
    "Run pipelines/NB.ipynb with papermill's CLI (as CI does) in `cwd`; return the completed process."
    args = [a for k, v in params.items() for a in ("-p", k, str(v))]
    return subprocess.run([venv_bin("papermill"), str(ROOT/"pipelines"/f"{nb}.ipynb"), str(out), *args, "--cwd", str(cwd)],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def outputs(path: Path) -> list:
    return [o for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" for o in c.outputs]


def text_of(path: Path) -> str:
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs(path))


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    "A small shop's logs, a work dir, and an endpoint URL nothing answers at (the deploys only record production)."
    d = tmp_path_factory.mktemp("papermill")
    write_days(SMALL_SHOP, d/"raw", 30)
    return {"dir": d, "raw": d/"raw", "work": d/"work", "url": f"http://127.0.0.1:{free_port()}"}


def retrain(shop, name: str, **params):
    out = shop["dir"]/f"{name}.ipynb"
    r = papermill("retrain", out, shop["dir"], data_uri=shop["raw"], work_dir="work", endpoint_url=shop["url"],
                  metrics_path=f"{name}-metrics.json", **params)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, shop["dir"]/f"{name}-metrics.json"


def test_retrain_notebook_reports_and_writes_metrics(shop):
    out, metrics_path = retrain(shop, "first", epochs=1, hr_threshold=0.05)
    nb = nbformat.read(out, as_version=4)
    assert "parameters" in nb.cells[1].metadata.tags and "injected-parameters" in nb.cells[2].metadata.tags
    # the training curves and the new-vs-production bars are real PNGs
    pngs = [base64.b64decode(o["data"]["image/png"]) for o in outputs(out) if "image/png" in o.get("data", {})]
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    text = text_of(out)
    assert "APPROVED" in text and "registered as v1 [Approved]" in text
    assert "users" in text and "test" in text           # the data summary
    m = validate_metrics(json.loads(metrics_path.read_text()))
    assert m["epochs_run"] == 1 and len(m["history"]) == 1
    assert m["evaluation"]["gate"]["passed"] and m["evaluation"]["production"] is None
    assert m["evaluation"]["new"]["hr"] == pytest.approx(m["test"]["hr"], abs=0.05)
    reg = LocalRegistry(shop["work"]/"registry")
    assert reg.production("ncf").version == 1


def test_retrain_on_new_day_then_roll_back_and_refuse_rejected(shop):
    next_day(shop["raw"])                                   # one more day of logs: new data, new model
    out, metrics_path = retrain(shop, "second", epochs=1, hr_threshold=0.05, tolerance=1.0)
    m = json.loads(metrics_path.read_text())
    assert m["evaluation"]["production"] is not None        # compared with v1 on the new test set
    reg = LocalRegistry(shop["work"]/"registry")
    assert [v.version for v in reg.versions("ncf")] == [1, 2] and reg.production("ncf").version == 2

    # roll back to v1
    r = papermill("deploy", shop["dir"]/"deploy-v1.ipynb", shop["dir"], version=1, work_dir="work", endpoint_url=shop["url"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert reg.production("ncf").version == 1
    assert "rolled back to v1 (was v2)" in text_of(shop["dir"]/"deploy-v1.ipynb")

    # a rejected version is refused, and production stays where it was
    reg.set_status("ncf", 2, "Rejected", "rejected by hand for the test")
    r = papermill("deploy", shop["dir"]/"deploy-v2.ipynb", shop["dir"], version=2, work_dir="work", endpoint_url=shop["url"])
    assert r.returncode != 0 and "only an Approved version can be deployed" in r.stderr
    assert reg.production("ncf").version == 1


def test_deploy_needs_a_version(tmp_path):
    r = papermill("deploy", tmp_path/"out.ipynb", tmp_path, work_dir="work")
    assert r.returncode != 0 and "set the parameter `version`" in r.stderr


def test_pipeline_notebooks_are_clean_and_parametrised(root):
    for name in ("retrain", "deploy"):
        nb = nbformat.read(root/"pipelines"/f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name}.ipynb has outputs: clear them"
        assert [c for c in code if "parameters" in c.metadata.get("tags", [])] == [code[0]]
        assert nb.metadata.kernelspec.name == "python3"


def test_pipeline_notebook_parameters_match_the_ci_job(root):
    "Each `-p NAME` the retrain and deploy jobs pass is a parameter of the notebook (papermill would only warn)."
    ci = yaml.safe_load((root/".gitlab-ci.yml").read_text())
    for job, nb in (("retrain", "retrain"), ("deploy", "deploy")):
        cmd = next(s for s in ci[job]["script"] if "papermill" in s)
        passed = set(re.findall(r"-[py] \"?(\w+)", cmd))
        cell = next(c for c in nbformat.read(root/"pipelines"/f"{nb}.ipynb", as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        declared = set(re.findall(r"^(\w+)\s*(?::[^=]+)?=", cell.source, re.M))
        assert passed and passed <= declared, (job, passed - declared)
