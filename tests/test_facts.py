"""One source for each fact. Python code imports it; what cannot import it (the CloudFormation template, the GitLab
CI file, the papermill notebook's parameters, the standalone Lambda module, the container requirements) is checked
against it here, so that changing a default in one place and forgetting another fails."""
import ast, configparser, inspect, json, re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from ncf.pipeline.params import PipelineParams

DEFAULTS = PipelineParams()


class _CfnLoader(yaml.SafeLoader): pass
_CfnLoader.add_multi_constructor("!", lambda loader, suffix, node: None)   # !Ref, !Sub ...: their values do not matter here


def template_defaults() -> dict:
    t = yaml.load((ROOT / "pipelines" / "template.yaml").read_text(), Loader=_CfnLoader)
    return {k: v.get("Default") for k, v in t["Parameters"].items()}


def notebook_parameters(path: Path) -> dict:
    "The papermill `parameters` cell's assignments, evaluated as literals."
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {n.target.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.AnnAssign)}


def test_the_gate_has_one_source():
    gate = {"hr_threshold": DEFAULTS.hr_threshold, "tolerance": DEFAULTS.tolerance}
    t = template_defaults()
    assert (float(t["HrThreshold"]), float(t["Tolerance"])) == (gate["hr_threshold"], gate["tolerance"])
    ci = yaml.safe_load((ROOT / ".gitlab-ci.yml").read_text())["variables"]
    assert (float(ci["NCF_HR_THRESHOLD"]), float(ci["NCF_TOLERANCE"])) == (gate["hr_threshold"], gate["tolerance"])
    nb = notebook_parameters(ROOT / "pipelines" / "retrain.ipynb")
    assert {k: nb[k] for k in gate} == gate
    from ncf.pipeline.evaluate import evaluate
    sig = inspect.signature(evaluate).parameters
    assert {k: sig[k].default for k in gate} == gate
    from ncf.cli.evaluate import parser
    a = parser().parse_args(["--model", "m", "--data", "d", "--out", "o"])
    assert {k: getattr(a, k) for k in gate} == gate


def test_instance_types_have_one_source():
    t = template_defaults()
    assert t["EndpointInstanceType"] == DEFAULTS.endpoint_instance_type
    from ncf.pipeline import lambdas
    assert lambdas.DEFAULT_INSTANCE_TYPE == DEFAULTS.endpoint_instance_type
    from ncf.pipeline.reports import open_registry
    from ncf.pipeline.sagemaker_registry import SageMakerRegistry
    for fn in (open_registry, SageMakerRegistry.__init__):
        defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items() if "instance_type" in n}
        assert set(defaults.values()) <= {DEFAULTS.endpoint_instance_type, None, inspect.Parameter.empty}, (fn, defaults)


def test_the_container_requirements_are_the_core_requirements():
    "What the training, processing and serving containers install is read from the package's own requirements."
    cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
    core = {r for r in cfg["DEFAULT"]["requirements"].split() if not r.startswith("torch")}
    from ncf.pipeline import sagemaker as nsm
    from ncf.serve import package
    serve = set(cfg["DEFAULT"]["serve_requirements"].split())
    assert core <= set(nsm.CONTAINER_REQUIREMENTS) <= core | serve | {r for r in cfg["DEFAULT"]["requirements"].split() if r.startswith("torch")}
    assert set(package.REQUIREMENTS) <= set(nsm.CONTAINER_REQUIREMENTS)   # one list for every container


def test_model_directory_file_names_are_written_once():
    "Outside `ncf.model.layout`, no module spells a model directory's file name."
    from ncf.model import layout
    names = {layout.WEIGHTS, layout.CONFIG, layout.USERS, layout.SEEN, layout.METRICS}
    found = []
    for py in (ROOT / "ncf").rglob("*.py"):
        if py.name in ("layout.py", "_modidx.py"): continue
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Constant) and node.value in names: found.append(f"{py.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_the_metric_definitions_read_the_trainers_own_line():
    from ncf.train.config import METRIC_DEFINITIONS, metric_line
    line = "epoch 3/10: " + metric_line(hr=0.6123, ndcg=0.3456, loss=0.2789) + " (12.0s)"
    found = {name: float(re.search(rx, line).group(1)) for name, rx in METRIC_DEFINITIONS}
    assert found == {"HR": 0.6123, "NDCG": 0.3456, "Loss": 0.2789}
    from ncf.pipeline import sagemaker as nsm
    assert nsm.METRICS == METRIC_DEFINITIONS


def test_the_approval_rule_is_written_once():
    "Only `ncf.pipeline.registry.check_deployable` compares a status with Approved to let a version into production."
    found = []
    for py in (ROOT / "ncf").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.NotEq) for op in node.ops) \
               and any(isinstance(c, ast.Constant) and c.value == "Approved" for c in node.comparators):
                found.append(f"{py.relative_to(ROOT)}:{node.lineno}")
    assert len(found) == 1 and found[0].startswith("ncf/pipeline/registry.py"), found
