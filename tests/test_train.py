"""Training entry point: SageMaker environment, bitwise resume after a kill, pre-training, bad input."""
import dataclasses, json, os, re, signal, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import small_dataset
from ncf.data.dataset import load_splits
from ncf.model.modeldir import load_model_dir, read_metrics
from ncf.train.trainer import NegativeSampler, train
from ncf.train.config import TrainConfig

FAST = ["--batch_size", "512", "--factor_num", "8", "--num_layers", "2", "--full_ranking", "false", "--precision", "fp32"]
# the recommended fast path: large batches (split first layer), bf16 autocast, SplitMix64 dropout masks
LARGE_BF16 = ["--batch_size", "4096", "--lr_scaling", "sqrt", "--precision", "bf16", "--full_ranking", "false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_dataset(tmp_path_factory.mktemp("train"))


def run_train(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "ncf.cli.train", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, **kw)


def test_sagemaker_environment(data, tmp_path):
    env = {"SM_CHANNEL_TRAIN": str(data), "SM_MODEL_DIR": str(tmp_path / "model"), "SM_OUTPUT_DATA_DIR": str(tmp_path / "output")}
    # SageMaker passes hyperparameters as --name value pairs, and may pass ones we do not know
    r = run_train("--epochs", "2", *FAST, "--sparse", "false", "--some_platform_flag", "x", env=env)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2
    for l in lines:  # SageMaker metric definitions parse these with regexes
        hr, ndcg, loss = (float(re.search(p, l).group(1)) for p in (r"HR=(.*?);", r"NDCG=(.*?);", r"Loss=(.*?);"))
        assert 0 <= hr <= 1 and 0 <= ndcg <= hr and loss > 0
    md = load_model_dir(tmp_path / "model")
    assert md.data_version == load_splits(data).data_version
    assert json.loads((tmp_path / "output" / "metrics.json").read_text())["best_epoch"] == md.metrics["best_epoch"]
    assert "ignoring unknown arguments ['--some_platform_flag', 'x']" in r.stderr


def test_epochs_zero_writes_the_untrained_model(data, tmp_path):
    r = run_train("--data", data, "--model-dir", tmp_path / "m", "--epochs", "0", *FAST)
    assert r.returncode == 0, r.stderr
    m = read_metrics(tmp_path / "m")
    assert m["best_epoch"] == 0 and m["history"] == []
    assert m["test"]["hr"] < 0.5  # an untrained model ranks close to chance


def kill_after_epoch(cmd, epoch: int):
    "Start a training run and SIGKILL it as soon as it reports `epoch`."
    p = subprocess.Popen([sys.executable, "-m", "ncf.cli.train", *map(str, cmd)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.startswith(f"epoch {epoch}/"):
            p.send_signal(signal.SIGKILL); break
    p.wait(timeout=60)
    return p.returncode


@pytest.mark.parametrize("config", [FAST, LARGE_BF16], ids=["fp32", "large-batch-bf16"])
def test_killed_run_resumes_bitwise(data, tmp_path, config):
    common = ["--data", data, "--epochs", "4", "--seed", "3", *config]
    assert run_train(*common, "--model-dir", tmp_path / "straight", "--checkpoint-dir", tmp_path / "ck1").returncode == 0
    assert kill_after_epoch([*common, "--model-dir", tmp_path / "resumed", "--checkpoint-dir", tmp_path / "ck2"], 2) == -signal.SIGKILL
    assert (tmp_path / "ck2" / "last.pt").exists() and not (tmp_path / "resumed").exists()
    r = run_train(*common, "--model-dir", tmp_path / "resumed", "--checkpoint-dir", tmp_path / "ck2")
    assert r.returncode == 0 and "resumed from" in r.stdout
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    strip = lambda m: [{k: v for k, v in h.items() if k not in ("seconds", "samples_per_s")} for h in m["history"]]
    assert strip(a) == strip(b) and a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]
    assert (tmp_path / "straight" / "model.safetensors").read_bytes() == (tmp_path / "resumed" / "model.safetensors").read_bytes()
    state = torch.load(tmp_path / "ck2" / "last.pt", weights_only=True)  # checkpoints load without unpickling code
    assert state["epoch"] == 4


def test_neumf_pretraining(data, tmp_path):
    for model in ("GMF", "MLP"):
        assert run_train("--data", data, "--model-dir", tmp_path / model, "--model", model, "--epochs", "1", *FAST).returncode == 0
    r = run_train("--data", data, "--model-dir", tmp_path / "neu", "--epochs", "1", *FAST,
                  "--gmf_pretrain", tmp_path / "GMF", "--mlp_pretrain", tmp_path / "MLP")
    assert r.returncode == 0, r.stderr
    neu, gmf = load_model_dir(tmp_path / "neu"), load_model_dir(tmp_path / "GMF")
    assert neu.config["train"]["gmf_pretrain"] == str(tmp_path / "GMF")
    assert neu.model.embed_user_GMF.weight.shape == gmf.model.embed_user_GMF.weight.shape


@pytest.mark.parametrize("selects", ["last epoch", "epoch 0"])
def test_pretrain_flag_trains_gmf_and_mlp_and_keeps_validation_clean(data, tmp_path, monkeypatch, selects):
    import ncf.train.trainer as T
    # Validation's choice is fixed here: which epoch wins depends on the CPU's trajectory, the protocol must not
    monkeypatch.setattr(T, "_better", (lambda a, b: True) if selects == "last epoch" else (lambda a, b: b is None))
    refits = selects == "last epoch"   # a model selected at epoch 0 has nothing to refit
    calls, pre = [], {}
    build, pretrain = T.build_model, T.pretrain
    def spy_build(cfg, n_users, n_items, pretrained=None):
        calls.append((cfg.model, pretrained)); return build(cfg, n_users, n_items, pretrained)
    def spy_pretrain(*a, **kw):
        pre.update(pretrain(*a, **kw)); return pre
    monkeypatch.setattr(T, "build_model", spy_build); monkeypatch.setattr(T, "pretrain", spy_pretrain)
    cfg = TrainConfig(epochs=2, batch_size=512, factor_num=8, num_layers=2, full_ranking=False, pretrain=True)
    lines = []
    r = train(load_splits(data), cfg, checkpoint_dir=tmp_path / "ck", log=lines.append)
    assert set(r.metrics["pretrain"]) == {"GMF", "MLP"} and ("refit" in r.metrics) == refits
    assert r.metrics["best_epoch"] == (2 if refits else 0)
    assert all(bool(p.metrics.get("refit")) == refits and (p.selected is not p.model) == refits for p in pre.values())
    # NeuMF's epochs are chosen starting from GMF/MLP trained on the training interactions only...
    neumf = [p for model, p in calls if model == "NeuMF"]
    assert len(neumf) == (2 if refits else 1) and neumf[0][0] is pre["GMF"].selected and neumf[0][1] is pre["MLP"].selected
    # ...and only its refit on train + validation starts from their refits
    if refits: assert neumf[1][0] is pre["GMF"].model and neumf[1][1] is pre["MLP"].model
    assert (tmp_path / "ck" / "pretrain-GMF" / "last.pt").exists() and (tmp_path / "ck" / "pretrain-MLP" / "last.pt").exists()
    # SageMaker's metric regexes see NeuMF's epochs only
    assert sum("HR=" in l for l in lines) == 2 and any(l.startswith("GMF pre-training: epoch 1/2") for l in lines)
    # a second run with the same checkpoints resumes everything and ends with the same model
    again = train(load_splits(data), cfg, checkpoint_dir=tmp_path / "ck", log=lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), again.model.state_dict().values()))
    assert again.metrics["test"] == r.metrics["test"]


