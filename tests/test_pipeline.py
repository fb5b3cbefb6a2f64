"""The local retrain pipeline end to end: caching, versions, the gate, deployment into a live endpoint, rollback."""
import json, multiprocessing as mp, socket, urllib.request
from pathlib import Path

import pytest

from helpers import SMALL_SHOP
from ncf.pipeline.retrain import deploy_local, run_local
from ncf.pipeline.params import PipelineParams
from ncf.pipeline.registry import LocalRegistry
from ncf.data.synthetic import next_day, write_days

# The small shop is learnable but noisy (about 200 test users): a trained model reaches HR@10 of about
# 0.28 against 0.09 for an untrained one, so the gate is set between the two with a wide tolerance.
FAST = {"epochs": 8, "full_ranking": False, "precision": "fp32"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def version_header(url: str) -> str:
    with urllib.request.urlopen(f"{url}/ping", timeout=10) as r:
        return r.headers["X-Model-Version"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("pipeline")
    write_days(SMALL_SHOP, work / "raw", 30)
    return work


def params(work: Path, url: str = "http://127.0.0.1:9", **hp) -> PipelineParams:
    return PipelineParams(data_uri=str(work / "raw"), work_dir=str(work), endpoint_url=url, hr_threshold=0.15, tolerance=0.15,
                          hyperparameters={**FAST, **hp})


def steps(result) -> dict:
    return {r.name: r for r in result.records}


def test_retrain_cycle(shop):
    from ncf.serve.client import launch
    reg = LocalRegistry(shop / "registry")
    first = run_local(params(shop))
    assert first.passed and first.version.version == 1 and first.version.status == "Approved"
    assert [r.name for r in first.records] == ["Preprocess", "Train", "Evaluate", "QualityGate", "RegisterApproved", "CreateModel", "Deploy"]
    assert reg.production("ncf").version == 1
    run_json = json.loads((first.run_dir / "run.json").read_text())
    assert run_json["steps"][1]["inputs"]["data_version"] == first.version.data_version

    again = run_local(params(shop))  # unchanged data: nothing trains, nothing new is registered
    s = steps(again)
    assert s["Preprocess"].status == "cached" and s["Train"].status == "cached"
    assert s["RegisterApproved"].status == "skipped" and "nothing new registered" in s["RegisterApproved"].note
    assert len(reg.versions("ncf")) == 1

    port = free_port(); url = f"http://127.0.0.1:{port}"
    server = launch(reg.production("ncf").model_uri, port=port)
    try:
        v1 = version_header(url)
        next_day(shop / "raw")  # a new day of logs arrives
        second = run_local(params(shop, url))
        assert second.passed and second.version.version == 2
        assert steps(second)["Train"].status == "ran"
        v2 = version_header(url)
        assert v2 == second.version.model_version != v1   # deployed into the running endpoint

        next_day(shop / "raw")
        rejected = run_local(params(shop, url, epochs=0))  # an untrained model must not pass the gate
        assert not rejected.passed and rejected.version.status == "Rejected"
        assert [r.name for r in rejected.records][-2:] == ["RegisterRejected", "Fail"]
        assert "below the threshold" in rejected.version.reason
        assert version_header(url) == v2 and reg.production("ncf").version == 2

        deploy_local(reg, "ncf", 1, url)  # rollback with one command
        assert version_header(url) == v1 and reg.production("ncf").version == 1
        with pytest.raises(Exception, match="only an Approved version"):
            deploy_local(reg, "ncf", 3, url)
    finally:
        server.terminate(); server.wait(timeout=30)


def _register(root, model_dir, q):
    q.put(LocalRegistry(root).register("race", model_dir, "PendingManualApproval").version)


def test_registry_is_safe_under_concurrent_runs(shop, tmp_path):
    model_dir = LocalRegistry(shop / "registry").versions("ncf")[0].model_uri
    q = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_register, args=(tmp_path / "reg", model_dir, q)) for _ in range(4)]
    for p in procs: p.start()
    for p in procs: p.join(60)
    assert sorted(q.get(timeout=5) for _ in procs) == [1, 2, 3, 4]


def test_bad_parameters_are_refused():
    with pytest.raises(Exception, match="unknown hyperparameters"):
        PipelineParams(hyperparameters={"epoch": 3})
    with pytest.raises(Exception, match="hr_threshold"):
        PipelineParams(hr_threshold=2)


def said(proc, text: str, timeout: float = 300) -> str:
    "Read `proc`'s output until a line contains `text`; fail if it ends or stays silent for `timeout` seconds."
    import select, time
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline() if ready else ""
        assert line, f"no {text!r} from pid {proc.pid} (exit {proc.poll()}): {seen}"
        seen += line
    return seen


def test_two_local_runs_on_one_work_directory_run_one_after_the_other(tmp_path):
    """Two `ncf_pipeline run --local` at once on the same work directory run one after the other, and say whom they wait for.
    The test itself holds the lock while both start (a retrain already running), so that both are certain to meet it
    however fast this machine trains."""
    import calendar, os, subprocess, sys, time
    from ncf.pipeline.retrain import retrain_lock
    write_days(SMALL_SHOP, tmp_path / "raw", 12)
    cmd = [sys.executable, "-m", "ncf.cli.pipeline", "run", "--local", "--data-uri", str(tmp_path / "raw"), "--work-dir", str(tmp_path / "work"),
           "--endpoint-url", "http://127.0.0.1:9", "--hr-threshold", "0", "--hp", "epochs=1", "--hp", "full_ranking=false", "--hp", "precision=fp32"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with retrain_lock(tmp_path / "work", log=print):
        runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
        try: waited = [said(p, "waiting for it to end") for p in runs]
        except BaseException:
            for p in runs: p.kill()
            raise
        assert all(f"pid {os.getpid()}" in w for w in waited), waited   # each names the holder
        assert not (tmp_path / "work" / "runs").exists()                # and neither has begun
    outs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outs
    dirs = sorted((tmp_path / "work" / "runs").iterdir())
    assert len(dirs) == 2
    first_run = json.loads((dirs[0] / "run.json").read_text())
    ended = (dirs[0] / "run.json").stat().st_mtime
    started = calendar.timegm(time.strptime(dirs[1].name[:15], "%Y%m%dT%H%M%S"))   # the run id is its start, in UTC
    assert started >= int(ended) - 1, (dirs[1].name, ended)   # the second began after the first had written its record
    assert first_run["steps"][0]["name"] == "Preprocess"
