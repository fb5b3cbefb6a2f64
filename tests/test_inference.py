"""The inference path on trained models: numpy scoring against PyTorch, the SageMaker handler chain,
unknown ids and cold start, and client errors that name what is wrong. (The business rules of a
recommendation, seen items, exclude list, categories, k, are the gateway's: tests/test_realtime.py.)"""
import json

import numpy as np
import pytest
import torch

from ncf.core import ModelError, RequestError
from ncf.serve.inference import Recommender, input_fn, model_fn, output_fn, predict_fn
from ncf.model.nets import score_matrix
from serve_helpers import damaged_copy, int_model, trained_models


@pytest.fixture(scope="module")
def rec() -> Recommender:
    return model_fn(trained_models()["a"])


@pytest.fixture(scope="module")
def torch_scores(rec) -> np.ndarray:
    "Logits of every (user, item) pair from the PyTorch model: the reference for ranking."
    m = rec.md.model.eval()
    return score_matrix(m, torch.arange(len(rec.users))).numpy()


def handle(rec, body, content_type="application/json", accept="application/json"):
    "The SageMaker container's call sequence for one request."
    return json.loads(output_fn(predict_fn(input_fn(body, content_type), rec), accept))


def test_numpy_scores_equal_pytorch(rec, torch_scores):
    ours = np.stack([rec.scorer.logits(u) for u in range(len(rec.users))])
    np.testing.assert_allclose(ours, torch_scores, rtol=1e-4, atol=1e-4)
    forward = rec.md.model(torch.tensor([3, 3]), torch.tensor([7, 11])).detach().numpy()
    np.testing.assert_allclose(rec.scorer.logits(3, np.array([7, 11])), forward, rtol=1e-4, atol=1e-5)


def test_seed_contract_ranks_by_model(rec, torch_scores):
    rng = np.random.default_rng(0)
    for u in rng.choice(len(rec.users), 20, replace=False):
        cand = rng.choice(len(rec.items), 25, replace=False)
        user_id, item_ids = rec.users.ids[u], [rec.items.ids[i] for i in cand]
        got = handle(rec, json.dumps({"user": [user_id] * 25, "item": item_ids}).encode())
        expected = [item_ids[j] for j in np.argsort(-torch_scores[u, cand], kind="stable")]
        assert got == expected


def test_batch_top_k_and_scores(rec, torch_scores):
    users, items = rec.users.ids[:3], rec.items.ids[:12]
    body = json.dumps([{"user": u, "item": items, "top_k": 5, "return_scores": True} for u in users])
    got = handle(rec, body)  # a str body, as the container passes a decoded JSON body
    assert len(got) == 3
    for u, r in enumerate(got):
        assert len(r["items"]) == len(r["scores"]) == 5
        assert r["scores"] == sorted(r["scores"], reverse=True)
        idx = [rec.items.index[i] for i in r["items"]]
        np.testing.assert_allclose(r["scores"], 1 / (1 + np.exp(-torch_scores[u, idx])), rtol=1e-4)


def test_charset_and_any_accept(rec):
    body = {"user": rec.users.ids[0], "item": rec.items.ids[:3]}
    assert len(handle(rec, json.dumps(body), "application/json; charset=utf-8", "*/*")) == 3


def test_integer_catalogue_takes_numeric_strings():
    r = model_fn(int_model())
    got = handle(r, json.dumps({"user": ["11", 11, 11], "item": ["105", 100, 109]}))
    assert sorted(got) == [100, 105, 109] and all(type(i) is int for i in got)
    assert r.rank("21", [100, 101], details=True)["unknown_user"] is False   # user 21 exists: "21" is the integer id
    assert r.rank("x21", [100, 101], details=True)["unknown_user"] is True


