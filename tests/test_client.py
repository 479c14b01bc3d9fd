"""`sensai.Client` and the collate wrapper against a fake teacher server.

The fake server runs in a background thread of the test process over a real transport and
speaks the service's protocol (INFO control request; requests of [input_ids] or
[input_ids, attention_mask] with an optional seed in the header; responses tagged with the
output format). Its answers are deterministic: logits come from a fixed table indexed by the
token at each position, and sampling is seeded by the request's seed (0 without one), so a
test recomputes the expected output with `expected_output`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import sensai
from sensai import Client, SensAIClient, TeacherOutput, wrap_collate_function
from sensai.errors import PeerGoneError, TransportTimeout
from sensai.formats import FORMAT_TAGS, OutputBuilder
from sensai.protocol import INFO_TAG, SEED_FLAG
from sensai.transports import create_transport, format_address
from sensai.utils import _request_teacher_logits_with_retry

pytestmark = pytest.mark.timeout(30)

KINDS = ["unix_socket", "shared_memory", "named_pipe"]
VOCAB = 50
NUM_SAMPLES = 8
TOPK = 4
TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(1234))


def expected_output(fmt: str, ids: Any, mask: Any = None, seed: int | None = None) -> TeacherOutput:
    """What the fake teacher answers for ``ids`` [B, S]."""
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
    b, s = ids_t.shape
    p = max(s - 1, 1)
    pos_ids = ids_t[:, :p]
    logits = TABLE[pos_ids.reshape(-1)]
    m = torch.ones(b, p, dtype=torch.bool)
    if mask is not None:
        mt = torch.as_tensor(np.asarray(mask)).to(torch.bool)
        m = mt[:, 1:] if s > 1 else mt
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    builder = OutputBuilder(
        fmt, b, p, VOCAB, num_samples=NUM_SAMPLES, temperature=1.0, topk=TOPK, generator=gen
    )
    builder.add(logits)
    return builder.finish(m)


class FakeTeacher:
    """A fake teacher service in a thread; ``requests`` records (tag, value, n_tensors)."""

    def __init__(self, kind: str, path: str, fmt: str = "sampled", num_slots: int = 8) -> None:
        self.server, self.path = create_transport(
            kind, path, num_slots=num_slots, max_tensors=8, max_nbytes=1 << 20
        )
        self.address = format_address(kind, path)
        self.fmt = fmt
        self.requests: list[tuple[int, int, int]] = []
        self.slots: list[int] = []  # the slot of each request in ``requests``
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-teacher")
        self._thread.start()

    def info(self) -> dict[str, Any]:
        return {
            "model": "fake",
            "vocab_size": VOCAB,
            "output_format": self.fmt,
            "format_tag": FORMAT_TAGS[self.fmt],
            "num_samples": NUM_SAMPLES,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "topk": TOPK,
            "protocol_version": sensai.PROTOCOL_VERSION,
            "max_batch_tokens": 4096,
        }

    def _answer(self, slot: int) -> None:
        msg = self.server.recv_message(slot)
        if msg is None:
            return
        if msg.kind == "control" and msg.tag == INFO_TAG:
            blob = np.frombuffer(json.dumps(self.info()).encode(), dtype=np.uint8)
            self.server.send_message(slot, [blob.copy()], tag=INFO_TAG, kind="control")
            return
        arrays = [np.array(a) for a in msg.arrays()]  # copies: the message may be released
        seed = msg.value if msg.tag & SEED_FLAG else None
        self.requests.append((msg.tag, msg.value, len(arrays)))
        self.slots.append(slot)
        if len(arrays) not in (1, 2) or arrays[0].ndim != 2:
            self.server.send_error(slot, 1, f"expected [input_ids(, mask)], got {len(arrays)}")
            return
        out = expected_output(self.fmt, arrays[0], arrays[1] if len(arrays) == 2 else None, seed)
        self.server.send_message(slot, out.to_arrays(), tag=out.tag)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready = self.server.wait_any(0.02)
            except TransportTimeout:
                continue
            except Exception as e:  # the endpoint was closed under us
                if not self._stop.is_set():
                    self.errors.append(e)
                return
            for slot in ready:
                try:
                    self._answer(slot)
                except PeerGoneError:
                    pass
                except Exception as e:
                    self.errors.append(e)
                    try:  # answer, so that the client does not wait for ever
                        self.server.send_error(slot, 4, repr(e))
                    except Exception:
                        pass

    def stop(self) -> None:
        """Stop answering and remove the transport (the server is gone)."""
        self._stop.set()
        self._thread.join(5)
        self.server.close()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _path(kind: str, d: str) -> str:
    if kind == "shared_memory" and os.path.isdir("/dev/shm"):
        return f"/dev/shm/sai-test-{os.getpid()}-{os.path.basename(d)}"
    return os.path.join(d, "t.sock" if kind == "unix_socket" else "pipes")


@pytest.fixture
def teacher(kind: str, short_tmp: str) -> Iterator[FakeTeacher]:
    t = FakeTeacher(kind, _path(kind, short_tmp))
    yield t
    t.stop()
    assert not t.errors, t.errors


def _ids(b: int = 2, s: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(b, s), dtype=np.int64)


def _assert_same(got: TeacherOutput, want: TeacherOutput) -> None:
    assert got.format == want.format
    for name in (
        "mask",
        "logits",
        "indices",
        "values",
        "logprobs",
        "offsets",
        "tokens",
        "counts",
        "coo_indices",
        "coo_values",
        "logz_sampled",
        "logz_full",
    ):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(torch.as_tensor(a), b), name


# --- Client ----------------------------------------------------------------------------------


def test_info_and_lazy_connect(teacher: FakeTeacher) -> None:
    with Client(teacher.address, connect_timeout=5) as c:
        assert not c.connected
        assert "not connected" in repr(c)
        info = c.info()
        assert info["vocab_size"] == VOCAB and info["output_format"] == "sampled"
        assert c.connected and f"slot {c.slot_id}" in repr(c)
        assert c.info() == info  # cached
    assert "closed" in repr(c)


def test_get_teacher_logits_numpy_torch_mask_seed(kind: str, teacher: FakeTeacher) -> None:
    ids = _ids()
    with Client(teacher.address, connect_timeout=5) as c:
        out = c.get_teacher_logits(ids)
        assert isinstance(out, TeacherOutput)
        assert out.vocab_size == VOCAB and out.num_samples == NUM_SAMPLES
        assert out.indices.shape == (2, 5, NUM_SAMPLES)
        _assert_same(out, expected_output("sampled", ids))
        assert teacher.requests[-1] == (0, 0, 1)

        out_t = c.get_teacher_logits(torch.from_numpy(ids).to(torch.int32))
        _assert_same(out_t, expected_output("sampled", ids))

        mask = np.ones_like(ids)
        mask[1, 3:] = 0
        out_m = c.get_teacher_logits(torch.from_numpy(ids), torch.from_numpy(mask), seed=77)
        assert teacher.requests[-1] == (SEED_FLAG, 77, 2)
        _assert_same(out_m, expected_output("sampled", ids, mask, seed=77))
        assert not out_m.mask[1, 2:].any() and out_m.mask[0].all()
        # different seeds sample differently; the message keeps the buffers alive
        out_s = c.get_teacher_logits(ids, seed=78)
        assert not torch.equal(out_s.indices, out_m.indices)
        assert ("message" in out_s.extra) == (kind != "shared_memory")
        # zero-copy outputs kept alive on shared memory would pin its response buffers;
        # the default copy there lets a caller keep many outputs
        kept = [c.get_teacher_logits(ids) for _ in range(5)]
        assert all(torch.equal(k.indices, kept[0].indices) for k in kept)
        zc = c.get_teacher_logits(ids, copy=False)
        assert "message" in zc.extra
        _assert_same(zc, expected_output("sampled", ids))
        del zc

        raw = c.send_tensor(ids)  # the seed's raw behaviour: the arrays as they came
        assert isinstance(raw, list) and len(raw) == 5
        assert np.array_equal(raw[0], expected_output("sampled", ids).indices.numpy())

        with pytest.raises(TypeError):
            c.get_teacher_logits(ids.astype(np.float32))
        with pytest.raises(ValueError):
            c.get_teacher_logits(ids, seed=-1)


def test_pickled_client_connects_lazily_on_its_own_slot(teacher: FakeTeacher) -> None:
    ids = _ids(seed=3)
    with Client(teacher.address, connect_timeout=5) as c:
        c.info()
        copy = pickle.loads(pickle.dumps(c))
        assert not copy.connected
        out = copy.get_teacher_logits(ids)
        assert copy.slot_id != c.slot_id
        _assert_same(out, expected_output("sampled", ids))
        copy.close()
        _assert_same(c.get_teacher_logits(ids), expected_output("sampled", ids))


def _child_uses_client(client: Client, conn: Any) -> None:
    try:
        ids = _ids(seed=5)
        out = client.get_teacher_logits(ids)
        want = expected_output("sampled", ids)
        same = all(
            torch.equal(getattr(out, n), getattr(want, n)) for n in ("indices", "values", "mask")
        )
        conn.send((client.slot_id, same))
    except BaseException as e:  # report, don't hang the parent
        conn.send(("error", repr(e)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_forked_child_opens_its_own_slot(teacher: FakeTeacher) -> None:
    ctx = multiprocessing.get_context("fork")
    with Client(teacher.address, connect_timeout=5) as c:
        c.info()
        parent_slot = c.slot_id
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child_uses_client, args=(c, send))
        p.start()
        assert recv.poll(20), "the child did not answer"
        child_slot, ok = recv.recv()
        p.join(10)
        assert child_slot != parent_slot and ok is True, (child_slot, ok)
        # the parent's connection still works after the child exited
        ids = _ids(seed=6)
        _assert_same(c.get_teacher_logits(ids), expected_output("sampled", ids))
        assert c.slot_id == parent_slot


# --- collate wrapper ------------------------------------------------------------------------


def _collate(items: list[dict]) -> dict:
    return {
        "input_ids": torch.stack([torch.as_tensor(i["input_ids"]) for i in items]),
        "attention_mask": torch.stack([torch.as_tensor(i["attention_mask"]) for i in items]),
    }


def _items(n: int = 4, s: int = 6) -> list[dict]:
    ids = _ids(n, s, seed=9)
    return [{"input_ids": ids[i], "attention_mask": np.ones(s, dtype=np.int64)} for i in range(n)]


def test_wrapped_collate_stores_teacher_output_fields(teacher: FakeTeacher) -> None:
    with Client(teacher.address, connect_timeout=5) as c:
        collate = wrap_collate_function(_collate, c)
        items = _items()
        batch = collate(items)
        want = expected_output("sampled", batch["input_ids"], batch["attention_mask"])
        assert batch["teacher_logits_format"] == "sampled"
        for name in ("indices", "values", "logz_sampled", "logz_full", "mask"):
            assert torch.equal(batch[f"teacher_logits_{name}"], getattr(want, name)), name
        assert teacher.requests[-1][2] == 2  # the mask was sent

        n = len(teacher.requests)
        again = collate.__wrapped__(items)
        again["teacher_logits"] = "already there"
        assert wrap_collate_function(lambda b: again, c)(items)["teacher_logits"] == "already there"
        assert len(teacher.requests) == n

        for bad in ([1, 2], {"input_ids": [[1, 2]]}, {"x": torch.zeros(1, 2)}):
            with pytest.raises(ValueError):
                wrap_collate_function(lambda b, bad=bad: bad, c)(items)
        with pytest.raises(ValueError, match="list"):
            wrap_collate_function(lambda b: {"input_ids": [[1, 2]]}, c)(items)


@pytest.mark.parametrize("fmt", ["topk", "compact", "full"])
def test_wrapped_collate_other_formats(fmt: str, short_tmp: str) -> None:
    t = FakeTeacher("unix_socket", os.path.join(short_tmp, "f.sock"), fmt=fmt)
    try:
        with Client(t.address, connect_timeout=5) as c:
            batch = wrap_collate_function(_collate, c, teacher_logits_attribute="tl")(_items())
            want = expected_output(fmt, batch["input_ids"], batch["attention_mask"])
            assert batch["tl_format"] == fmt
            assert torch.equal(batch["tl_mask"], want.mask)
            if fmt == "topk":
                assert torch.equal(batch["tl_indices"], want.indices)
                assert torch.equal(batch["tl_logprobs"], want.logprobs)
            elif fmt == "compact":
                for name in ("offsets", "tokens", "counts", "logprobs", "logz_full"):
                    assert torch.equal(batch[f"tl_{name}"], getattr(want, name)), name
            else:
                assert torch.equal(batch["tl"], want.logits)
    finally:
        t.stop()
    assert not t.errors


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dataloader_workers_each_get_answers(teacher: FakeTeacher) -> None:
    from torch.utils.data import DataLoader

    items = _items(8)
    with Client(teacher.address, connect_timeout=5) as c:
        c.info()  # the parent used it before the workers forked
        parent_slot = c.slot_id
        n = len(teacher.slots)
        loader = DataLoader(
            items,
            batch_size=2,
            num_workers=2,
            collate_fn=wrap_collate_function(_collate, c, num_retries=1),
            multiprocessing_context="fork",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed request fails the test
            batches = list(loader)
        assert len(batches) == 4
        worker_slots = set(teacher.slots[n:])
        assert len(worker_slots) == 2 and parent_slot not in worker_slots, worker_slots
        for batch in batches:
            want = expected_output("sampled", batch["input_ids"], batch["attention_mask"])
            assert torch.equal(batch["teacher_logits_indices"], want.indices)
            assert torch.equal(batch["teacher_logits_values"], want.values)
        # the parent's slot survived its workers
        assert c.get_teacher_logits(_ids()).format == "sampled"


def test_wrapper_warns_and_continues_when_server_is_gone(kind: str, short_tmp: str) -> None:
    """``on_error="skip"``: the batch comes back without the teacher's answer (a `Client`
    raises by default: tests/test_collate.py)."""
    t = FakeTeacher(kind, _path(kind, short_tmp))
    c = Client(t.address, timeout=5, connect_timeout=0.5)
    collate = wrap_collate_function(_collate, c, num_retries=2, retry_delay=0.01, on_error="skip")
    assert "teacher_logits_indices" in collate(_items())
    t.stop()
    with pytest.warns(RuntimeWarning) as rec:
        batch = collate(_items())
    # 1 + num_retries attempts warn, then the wrapper says it goes on without the teacher
    texts = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(texts) == 1 + 2 + 1, texts
    assert texts[-1].startswith("Failed to obtain teacher logits after 2 retries."), texts
    assert set(batch) == {"input_ids", "attention_mask"}
    c.close()

    # never there at all: the connect timeout bounds each try
    gone = Client(format_address(kind, _path(kind, short_tmp) + "x"), connect_timeout=0.2)
    with pytest.warns(RuntimeWarning):
        assert _request_teacher_logits_with_retry(gone, _ids(), 2, 0.01) is None


def test_seed_client_path(kind: str, short_tmp: str) -> None:
    t = FakeTeacher(kind, _path(kind, short_tmp))
    try:
        ep = sensai.connect(t.address, connect_timeout=5)
        seed_client = SensAIClient(ep)
        batch = wrap_collate_function(_collate, seed_client)(_items())
        want = expected_output("sampled", batch["input_ids"], batch["attention_mask"])
        # the seed's convention for a raw multi-tensor answer (here 5 tensors: the list)
        assert len(batch["teacher_logits"]) == 5
        assert np.array_equal(batch["teacher_logits"][0], want.indices.numpy())
        ans = _request_teacher_logits_with_retry(seed_client, _ids(), 1, 0.0)
        assert isinstance(ans, list) and len(ans) == 5
        ep.close()
    finally:
        t.stop()
    assert not t.errors


def test_seed_two_tensor_and_single_answers() -> None:
    class Two:
        def send_tensor(self, x: Any) -> Any:
            return [np.zeros((1, 2, 3), np.int64), np.ones((1, 2, 3), np.float32)]

    class One:
        def send_tensor(self, x: Any) -> Any:
            return np.ones((1, 2, 50), np.float32)

    items = _items(1)
    b2 = wrap_collate_function(_collate, Two())(items)
    assert b2["teacher_logits_indices"].shape == (1, 2, 3) and "teacher_logits_values" in b2
    b1 = wrap_collate_function(_collate, One(), teacher_logits_attribute="t")(items)
    assert b1["t"].shape == (1, 2, 50)


def test_transport_users_do_not_import_torch() -> None:
    """The transports, the seed's server and client, `Client` and the collate wrapper need only
    numpy: importing them must not pay torch's seconds and hundreds of MB; `TeacherOutput`
    brings it in."""
    code = (
        "import sys, sensai\n"
        "from sensai import Client, SensAIClient, SensAIServer, wrap_collate_function, connect\n"
        "from sensai.transports import named_pipe, shared_memory, unix_socket\n"
        "from sensai.utils import create_transport\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from sensai import TeacherOutput\n"
        "assert 'torch' in sys.modules and TeacherOutput.__module__ == 'sensai.formats'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