def test_a_short_refit_continues_the_selected_model_and_skips_the_pretrainings_refits(data, monkeypatch):
    import ncf.train.trainer as T
    monkeypatch.setattr(T, "_better", lambda a, b: True)   # the last epoch wins, whatever this CPU's trajectory
    cfg = TrainConfig(epochs=2, batch_size=512, factor_num=8, num_layers=2, full_ranking=False, pretrain=True, refit_epochs=1)
    lines = []
    r = train(load_splits(data), cfg, log=lines.append)
    assert {k: r.metrics["refit"][k] for k in ("epochs", "from")} == {"epochs": 1, "from": "selected"}
    assert r.selected is not r.model and len(r.pairs[0]) == r.metrics["refit"]["interactions"]
    # the selected NeuMF is kept as selected: the refit trained a copy
    assert any(not torch.equal(a, b) for a, b in zip(r.selected.state_dict().values(), r.model.state_dict().values()))
    # NeuMF's refit no longer starts from the GMF and MLP refits, so they are not trained
    assert not any("pre-training: refit" in l for l in lines) and any(l.startswith("GMF pre-training: epoch 2/2") for l in lines)
    assert sum(l.startswith("refit epoch") for l in lines) == 1


@pytest.mark.parametrize("cpu, model, expected", [("avx512", "NeuMF", "bf16"), ("none", "NeuMF", "fp32"), ("avx512", "GMF", "fp32")])
def test_auto_precision_follows_the_cpu_kind_and_says_why(data, tmp_path, cpu, model, expected):
    # NCF_CPU_BF16 stands in for /proc/cpuinfo, so that each CPU kind's choice is checked on any machine
    r = run_train("--data", data, "--model-dir", tmp_path / "m", "--output-data-dir", tmp_path / "out", "--epochs", "1", "--model", model,
                  "--batch_size", "4096", "--lr_scaling", "sqrt", "--full_ranking", "false", env={"NCF_CPU_BF16": cpu})
    assert r.returncode == 0, r.stderr
    chosen = json.loads((tmp_path / "out" / "metrics.json").read_text())["precision"]
    assert chosen["autocast"] == expected and chosen["reason"].startswith("auto: ")
    assert read_metrics(tmp_path / "m")["precision"] == chosen
    assert f"precision: {expected} ({chosen['reason']})" in r.stdout