@pytest.mark.parametrize("body,status,fragment", [
    (b'{"user": [1, 2', 400, "malformed JSON"),
    (b'', 400, "malformed JSON"),
    (b'"text"', 400, "expected an object"),
    (b'[]', 400, "empty batch"),
    (b'{"user": [], "item": []}', 400, "'item' must be a non-empty array"),
    (b'{"user": "C0000000", "item": []}', 400, "non-empty array"),
    (b'{"user": ["C0000000"], "item": ["SKU-000000", "SKU-000001"]}', 400, "'user' has 1 ids and 'item' 2"),
    (b'{"user": {"id": 1}, "item": ["SKU-000000"]}', 400, "'user' must be an id"),
    (b'{"user": "C0000000", "item": "SKU-000000"}', 400, "'item' must be a non-empty array of ids, got a string"),
    (b'{"user": "C0000000", "item": [null]}', 400, "ids must be integers or strings, got null"),
    (b'{"user": "C0000000", "item": ["SKU-000000"], "top_k": 0}', 400, "'top_k' must be an integer in 1..1000"),
    (b'{"user": "C0000000", "item": ["SKU-000000"], "top_k": "3"}', 400, "'top_k' must be an integer"),
    (b'{"user": "C0000000", "item": ["SKU-000000"], "return_scores": 1}', 400, "'return_scores' must be true or false"),
    (b'{"usr": "C0000000", "item": ["SKU-000000"]}', 400, "unknown field(s) ['usr']"),
    (b'[{"user": "C0000000", "item": ["SKU-000000"]}, 5]', 400, "[1]: expected an object"),
])
def test_bad_requests(rec, body, status, fragment):
    with pytest.raises(RequestError) as e: handle(rec, body)
    assert e.value.status == status and fragment in str(e.value)


def test_unknown_items_follow_the_known_ones_in_request_order(rec, torch_scores):
    u, cand = 3, [5, 9, 2, 14]
    known = [rec.items.ids[i] for i in cand]
    body = {"user": rec.users.ids[u], "item": ["SKU-new-1", known[0], "SKU-new-2", *known[1:], "SKU-new-1"], "return_scores": True}
    got = handle(rec, json.dumps(body))
    expected = [known[j] for j in np.argsort(-torch_scores[u, cand], kind="stable")]
    assert got["items"] == expected + ["SKU-new-1", "SKU-new-2", "SKU-new-1"]
    assert got["scores"][4:] == [None, None, None] and all(0 < p < 1 for p in got["scores"][:4])
    assert handle(rec, json.dumps({**body, "return_scores": False, "top_k": 5})) == got["items"][:5]


def test_unknown_user_is_a_cold_start_by_popularity(rec):
    items = rec.items.ids[:20]
    got = handle(rec, json.dumps({"user": "nobody", "item": items + ["SKU-X"], "details": True}))
    pop = rec.popularity[:20]
    assert got["items"] == [items[j] for j in np.argsort(-pop, kind="stable")] + ["SKU-X"]
    assert got["scores"] == pop[np.argsort(-pop, kind="stable")].tolist() + [None]
    assert (got["cold_start"], got["unknown_user"], got["unknown_items"], got["model_version"]) == (True, True, ["SKU-X"], rec.version)


def test_all_items_unknown_is_a_cold_start_in_request_order(rec):
    got = handle(rec, json.dumps({"user": rec.users.ids[0], "item": ["SKU-Z", "SKU-Y", "SKU-Z"], "details": True}))
    assert got == {"items": ["SKU-Z", "SKU-Y", "SKU-Z"], "scores": [None] * 3, "cold_start": True, "unknown_items": ["SKU-Z", "SKU-Y"],
                   "unknown_user": False, "model_version": rec.version}


def test_details_on_a_known_request_adds_fields_only(rec):
    body = {"user": rec.users.ids[1], "item": rec.items.ids[:6], "return_scores": True}
    plain, detailed = handle(rec, json.dumps(body)), handle(rec, json.dumps({**body, "details": True}))
    assert {k: detailed[k] for k in ("items", "scores")} == plain
    assert (detailed["cold_start"], detailed["unknown_user"], detailed["unknown_items"]) == (False, False, [])


def test_known_request_answers_the_seed_bytes(rec):
    "Nothing unknown: the body is exactly the seed's, a compact JSON array of ids."
    items = rec.items.ids[:5]
    out = output_fn(predict_fn(input_fn(json.dumps({"user": [rec.users.ids[2]] * 5, "item": items}), "application/json"), rec), "application/json")
    ranked = rec.rank(rec.users.ids[2], items)
    assert out == ("[" + ",".join(f'"{i}"' for i in ranked) + "]").encode()


def test_literal_user_zero_request_on_ids_from_one(tmp_path):
    from ncf.model.modeldir import random_model_dir
    random_model_dir(tmp_path / "m", 4, 30, user_ids=np.arange(1, 5), item_ids=np.arange(1, 31))
    r = model_fn(tmp_path / "m")
    got = handle(r, json.dumps({"user": [0] * 25, "item": list(range(1, 26)), "details": True}))
    assert got["cold_start"] and got["unknown_user"] and got["unknown_items"] == [] and sorted(got["items"]) == list(range(1, 26))


