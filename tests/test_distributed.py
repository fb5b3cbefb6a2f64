"""Training on 2 CPU processes under torchrun (gloo): the same steps as one process, reruns identical, a dead rank named and resumed from."""
import os, re, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import small_dataset
from ncf.model.modeldir import read_metrics

SMALL = ["--epochs", "2", "--batch_size", "64", "--factor_num", "8", "--num_layers", "2", "--full_ranking", "false",
         "--precision", "fp32", "--seed", "3"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ncf.cli.train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_dataset(tmp_path_factory.mktemp("distributed"))


def run(cmd, **kw):
    return subprocess.run([*cmd], capture_output=True, text=True, timeout=600, **kw)


def one_process(*args):
    return run([sys.executable, "-m", "ncf.cli.train", *map(str, args)])


def two_processes(*args, **kw):
    return run([*TORCHRUN, *map(str, args)], **kw)


def weights(model_dir: Path) -> dict:
    return load_file(model_dir / "model.safetensors")


def test_two_processes_at_half_the_batch_each_take_the_steps_of_one(data, tmp_path):
    "Dropout off: 2 ranks of 32 rows each step as 1 process of 64 rows; every parameter agrees within float summation order."
    args = ["--data", data, *SMALL, "--dropout", "0"]
    one, two = one_process(*args, "--model-dir", tmp_path / "one"), two_processes(*args, "--model-dir", tmp_path / "two")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    ma, mb = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [h["samples_per_s"] > 0 for h in mb["history"]] == [True, True]
    for ha, hb in zip(ma["history"], mb["history"]):
        assert abs(ha["loss"] - hb["loss"]) < 1e-5 and abs(ha["validation"]["hr"] - hb["validation"]["hr"]) <= 1/200
    # one log for the run: rank 0's, the metric lines once each
    assert [l.split(":")[0] for l in two.stdout.splitlines() if l.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert "rank 0 of 2 training processes" in two.stdout


def test_a_distributed_rerun_is_identical_with_dropout(data, tmp_path):
    "Each rank draws its dropout masks from a seeded stream of its own: two runs of the same command write the same bits."
    args = ["--data", data, *SMALL, "--dropout", "0.3"]
    for name in ("a", "b"):
        r = two_processes(*args, "--model-dir", tmp_path / name)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    "The pid of the training process of `rank` that `launcher` (torchrun) started, from its environment."
    for p in Path("/proc").iterdir():
        if not p.name.isdigit(): continue
        try:
            env = dict(kv.split("=", 1) for kv in (p / "environ").read_text().split("\0") if "=" in kv)
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError): continue
        if ppid == launcher.pid and env.get("RANK") == str(rank): return int(p.name)
    return None


def checkpoint_epoch(path: Path) -> int:
    "The epoch of the checkpoint at `path` (written atomically), 0 while there is none."
    return torch.load(path, weights_only=True)["epoch"] if path.exists() else 0


def test_a_dead_rank_ends_the_run_naming_it_and_the_rerun_resumes(data, tmp_path):
    "SIGKILL rank 1 after epoch 2's checkpoint: torchrun names rank 1 and its signal; the same command resumes and ends as a run never stopped."
    args = ["--data", data, *SMALL, "--epochs", "4", "--dropout", "0.3"]
    straight = two_processes(*args, "--model-dir", tmp_path / "straight", "--checkpoint-dir", tmp_path / "ck-straight")
    assert straight.returncode == 0, straight.stderr
    cmd = [*TORCHRUN, *map(str, [*args, "--model-dir", tmp_path / "resumed", "--checkpoint-dir", tmp_path / "ck"])]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in launcher.stdout:
        if line.startswith("epoch 2/"): break
    deadline = time.monotonic() + 30
    while checkpoint_epoch(tmp_path / "ck" / "last.pt") < 2 and time.monotonic() < deadline: time.sleep(0.05)   # written after epoch 2's line
    while (pid := rank_pid(launcher, 1)) is None and time.monotonic() < deadline: time.sleep(0.05)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, 9)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in err and "SIGKILL" in err   # torchrun's summary names the dead rank
    assert (tmp_path / "ck" / "last.pt").exists() and not (tmp_path / "resumed").exists()
    again = two_processes(*args, "--model-dir", tmp_path / "resumed", "--checkpoint-dir", tmp_path / "ck")
    assert again.returncode == 0, again.stderr
    assert 2 <= int(re.search(r"resumed from .* after epoch (\d+)", again.stdout).group(1)) < 4
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    strip = lambda m: [{k: v for k, v in h.items() if k not in ("seconds", "samples_per_s")} for h in m["history"]]
    assert strip(a) == strip(b) and a["test"] == b["test"]
    assert (tmp_path / "straight" / "model.safetensors").read_bytes() == (tmp_path / "resumed" / "model.safetensors").read_bytes()


def test_sparse_embeddings_are_refused_on_several_processes(data, tmp_path):
    r = two_processes("--data", data, *SMALL, "--sparse", "true", "--model-dir", tmp_path / "m")
    assert r.returncode != 0 and "--sparse does not run on several processes" in r.stderr