def test_unknown_cpu_kind_override_is_a_clear_error(data, tmp_path):
    r = run_train("--data", data, "--model-dir", tmp_path / "m", "--epochs", "1", *FAST[:-2], env={"NCF_CPU_BF16": "avx9"})
    assert r.returncode == 2 and "NCF_CPU_BF16 must be amx, avx512 or none, got 'avx9'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, message", [
    (["--lr", "-0.1"], "lr must be > 0"),
    (["--num_layers", "0"], "num_layers must be in 1..8"),
    (["--factor_num", "0"], "factor_num must be >= 1"),
    (["--model", "SVD"], "model must be one of"),
    (["--gmf_pretrain", "/nonexistent"], "needs both gmf_pretrain and mlp_pretrain"),
    (["--pretrain", "--model", "GMF"], "pretrain applies to --model NeuMF only"),
    (["--dropout", "0.001"], "dropout is applied in steps of 1/256"),
])
def test_bad_hyperparameters_fail_before_training(data, tmp_path, args, message):
    r = run_train("--data", data, "--model-dir", tmp_path / "m", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


def test_mismatched_pretrained_model_dir_is_refused(data, tmp_path):
    assert run_train("--data", data, "--model-dir", tmp_path / "GMF", "--model", "GMF", "--epochs", "0", *FAST).returncode == 0
    (tmp_path / "GMF" / "seen.parquet").write_bytes(b"damaged")
    r = run_train("--data", data, "--model-dir", tmp_path / "neu", "--epochs", "1", *FAST,
                  "--gmf_pretrain", tmp_path / "GMF", "--mlp_pretrain", tmp_path / "GMF")
    assert r.returncode == 2 and "do not match their hash" in r.stderr


def test_data_without_test_rows_is_refused(data, tmp_path):
    import shutil
    bad = tmp_path / "bad"; shutil.copytree(data, bad)
    for t in ("test", "test_negatives"):
        pd.read_parquet(bad / f"{t}.parquet").iloc[:0].to_parquet(bad / f"{t}.parquet")
    r = run_train("--data", bad, "--model-dir", tmp_path / "m", "--epochs", "1")
    assert r.returncode == 2 and "no test rows" in r.stderr


def test_raw_ratings_file_is_preprocessed_with_defaults(ml100k, tmp_path):
    r = run_train("--data", ml100k, "--model-dir", tmp_path / "m", "--epochs", "0", *FAST)
    assert r.returncode == 0, r.stderr
    assert "943" in r.stdout and load_model_dir(tmp_path / "m").model.cfg.n_items == 1682


def test_raw_logs_leave_no_preprocessed_copy_behind(tmp_path):
    from helpers import SMALL_SHOP
    from ncf.data.synthetic import write_days
    raw, tmp = tmp_path / "raw", tmp_path / "tmp"; tmp.mkdir()
    write_days(SMALL_SHOP, raw, 30)
    r = run_train("--data", raw, "--model-dir", tmp_path / "m", "--epochs", "1", *FAST, env={"TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr
    assert "users" in r.stdout and load_model_dir(tmp_path / "m").model.cfg.n_items > 0   # it was preprocessed...
    assert not list(tmp.glob("ncf-data-*"))                                                # ...and the copy removed
    bad = tmp_path / "bad.csv"; bad.write_text("user_id,item_id,timestamp\nu1,i1,notatime\n")
    r = run_train("--data", bad, "--model-dir", tmp_path / "m2", "--epochs", "1", *FAST, env={"TMPDIR": str(tmp)})
    assert r.returncode == 2 and "timestamp" in r.stderr, r.stderr                       # an error in preprocessing...
    assert not list(tmp.glob("ncf-data-*"))                                                # ...leaves nothing either


def test_a_log_gets_plain_progress_lines_and_the_metric_lines_stay_alone(data, tmp_path):
    # not a terminal (SageMaker's logs): a line per NCF_PROGRESS_SECONDS on stderr, none in stdout's metric lines
    r = run_train("--data", data, "--model-dir", tmp_path / "m", "--epochs", "1", *FAST, "--full_ranking", "true", env={"NCF_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("NeuMF epoch 1/1: ")]
    assert len(lines) > 1 and "(100%)" in lines[-1] and "samples/s" in lines[-1], r.stderr[-500:]
    assert any(l.startswith("full-ranking evaluation: ") for l in r.stderr.splitlines())
    assert not any("samples (" in l for l in r.stdout.splitlines()) and sum(l.startswith("epoch ") for l in r.stdout.splitlines()) == 1
    quiet = run_train("--data", data, "--model-dir", tmp_path / "m2", "--epochs", "1", *FAST)   # a short run: no progress at all
    assert quiet.returncode == 0 and "samples (" not in quiet.stderr


def test_sampler_never_emits_a_training_positive():
    rng = np.random.default_rng(0)
    u = torch.as_tensor(rng.integers(0, 50, 3000)); i = torch.as_tensor(rng.integers(0, 60, 3000))
    s = NegativeSampler(u, i, 60)
    nu, ni = s.sample(u, 8, torch.Generator().manual_seed(1))
    positives = set(zip(u.tolist(), i.tolist()))
    assert len(nu) == 8 * len(u) and not any(p in positives for p in zip(nu.tolist(), ni.tolist()))


def test_recency_weighting_is_recorded_and_can_be_turned_off(data, tmp_path):
    for name, extra in (("weighted", []), ("plain", ["--recency_weight", "1"])):
        r = run_train("--data", data, "--model-dir", tmp_path / name, "--epochs", "1", "--refit", "false", *FAST, *extra)
        assert r.returncode == 0, r.stderr
    cfg = {n: json.loads((tmp_path / n / "config.json").read_text()) for n in ("weighted", "plain")}
    assert cfg["weighted"]["train"]["recency_weight"] == TrainConfig().recency_weight > 1 and cfg["plain"]["train"]["recency_weight"] == 1
    loss = {n: read_metrics(tmp_path / n)["history"][0]["loss"] for n in cfg}
    assert loss["weighted"] != loss["plain"]   # the weights reach the loss


def test_runs_started_together_share_the_cores(data, tmp_path):
    "Two training runs at once, while this test holds a third slot (as another run would): each takes its share of the cores, never all of them."
    from ncf.train.threads import CpuShare, usable_cores
    slots, cores = tmp_path / "slots", usable_cores()
    other = CpuShare(directory=slots)
    try:
        runs = [subprocess.Popen([sys.executable, "-m", "ncf.cli.train", "--data", str(data), "--model-dir", str(tmp_path / f"m{k}"), "--epochs", "2", *FAST],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NCF_CPU_SLOTS": str(slots)}) for k in range(2)]
        outs = [p.communicate(timeout=600) for p in runs]
    finally: other.close()
    for p, (out, err) in zip(runs, outs):
        assert p.returncode == 0, err
        threads, seen = map(int, re.search(r"^threads: (\d+) \((\d+) training run\(s\) share \d+ cores\)$", out, re.M).groups())
        assert seen >= 2 and threads == max(1, cores // seen)
        assert threads < cores or cores == 1
    r = run_train("--data", data, "--model-dir", tmp_path / "asked", "--epochs", "1", *FAST, "--threads", "3", env={"NCF_CPU_SLOTS": str(slots)})
    assert r.returncode == 0 and "threads: 3 (--threads)" in r.stdout, r.stderr


def test_mf_trains_saves_and_serves(data, tmp_path):
    "The rival through the whole path: `ncf_train --model MF` (L2, 8 negatives), its model directory, and the SageMaker handler ranking as PyTorch does."
    from ncf.model.nets import score_matrix
    from ncf.serve.inference import model_fn
    r = run_train("--data", data, "--model-dir", tmp_path / "mf", "--model", "MF", "--epochs", "2", "--num_ng", "8", "--weight_decay", "1e-6", *FAST)
    assert r.returncode == 0, r.stderr
    m = read_metrics(tmp_path / "mf")
    assert m["history"][1]["loss"] < m["history"][0]["loss"]
    rec = model_fn(tmp_path / "mf")
    assert rec.md.model.cfg.model == "MF" and not hasattr(rec.md.model, "predict_layer")
    reference = score_matrix(rec.md.model.eval(), torch.arange(len(rec.users))).numpy()
    np.testing.assert_allclose(np.stack([rec.scorer.logits(u) for u in range(len(rec.users))]), reference, rtol=1e-4, atol=1e-4)


def test_large_tables_get_sparse_embeddings_automatically(data, monkeypatch):
    "`--sparse auto`: from SPARSE_FROM_ROWS users + items the tables are sparse (SparseAdam), below it dense; either way the run trains."
    import ncf.train.sparse as sparse
    from torch import nn
    s = load_splits(data); rows = s.n_users + s.n_items
    cfg = TrainConfig(epochs=2, batch_size=512, factor_num=8, num_layers=2, full_ranking=False, precision="fp32", refit=False)
    for threshold, expected in ((rows, True), (rows + 1, False)):
        monkeypatch.setattr(sparse, "SPARSE_FROM_ROWS", threshold)
        r = train(s, cfg, log=lambda msg: None)
        assert r.metrics["embeddings"]["sparse"] is expected, r.metrics["embeddings"]
        assert [m.sparse for m in r.model.modules() if isinstance(m, nn.Embedding)] == [expected] * 4
        losses = [h["loss"] for h in r.metrics["history"]]
        assert losses[1] < losses[0] and r.metrics["test"]["hr"] > 0
    weighted = train(s, dataclasses.replace(cfg, weight_decay=1e-6), log=lambda msg: None)   # an L2 penalty keeps every row dense
    assert weighted.metrics["embeddings"] == {"sparse": False, "reason": "auto: weight_decay needs every row updated at every step"}


def test_full_ranking_of_a_sample_of_users_says_so(data, tmp_path):
    "--full_ranking_users N below the test users: a seeded sample of N, its size and 95% confidence intervals in metrics.json and the log."
    r = run_train("--data", data, "--model-dir", tmp_path / "m", "--epochs", "1", *FAST, "--full_ranking", "true", "--full_ranking_users", "50")
    assert r.returncode == 0, r.stderr
    full = read_metrics(tmp_path / "m")["test_full"]
    assert full["users"] == 50 and full["of"] > 50 and set(full["ci95"]) == {"hr", "ndcg", "recall"}
    assert 0 <= full["hr"] <= 1 and full["ci95"]["hr"] <= 1.96 * 0.5 * (50 / 49) ** 0.5 / 50 ** 0.5 + 1e-9   # a 0/1 metric: sd <= 1/2
    assert f"(a sample of 50 of {full['of']:,} users; 95% CI of HR ±" in r.stdout