# The SageMaker inference toolkit itself (sagemaker-inference's Transformer) calling the entry point that
# ncf_package writes, with a request context shaped like the model server's.
class _Context:
    def __init__(self, model_dir, content_type, accept):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.request_processor = [self]
        self._headers = {"Content-Type": content_type, "Accept": accept}
        self.status, self.content_type = 200, None
    def get_request_properties(self): return self._headers
    def set_response_content_type(self, idx, ct): self.content_type = ct
    def set_response_status(self, code, phrase=""): self.status = code


@pytest.fixture(scope="module")
def toolkit(tmp_path_factory):
    pytest.importorskip("sagemaker_inference")
    import importlib, os, sys
    from unittest import mock
    from sagemaker_inference.default_inference_handler import DefaultInferenceHandler
    from sagemaker_inference.transformer import Transformer
    from ncf.serve.package import ENTRY_POINT
    code = tmp_path_factory.mktemp("code")
    (code / "ncf_toolkit_entry.py").write_text(ENTRY_POINT)
    sys.path.insert(0, str(code))
    try:
        with mock.patch.dict(os.environ, {"SAGEMAKER_PROGRAM": "ncf_toolkit_entry.py"}):
            t = Transformer(default_inference_handler=DefaultInferenceHandler())
            t.validate_and_initialize(model_dir=str(trained_models()["a"]))
    finally: sys.path.remove(str(code))
    return t


def call_toolkit(t, body, content_type="application/json", accept="application/json"):
    ctx = _Context(trained_models()["a"], content_type, accept)
    out = t.transform([{"body": body if isinstance(body, bytes) else json.dumps(body).encode()}], ctx)[0]
    return ctx.status, (out if isinstance(out, (bytes, str)) else str(out))


def test_toolkit_tolerates_unknown_ids(toolkit, rec):
    users, items = rec.users.ids, rec.items.ids
    status, out = call_toolkit(toolkit, {"user": [users[0]] * 4, "item": [items[0], "SKU-new", items[1], items[2]]})
    got = json.loads(out)
    assert status == 200 and got[-1] == "SKU-new" and sorted(got[:3]) == sorted(items[:3])
    status, out = call_toolkit(toolkit, {"user": "C-new", "item": items[:3], "return_scores": True})
    assert status == 200 and json.loads(out)["scores"] == sorted(json.loads(out)["scores"], reverse=True)
    status, out = call_toolkit(toolkit, {"user": users[0], "item": ["SKU-a", "SKU-b"], "details": True},
                               "application/json; charset=utf-8", "application/json; charset=utf-8")
    assert status == 200 and json.loads(out)["unknown_items"] == ["SKU-a", "SKU-b"] and json.loads(out)["cold_start"] is True
    status, out = call_toolkit(toolkit, {"user": [0] * 25, "item": items[:25], "details": True})
    assert status == 200 and json.loads(out)["unknown_user"] is True and sorted(json.loads(out)["items"]) == sorted(items[:25])


@pytest.mark.parametrize("body,fragment", [
    (b'{"user": [1, 2', "malformed JSON"),
    (b'{"user": ["a", "b"], "item": ["SKU-000000", "SKU-000001"]}', "must repeat one user id"),
    (b'{"user": ["a"], "item": ["SKU-000000", "SKU-000001"]}', "'user' has 1 ids and 'item' 2"),
    (b'{"user": "a", "item": []}', "'item' must be a non-empty array"),
    (b'{"user": "a", "item": ["SKU-000000"], "details": 1}', "'details' must be true or false"),
])
def test_toolkit_answers_malformed_bodies_4xx(toolkit, body, fragment):
    status, out = call_toolkit(toolkit, body)
    assert status == 400 and fragment in out


def test_content_type_and_accept(rec):
    with pytest.raises(RequestError) as e: handle(rec, b'{}', "text/csv")
    assert e.value.status == 415
    with pytest.raises(RequestError) as e: handle(rec, json.dumps({"user": rec.users.ids[0], "item": rec.items.ids[:1]}), accept="text/csv")
    assert e.value.status == 406


def test_damaged_model_never_loads(tmp_path):
    bad = damaged_copy(trained_models()["a"], tmp_path / "bad", "model.safetensors")
    with pytest.raises(ModelError, match="do not match their hash"): model_fn(bad)
