"""sensai.store: record answers of the tiny teacher, replay them exactly, refuse what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("CI") == "true":
    import pyarrow  # noqa: F401  - CI installs the store extra: a missing pyarrow fails
else:
    pytest.importorskip("pyarrow")

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sensai import Client, wrap_collate_function
from sensai.errors import SequenceNotStoredError, StoreError
from sensai.store import StoreReader, StoreWriter, list_shards, sequence_key
from sensai.store.reader import shard_schema
from sensai.store.record import _answer_rows, manifest_for, record_sequences

VOCAB = 320


def _seqs(n: int = 12, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(rng.integers(1, 24))) for _ in range(n)]


def _teacher(model_dir: str, fmt: str, num_samples: int = 16):
    from sensai.teacher import TeacherLogitsServer

    return TeacherLogitsServer(
        model_dir, device="cpu", num_samples=num_samples, output_format=fmt, topk=8
    )


def _record(teacher, seqs, directory, level="lossless", rows_per_shard=5):
    """Record ``seqs`` and return the one-row outputs written, by key."""
    man = manifest_for(teacher, level, model="tiny", revision=None, dataset={"hash": "x"})
    written = {}
    with StoreWriter(directory, man, rows_per_shard=rows_per_shard) as w:
        for q, row in zip(seqs, _answer_rows(teacher, seqs, seed=1), strict=True):
            if w.add(sequence_key(q), int(q.size), row):
                written[sequence_key(q)] = row
    return written


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["sampled", "compact", "topk", "coo", "full"])
def test_lossless_replay_is_byte_exact(tiny_model_dir, short_tmp, fmt):
    teacher = _teacher(tiny_model_dir, fmt)
    seqs = _seqs()
    written = _record(teacher, seqs, short_tmp)
    assert len(list_shards(short_tmp)) >= 2  # several shards, published whole
    client = Client(f"store://{short_tmp}")
    assert client.info()["output_format"] == fmt and client.info()["vocab_size"] == VOCAB
    for q in seqs:
        out = client.get_teacher_logits(q[None])
        want = written[sequence_key(q)].rows(0, 1, max(q.size - 1, 1))
        got, exp = out.to_arrays(), want.to_arrays()
        assert len(got) == len(exp)
        for g, e in zip(got, exp, strict=True):
            assert _same(g, e), (fmt, g.dtype, e.dtype, g.shape, e.shape)


@pytest.mark.parametrize("fmt", ["sampled", "compact", "coo"])
def test_padded_batches_place_each_sequence(tiny_model_dir, short_tmp, fmt):
    """Right and left padding: each row's recorded positions land where a live teacher puts
    them (position j of the row after its j-th real token), the rest is masked out."""
    teacher = _teacher(tiny_model_dir, fmt)
    seqs = [np.arange(5) + 7, np.arange(9) + 30, np.arange(2) + 100]
    written = _record(teacher, seqs, short_tmp)
    reader = StoreReader(short_tmp)
    s = 10
    ids = np.zeros((3, s), dtype=np.int64)
    right, left = np.zeros_like(ids), np.zeros_like(ids)
    for i, q in enumerate(seqs):
        ids[i, : q.size] = q
        right[i, : q.size] = 1
    out = reader.get(ids, right)
    assert out.mask.tolist() == right[:, : s - 1].astype(bool).tolist()
    for i, q in enumerate(seqs):
        n = q.size  # the distribution after the last token was recorded too
        got = out.rows(i, i + 1, n).to_arrays()[:-1]
        exp = written[sequence_key(q)].rows(0, 1, n).to_arrays()[:-1]
        assert all(_same(g, e) for g, e in zip(got, exp, strict=True))
    lids = np.zeros_like(ids)
    for i, q in enumerate(seqs):
        lids[i, s - q.size :] = q
        left[i, s - q.size :] = 1
    lout = reader.get(lids, left)
    assert lout.mask.tolist() == left[:, : s - 1].astype(bool).tolist()
    if fmt == "sampled":
        q = seqs[1]
        exp = written[sequence_key(q)]
        assert torch.equal(lout.indices[1, s - q.size :], exp.indices[0, : q.size - 1])


def test_fp16_level_within_float16_rounding(tiny_model_dir, short_tmp):
    for fmt in ("compact", "topk"):
        teacher = _teacher(tiny_model_dir, fmt)
        seqs = _seqs(6, seed=3)
        d = os.path.join(short_tmp, fmt)
        written = _record(teacher, seqs, d, level="fp16")
        reader = StoreReader(d)
        assert reader.level == "fp16"
        for q in seqs:
            out = reader.get(q)
            want = written[sequence_key(q)].rows(0, 1, max(q.size - 1, 1))
            names = ("offsets", "tokens", "counts") if fmt == "compact" else ("indices",)
            for name in (*names, "logz_sampled", "logz_full", "mask"):
                assert _same(getattr(out, name), getattr(want, name)), name
            assert out.logprobs.dtype == torch.float32
            exp16 = want.logprobs.to(torch.float16).to(torch.float32)
            assert torch.equal(out.logprobs, exp16)  # exactly float16 rounding, no worse
            assert torch.allclose(out.logprobs, want.logprobs, rtol=2**-10, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logz_sampled_is_stored_only_when_it_differs(tiny_model_dir, short_tmp, temperature):
    """At T = 1 logz_sampled equals logz_full bit for bit and is stored empty; at T = 2 it is
    kept. Replay is byte-exact both ways, every list column is BYTE_STREAM_SPLIT, and a
    version-1 store (always a full logz_sampled) still opens."""
    from sensai.teacher.model import TeacherLogitsServer

    teacher = TeacherLogitsServer(
        tiny_model_dir, device="cpu", num_samples=16, output_format="compact",
        temperature=temperature,
    )  # fmt: skip
    seqs = _seqs(4, seed=7)
    written = _record(teacher, seqs, short_tmp)
    shard = list_shards(short_tmp)[0]
    t = pq.read_table(shard)
    lengths = pa.compute.list_value_length(t.column("logz_sampled")).to_pylist()
    if temperature == 1.0:
        assert lengths == [0] * t.num_rows
    else:
        assert lengths == t.column("num_positions").to_pylist()
    md = pq.ParquetFile(shard).metadata.row_group(0)
    for i in range(md.num_columns):
        c = md.column(i)
        if c.path_in_schema.endswith(".list.element"):
            assert "BYTE_STREAM_SPLIT" in c.encodings, (c.path_in_schema, c.encodings)
    manifest = Path(short_tmp, "manifest.json")
    manifest.write_text(
        manifest.read_text().replace('"store_format_version": 2', '"store_format_version": 1')
    )
    reader = StoreReader(short_tmp)
    for q in seqs:
        got = reader.get(q).to_arrays()
        want = written[sequence_key(q)].rows(0, 1, max(q.size - 1, 1)).to_arrays()
        assert all(_same(g, e) for g, e in zip(got, want, strict=True))


def test_a_shard_reads_with_plain_pyarrow_as_the_readme_says(tiny_model_dir, short_tmp):
    """README, "Reading a store without SensAI": the documented columns, read with pyarrow
    alone, give back the recorded compact answers (fp16: within float16 rounding)."""
    teacher = _teacher(tiny_model_dir, "compact")
    seqs = _seqs(5, seed=11)
    written = _record(teacher, seqs, short_tmp, level="fp16", rows_per_shard=100)
    (shard,) = list_shards(short_tmp)
    rows = pq.read_table(shard).to_pylist()  # what datasets.load_dataset("parquet") holds
    assert len(rows) == len(seqs)
    for row in rows:
        want = written[row["key"]]
        p = row["num_positions"]
        assert row["num_tokens"] in (p, p + 1) and row["sample_set"] == 0
        offsets = np.concatenate([[0], np.cumsum(row["num_distinct"])])
        tokens, counts = np.array(row["tokens"]), np.array(row["counts"]) + 1
        logprobs = np.array(row["logprobs"], dtype=np.float32)
        logz_sampled = np.array(row["logz_sampled"] or row["logz_full"], dtype=np.float32)
        assert np.array_equal(offsets, want.offsets.numpy())
        assert np.array_equal(tokens, want.tokens.numpy())
        assert np.array_equal(counts, want.counts.numpy())
        assert np.array_equal(logprobs, want.logprobs.numpy().astype(np.float16).astype(np.float32))
        assert np.array_equal(logz_sampled, want.logz_sampled.reshape(-1).numpy())
        assert np.array_equal(
            np.array(row["logz_full"], np.float32), want.logz_full.reshape(-1).numpy()
        )


def test_counts_level_keeps_counts_and_refuses_logprobs(tiny_model_dir, short_tmp):
    teacher = _teacher(tiny_model_dir, "compact", num_samples=64)
    seqs = _seqs(6, seed=4)
    written = _record(teacher, seqs, short_tmp, level="counts")
    client = Client(f"store://{short_tmp}")
    q = seqs[0]
    out = client.get_teacher_logits(q[None])
    want = written[sequence_key(q)].rows(0, 1, max(q.size - 1, 1))
    for name in ("offsets", "tokens", "counts", "mask"):
        assert _same(getattr(out, name), getattr(want, name)), name
    assert not out.has_logprobs
    with pytest.raises(ValueError, match="counts-only store"):
        out.teacher_logprobs()
    with pytest.raises(ValueError, match="counts-only store"):
        out.sampled_logprobs()


def test_counts_level_loss_is_the_cross_entropy_with_the_kls_gradient(
    tiny_model_dir, short_tmp, caplog
):
    """The same draws stored lossless and counts-only: sampled_kd_loss on the counts answer
    has the lossless KL's gradient and differs from it by the teacher's entropy estimate
    only; it says so once, and refuses importance weighting (no log-probs)."""
    import logging

    import sensai.losses as losses

    teacher = _teacher(tiny_model_dir, "compact", num_samples=32)
    seqs = [q for q in _seqs(8, seed=5) if q.size >= 3][:4]
    man = {lv: manifest_for(teacher, lv, model="t", revision=None, dataset={}) for lv in
           ("lossless", "counts")}  # fmt: skip
    rows = _answer_rows(teacher, seqs, seed=2)
    for lv in man:
        with StoreWriter(os.path.join(short_tmp, lv), man[lv]) as w:
            for q, row in zip(seqs, rows, strict=True):
                w.add(sequence_key(q), int(q.size), row)
    s = max(q.size for q in seqs)
    ids = np.zeros((len(seqs), s), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, q in enumerate(seqs):
        ids[i, : q.size], mask[i, : q.size] = q, 1
    full = StoreReader(os.path.join(short_tmp, "lossless")).get(ids, mask)
    counts = StoreReader(os.path.join(short_tmp, "counts")).get(ids, mask)
    assert not counts.has_logprobs and torch.equal(full.tokens, counts.tokens)
    logits = torch.randn(len(seqs), s, VOCAB, dtype=torch.float64)
    grads, values = [], []
    losses._warned_cross_entropy = False
    with caplog.at_level(logging.WARNING, logger="sensai.losses"):
        for out in (full, counts, counts):
            student = logits.clone().requires_grad_(True)
            loss = losses.sampled_kd_loss(student, out)
            loss.backward()
            grads.append(student.grad)
            values.append(float(loss.detach()))
    warned = [r for r in caplog.records if "cross-entropy part" in r.getMessage()]
    assert len(warned) == 1  # once per process
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9)
    assert float(grads[0].abs().max()) > 1e-3  # a gradient that could have differed
    # KL - CE = the sampled estimate of -H(teacher) = mean over positions of sum w log p
    rows_ = full.position_of_entries()
    w = full.counts.double() / 32
    neg_entropy = torch.zeros(full.mask.numel(), dtype=torch.float64).index_add_(
        0, rows_, w * full.sampled_logprobs().double()
    )
    expected = float(neg_entropy[full.mask.reshape(-1)].mean())
    assert values[0] - values[1] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert abs(expected) > 0.1
    from sensai.teacher.model import TeacherLogitsServer

    hot = TeacherLogitsServer(
        tiny_model_dir, device="cpu", num_samples=32, output_format="compact", temperature=2.0
    )
    d = os.path.join(short_tmp, "hot")
    _record(hot, seqs, d, level="counts")
    with pytest.raises(ValueError, match="counts-only store.*importance weighting"):
        losses.sampled_kd_loss(logits, StoreReader(d).get(ids, mask), temperature=1.0)


def test_counts_level_needs_compact_and_at_most_256_samples(tiny_model_dir, short_tmp):
    with pytest.raises(StoreError, match="compact"):
        manifest_for(_teacher(tiny_model_dir, "sampled"), "counts", model="t", revision=None,
                     dataset=None)  # fmt: skip
    with pytest.raises(StoreError, match="256"):
        manifest_for(_teacher(tiny_model_dir, "compact", 300), "counts", model="t",
                     revision=None, dataset=None)  # fmt: skip


def test_a_store_that_does_not_match_is_refused(tiny_model_dir, short_tmp):
    teacher = _teacher(tiny_model_dir, "compact")
    _record(teacher, _seqs(3), short_tmp)
    with pytest.raises(StoreError, match="vocab_size 320, expected 999"):
        StoreReader(short_tmp, vocab_size=999)
    with pytest.raises(StoreError, match="format 'compact', expected 'topk'"):
        Client(f"store://{short_tmp}?format=topk").info()
    with pytest.raises(StoreError, match="tokenizer fingerprint"):
        Client(f"store://{short_tmp}?tokenizer=abc").info()
    Client(f"store://{short_tmp}?vocab_size=320&format=compact").info()  # what it is: fine
    # a writer with another teacher configuration refuses to add to it
    other = manifest_for(_teacher(tiny_model_dir, "compact", 32), "lossless", model="tiny",
                         revision=None, dataset={"hash": "x"})  # fmt: skip
    with pytest.raises(StoreError, match="different recording"):
        StoreWriter(short_tmp, other)


def test_missing_sequence_names_its_hash(tiny_model_dir, short_tmp):
    _record(_teacher(tiny_model_dir, "sampled"), _seqs(3), short_tmp)
    q = np.arange(11) + 3
    with pytest.raises(SequenceNotStoredError, match=sequence_key(q)) as e:
        Client(f"store://{short_tmp}").get_teacher_logits(q[None])
    assert e.value.key == sequence_key(q)


def test_resume_adds_only_what_is_missing(tiny_model_dir, short_tmp):
    teacher = _teacher(tiny_model_dir, "compact")
    seqs = _seqs(10, seed=5)
    man = manifest_for(teacher, "lossless", model="tiny", revision=None, dataset={"hash": "x"})
    with StoreWriter(short_tmp, man, rows_per_shard=3) as w:
        assert record_sequences(teacher, seqs[:6], w, max_batch_tokens=64) == 6
    with StoreWriter(short_tmp, man, rows_per_shard=3) as w:
        assert len(w) == 6
        assert record_sequences(teacher, seqs, w, max_batch_tokens=64) == 4
    reader = StoreReader(short_tmp)
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in list_shards(short_tmp))
    assert total == len(reader) == len({sequence_key(q) for q in seqs})


def test_collate_wrapper_replays_from_the_store(tiny_model_dir, short_tmp):
    seqs = [np.arange(6) + 1, np.arange(4) + 50]
    _record(_teacher(tiny_model_dir, "compact"), seqs, short_tmp)

    def collate(batch):
        s = max(len(x) for x in batch)
        ids = torch.zeros(len(batch), s, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = torch.as_tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    wrapped = wrap_collate_function(collate, Client(f"store://{short_tmp}"), num_retries=1)
    batch = wrapped(seqs)
    out = batch["teacher_logits_output"]
    assert (
        out.format == "compact" and out.mask.sum().item() == 5 + 4
    )  # S - 1, and all 4 of the padded row


def test_client_does_not_import_the_store_until_used():
    code = (
        "import sys, sensai\n"
        "c = sensai.Client('store:///nonexistent')\n"
        "assert 'sensai.store' not in sys.modules and 'pyarrow' not in sys.modules\n"
        "try:\n    c.info()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("StoreError") and "no manifest.json" in r.stdout


# --- hostile shards ------------------------------------------------------------------------------


@pytest.fixture
def store(tiny_model_dir, short_tmp) -> Path:
    _record(_teacher(tiny_model_dir, "compact"), _seqs(6), short_tmp, rows_per_shard=100)
    return Path(short_tmp)


def _plant(store: Path, table: pa.Table, name: str = "shard-zz-hostile.parquet") -> Path:
    path = store / name
    pq.write_table(table, path)
    return path


def test_truncated_shard_is_refused(store):
    shard = list_shards(store)[0]
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(StoreError, match="truncated"):
        StoreReader(store)


def test_shard_declaring_a_huge_footer_is_refused(store):
    shard = list_shards(store)[0]
    blob = bytearray(shard.read_bytes())
    blob[-8:-4] = (2**31 - 1).to_bytes(4, "little")
    shard.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match="footer"):
        StoreReader(store)


def test_shard_with_wrong_types_is_refused(store):
    good = pq.read_table(list_shards(store)[0])
    bad = good.set_column(
        good.schema.get_field_index("tokens"),
        "tokens",
        pa.array([[float(x) for x in r] for r in good.column("tokens").to_pylist()]),
    )
    _plant(store, bad)
    with pytest.raises(StoreError, match="tokens"):
        StoreReader(store)


def test_row_declaring_huge_lengths_is_refused(store):
    good = pq.read_table(list_shards(store)[0])
    schema = shard_schema("compact", "lossless", 16)
    key = sequence_key(np.arange(3))
    row = {name: good.column(name).slice(0, 1).to_pylist() for name in good.column_names}
    row.update(key=[key], num_tokens=[2**30], num_positions=[2**30])
    _plant(store, pa.Table.from_pydict(row, schema=schema))
    reader = StoreReader(store)
    with pytest.raises(StoreError, match="positions declared"):
        reader.row(key)
    row.update(num_tokens=[3], num_positions=[3])  # lists too short for 3 positions
    _plant(
        store, pa.Table.from_pydict({**row, "key": [key + "x"]}, schema=schema), "shard-zz2.parquet"
    )
    reader.refresh()
    with pytest.raises(StoreError, match="values"):
        reader.row(key + "x")


def test_out_of_vocabulary_tokens_and_nulls_are_refused(store):
    good = pq.read_table(list_shards(store)[0])
    schema = shard_schema("compact", "lossless", 16)
    row = {name: good.column(name).slice(0, 1).to_pylist() for name in good.column_names}
    row["tokens"] = [[VOCAB + 5] * len(row["tokens"][0])]
    row["key"] = ["k-oov"]
    _plant(store, pa.Table.from_pydict(row, schema=schema))
    reader = StoreReader(store)
    with pytest.raises(StoreError, match="outside the vocabulary"):
        reader.row("k-oov")
    nulls = dict(row, key=["k-null"], logprobs=[None])
    _plant(store, pa.Table.from_pydict(nulls, schema=schema), "shard-zz3.parquet")
    reader.refresh()
    with pytest.raises(StoreError, match="null"):
        reader.row("k-null")


def test_column_chunks_over_the_limit_are_refused_before_reading(store):
    with pytest.raises(StoreError, match="max_row_group_bytes"):
        StoreReader(store, max_row_group_bytes=64)


def test_a_dead_writers_temporary_shard_is_ignored_and_removed(tiny_model_dir, store):
    tmp = store / ".tmp-shard-999999999-dead-shard-x.parquet"
    tmp.write_bytes(b"PAR1 half a shard")
    assert len(StoreReader(store)) == 6  # readers never look at temporary files
    teacher = _teacher(tiny_model_dir, "compact")
    man = manifest_for(teacher, "lossless", model="tiny", revision=None, dataset={"hash": "x"})
    StoreWriter(store, man).close()
    assert not tmp.exists()


def test_samples_per_epoch_and_set_epoch(tiny_model_dir, short_tmp):
    teacher = _teacher(tiny_model_dir, "sampled")
    seqs = _seqs(4, seed=6)
    man = manifest_for(teacher, "lossless", model="tiny", revision=None, dataset={"hash": "x"},
                       samples_per_epoch=3)  # fmt: skip
    with StoreWriter(short_tmp, man) as w:
        record_sequences(teacher, seqs, w, samples_per_epoch=3)
        assert len(w) == 3 * len(seqs)
    client = Client(f"store://{short_tmp}")
    q = max(seqs, key=len)[None]
    draws = []
    for epoch in range(4):
        client.set_epoch(epoch)
        draws.append(client.get_teacher_logits(q).indices)
    assert torch.equal(draws[3], draws[0])  # epoch mod 3
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    with pytest.raises(SequenceNotStoredError, match="sample set 1"):
        StoreReader(short_tmp).row(sequence_key(np.arange(4)), sample_set=1)


# --- sensai serve --record / --replay ------------------------------------------------------------


class _Served:
    """``teacher`` served by a TeacherService on a Unix socket in a thread."""

    def __init__(self, teacher, directory: str) -> None:
        import threading

        from sensai.serving.batching import TeacherService
        from sensai.transports import create_transport, format_address

        self.transport, path = create_transport("unix_socket", os.path.join(directory, "s"), 2)
        self.service = TeacherService(teacher, self.transport, poll_timeout=0.05)
        self.thread = threading.Thread(target=self.service.serve_forever, daemon=True)
        self.thread.start()
        self.address = format_address("unix_socket", path)

    def close(self) -> None:
        self.service.stop()
        self.thread.join(30)
        self.transport.close()


def _same_where_valid(a, b) -> bool:
    """Equal masks, and byte-equal answers at the valid positions of right-padded rows (a
    replay leaves masked positions empty; a live teacher computes something there)."""
    if not torch.equal(a.mask, b.mask):
        return False
    for i in range(a.batch_size):
        n = int(a.mask[i].sum())
        pairs = zip(a.rows(i, i + 1, n).to_arrays(), b.rows(i, i + 1, n).to_arrays(), strict=True)
        if not all(_same(x, y) for x, y in pairs):
            return False
    return True


def test_serve_records_what_it_answers_and_replays_it(tiny_model_dir, short_tmp):
    from sensai.errors import RemoteError
    from sensai.store.serve import RecordingTeacher, ReplayTeacher

    teacher = _teacher(tiny_model_dir, "compact")
    store = os.path.join(short_tmp, "store")
    man = manifest_for(teacher, "lossless", model="tiny", revision=None, dataset={})
    writer = StoreWriter(store, man)
    live = _Served(RecordingTeacher(teacher, writer), short_tmp)
    ids = np.stack([np.arange(9) + 5, np.arange(9) + 40])
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right-padded: the sequence is its first 6 tokens
    try:
        with Client(live.address) as c:
            got = c.get_teacher_logits(ids, mask)
            single = c.get_teacher_logits(ids[:1, :7])
    finally:
        live.close()
        writer.close()
    assert len(StoreReader(store)) == 3
    replayed = Client(f"store://{store}")
    for inputs, answer in (((ids, mask), got), ((ids[:1, :7], None), single)):
        assert _same_where_valid(replayed.get_teacher_logits(*inputs), answer)
    served = _Served(ReplayTeacher(StoreReader(store)), os.path.join(short_tmp))
    try:
        with Client(served.address) as c:
            assert c.info()["store_level"] == "lossless"
            assert _same_where_valid(c.get_teacher_logits(ids, mask), got)
            with pytest.raises(RemoteError, match=sequence_key(np.arange(3))):
                c.get_teacher_logits(np.arange(3)[None])
    finally:
        served.close()


def _fallback_child(address: str, ids, mask, conn) -> None:
    torch.set_num_threads(1)  # as a DataLoader worker does (the parent's pool is gone)
    with Client(address) as c:
        out = c.get_teacher_logits(ids, mask)
    conn.send([a.numpy() for a in out.to_arrays()])


def test_fallback_answers_and_records_what_the_store_lacks(tiny_model_dir, short_tmp):
    """store://DIR?fallback=ADDRESS: a sequence the store lacks is answered by the live
    teacher once, recorded (each process into its own shards), and replayed as answered; a
    live teacher that samples otherwise than the store was recorded is refused."""
    import multiprocessing as mp

    teacher = _teacher(tiny_model_dir, "compact")
    store = os.path.join(short_tmp, "store")
    stored = [np.arange(6) + 30, np.arange(4) + 80]
    written = _record(teacher, stored, store)
    live = _Served(teacher, short_tmp)
    a, b = np.arange(7) + 3, np.arange(5) + 60  # not in the store
    ids = np.zeros((3, 8), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, q in enumerate((stored[0], a, b)):
        ids[i, : q.size], mask[i, : q.size] = q, 1
    try:
        with pytest.raises(SequenceNotStoredError):
            Client(f"store://{store}").get_teacher_logits(ids, mask)
        address = f"store://{store}?fallback={live.address}"
        with Client(address) as c:
            first = c.get_teacher_logits(ids, mask)
            asked = live.service.totals["requests"]
            assert asked >= 1
            again = c.get_teacher_logits(ids, mask)  # from memory, not from the teacher
            assert live.service.totals["requests"] == asked
            assert _same_where_valid(first, again)
        # a forked worker records its own miss into its own shard
        c2 = np.arange(6) + 100
        ctx = mp.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_fallback_child, args=(address, c2[None], None, send))
        proc.start()
        send.close()
        assert recv.poll(30), "the forked client did not answer"
        child = recv.recv()
        proc.join(60)
        assert proc.exitcode == 0
        # sensai serve --replay DIR --fallback ADDRESS: the same, behind a server
        from sensai.store.serve import ReplayTeacher

        reader = StoreReader(store, fallback=live.address)
        os.mkdir(os.path.join(short_tmp, "r"))
        served = _Served(ReplayTeacher(reader), os.path.join(short_tmp, "r"))
        d = np.arange(5) + 150
        try:
            with Client(served.address) as c:
                via_server = c.get_teacher_logits(d[None])
        finally:
            served.close()
            reader.close()
    finally:
        live.close()
    shards = list_shards(store)
    pids = {s.name.split("-")[1] for s in shards}
    assert str(os.getpid()) in pids and len(pids) >= 2  # this process's and the child's
    replay = Client(f"store://{store}")
    assert _same_where_valid(replay.get_teacher_logits(ids, mask), first)
    assert _same_where_valid(replay.get_teacher_logits(d[None]), via_server)
    got = replay.get_teacher_logits(c2[None]).to_arrays()
    assert all(np.array_equal(g.numpy(), e) for g, e in zip(got, child, strict=True))
    want = written[sequence_key(stored[0])]  # the stored row is replayed as recorded
    assert _same(first.rows(0, 1, 6).tokens, want.tokens) and _same(
        first.rows(0, 1, 6).counts, want.counts
    )
    hot = _teacher(tiny_model_dir, "compact", num_samples=8)
    os.mkdir(os.path.join(short_tmp, "o"))
    other = _Served(hot, os.path.join(short_tmp, "o"))
    try:
        with pytest.raises(StoreError, match="num_samples 8, the store's 16"):
            Client(f"store://{store}?fallback={other.address}").get_teacher_logits(
                (np.arange(4) + 200)[None]
            )
    finally:
        other.close()
