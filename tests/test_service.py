"""The teacher service: `sensai serve` as a real subprocess on every transport, and the
batching of `TeacherService` checked in-process."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from sensai import _core
from sensai.errors import RemoteError
from sensai.formats import FORMAT_TAGS, TeacherOutput
from sensai.protocol import INFO_TAG, SEED_FLAG
from sensai.serving.batching import TeacherService
from sensai.transports import connect

# The first test of a module also carries its fixture: three servers started at once, each
# importing torch and building the tiny model (wait_ready allows 120 s on a loaded machine).
pytestmark = pytest.mark.timeout(180)

TRANSPORTS = ("shared_memory", "unix_socket", "named_pipe")
_PATH_FLAG = {
    "shared_memory": "--shm-path",
    "unix_socket": "--socket-path",
    "named_pipe": "--pipe-dir",
}
NUM_SAMPLES = 16


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The server's first stdout line, within ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"the server printed nothing within {timeout}s")
    return proc.stdout.readline().strip()


class Server:
    def __init__(self, model_dir: str, kind: str, *extra: str, wait: bool = True) -> None:
        self.dir = tempfile.mkdtemp(prefix="sai-svc-", dir="/tmp")
        self.path = os.path.join(self.dir, {"unix_socket": "s.sock"}.get(kind, "t"))
        self.log = open(os.path.join(self.dir, "stderr.log"), "w+")  # noqa: SIM115
        cmd = [
            sys.executable, "-m", "sensai.cli", "serve", "--model", model_dir, "--device", "cpu",
            "--transport", kind, _PATH_FLAG[kind], self.path, "--num-clients", "4",
            "--num-samples", str(NUM_SAMPLES), *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.address = ""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        try:
            self.address = _read_line(self.proc, 120)  # generous: a loaded CI machine
        except AssertionError:
            self.stop()
            raise AssertionError(self.stderr()) from None
        assert self.address, self.stderr()

    def stderr(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def servers(tiny_model_dir: str) -> Iterator[dict[str, Server]]:
    """One `sensai serve` per transport, started together (their start-up overlaps)."""
    started: dict[str, Server] = {}
    try:
        for kind in TRANSPORTS:
            started[kind] = Server(tiny_model_dir, kind, "--threads", "1", wait=False)
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.cleanup()


@pytest.fixture(params=TRANSPORTS)
def server(request: pytest.FixtureRequest, servers: dict[str, Server]) -> Server:
    return servers[request.param]


def _ids(b: int, s: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 300, size=(b, s), dtype=np.int64)


def _output(msg: Any, teacher: Any) -> TeacherOutput:
    return TeacherOutput.from_arrays(msg.tag, [np.array(a) for a in msg.arrays()])


class TestServed:
    def test_info_returns_the_configuration(self, server: Server, tiny_teacher: Any) -> None:
        with connect(server.address, connect_timeout=10) as c:
            msg = c.request_message([], kind="control", tag=INFO_TAG, timeout=20)
        assert msg.kind == "control" and msg.tag == INFO_TAG
        (blob,) = msg.arrays()
        assert blob.dtype == np.uint8 and blob.ndim == 1
        info = json.loads(blob.tobytes().decode("utf-8"))
        assert info["vocab_size"] == tiny_teacher.vocab_size
        assert info["output_format"] == "sampled"
        assert info["format_tag"] == FORMAT_TAGS["sampled"]
        assert info["num_samples"] == NUM_SAMPLES
        assert info["temperature"] == 1.0 and info["top_k"] == 0 and info["top_p"] == 1.0
        assert info["topk"] == 64 and info["max_batch_tokens"] == 16384
        from sensai.serving.batching import DEFAULT_BATCH_WAIT

        assert info["batch_wait_ms"] == DEFAULT_BATCH_WAIT * 1e3  # the CLI's default
        assert info["threads"] == 1  # --threads 1
        assert info["protocol_version"] == _core.PROTOCOL_VERSION
        assert info["model"]

    def test_seeded_answer_equals_the_in_process_teacher(
        self, server: Server, tiny_teacher: Any
    ) -> None:
        ids = _ids(2, 9, seed=1)
        mask = np.ones_like(ids)
        mask[1, 6:] = 0
        with connect(server.address, connect_timeout=10) as c:
            msg = c.request_message([ids, mask], tag=SEED_FLAG, value=1234, timeout=20)
        assert msg.kind == "response" and msg.tag == FORMAT_TAGS["sampled"]
        got = _output(msg, tiny_teacher)
        ref = tiny_teacher.compute(ids, mask, seed=1234)
        assert got.indices.shape == (2, 8, NUM_SAMPLES)
        for a, b in zip(got.to_arrays(), ref.to_arrays(), strict=True):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            else:
                assert torch.equal(a, b)

    def test_bad_request_gets_an_error_and_the_next_request_works(self, server: Server) -> None:
        with connect(server.address, connect_timeout=10) as c:
            with pytest.raises(RemoteError) as info:
                c.request_message([np.zeros((1, 5), dtype=np.float32)], timeout=20)
            assert info.value.code == _core.ERROR_CODES["BAD_REQUEST"]
            assert "input_ids must be integer token ids" in info.value.message
            with pytest.raises(RemoteError, match="beyond the vocabulary"):
                c.request_message([np.full((1, 4), 10**6, dtype=np.int64)], timeout=20)
            msg = c.request_message([_ids(1, 5)], timeout=20)  # 1-D or 2-D, no seed
            assert msg.kind == "response"
            assert [tuple(a.shape) for a in msg.arrays()][0] == (1, 4, NUM_SAMPLES)

    def test_info_command(self, server: Server) -> None:
        from click.testing import CliRunner

        from sensai.cli import cli

        out = CliRunner().invoke(cli, ["info", server.address, "--timeout", "20"])
        assert out.exit_code == 0, out.output
        info = json.loads(out.output)
        assert info["output_format"] == "sampled" and info["num_samples"] == NUM_SAMPLES

    def test_sigterm_exits_0_and_removes_the_files(self, server: Server) -> None:
        assert os.path.exists(server.path)
        assert server.stop() == 0, server.stderr()
        assert not os.path.exists(server.path), "the server left its transport files"


def test_info_command_without_a_server_fails_with_one_line(short_tmp: str) -> None:
    from click.testing import CliRunner

    from sensai.cli import cli

    address = f"unix://{short_tmp}/none.sock"
    out = CliRunner().invoke(cli, ["info", address, "--timeout", "0.2"])
    assert out.exit_code != 0
    assert "cannot connect" in out.output and len(out.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--transport", "carrier_pigeon"], "--transport"),
        (["--temperature", "0"], "--temperature"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
        (["--num-clients", "-1"], "--num-clients"),
        (["--max-nbytes", "-5"], "--max-nbytes"),
        (["--max-elems", "-5"], "--max-elems"),
        (["--max-batch-tokens", "0"], "--max-batch-tokens"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
        (["--threads", "0"], "--threads"),
        (["--format", "sampled", "--num-samples", "0"], "--num-samples"),
        (["--transport", "unix_socket", "--pipe-dir", "/tmp/x"], "--pipe-dir"),
    ],
)
def test_bad_flags_exit_before_loading_a_model(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    import sensai.teacher.model
    import sensai.transports
    from sensai.cli import cli

    def must_not_run(*a: Any, **k: Any) -> None:
        raise AssertionError("reached model loading / transport creation")

    monkeypatch.setattr(sensai.teacher.model, "TeacherLogitsServer", must_not_run)
    monkeypatch.setattr(sensai.transports, "create_transport", must_not_run)
    out = CliRunner().invoke(cli, ["serve", "--model", "/nonexistent/model", *args])
    assert out.exit_code == 2, out.output
    assert message in out.output and "Error:" in out.output


def test_logits_server_entry_point_has_the_same_flags(capsys: pytest.CaptureFixture) -> None:
    from sensai.logits_server import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--max-batch-tokens", "--max-elems", "--socket-path", "--seed", "--format"):
        assert flag in text


# --- batching, in-process over a stand-in transport ------------------------------------------


class _Msg:
    def __init__(self, arrays: list[np.ndarray], kind: str = "request", tag: int = 0, value=0):
        self._arrays, self.kind, self.tag, self.value = arrays, kind, tag, value
        self.has_bfloat16 = False
        self.is_list = True

    def __len__(self) -> int:
        return len(self._arrays)

    def arrays(self) -> list[np.ndarray]:
        return self._arrays


class _FakeTransport:
    """Queued requests per slot; records what the service answers."""

    def __init__(self, requests: dict[int, list[_Msg]]) -> None:
        self.pending = {s: list(q) for s, q in requests.items()}
        self.sent: list[tuple[int, str, int, Any]] = []

    def recv_message(self, slot: int) -> _Msg | None:
        q = self.pending.get(slot)
        return q.pop(0) if q else None

    def send_message(self, slot: int, body: Any, *, tag: int = 0, value: int = 0, kind: str = ""):
        self.sent.append((slot, kind, tag, body))

    def send_error(self, slot: int, code: int, message: str) -> None:
        self.sent.append((slot, "error", code, message))


@pytest.fixture
def full_teacher(tiny_model_dir: str):
    from sensai.teacher import TeacherLogitsServer

    return TeacherLogitsServer(tiny_model_dir, device="cpu", num_samples=16, output_format="full")


def test_batched_equals_unbatched_in_the_full_format(full_teacher: Any) -> None:
    a, b = _ids(2, 11, seed=2), _ids(1, 6, seed=3)
    fake = _FakeTransport({0: [_Msg([a])], 3: [_Msg([b])]})
    service = TeacherService(full_teacher, fake, max_batch_tokens=64)
    assert service.serve_round([0, 3]) == 2
    assert service.totals["batches"] == 1  # both in one forward
    assert [s[0] for s in sorted(fake.sent)] == [0, 3]
    answers = sorted(fake.sent, key=lambda x: x[0])
    for (_, kind, tag, body), ids in zip(answers, (a, b), strict=True):
        assert kind == "response" and tag == FORMAT_TAGS["full"]
        got = TeacherOutput.from_arrays(tag, body)
        alone = full_teacher.compute(ids)
        assert got.logits.shape == alone.logits.shape == (ids.shape[0], ids.shape[1] - 1, 320)
        assert bool(got.mask.all())
        torch.testing.assert_close(got.logits, alone.logits, rtol=1e-5, atol=1e-5)


def test_batches_respect_max_batch_tokens_and_answer_in_order(full_teacher: Any) -> None:
    ids = [_ids(1, 8, seed=i) for i in range(3)]
    bad = np.zeros((1, 4), dtype=np.float64)
    # slot 1 pipelines a good request, a bad one, then INFO: answered in that order
    fake = _FakeTransport(
        {
            0: [_Msg([ids[0]])],
            1: [_Msg([ids[1]]), _Msg([bad]), _Msg([], kind="control", tag=INFO_TAG)],
            2: [_Msg([ids[2]])],
        }
    )
    service = TeacherService(full_teacher, fake, max_batch_tokens=16)  # 2 rows of 8 at most
    assert service.serve_round([0, 1, 2]) == 5
    assert service.totals["batches"] == 2 and service.totals["errors"] == 1
    slot1 = [(k, t) for s, k, t, _ in fake.sent if s == 1]
    assert slot1 == [
        ("response", FORMAT_TAGS["full"]),
        ("error", _core.ERROR_CODES["BAD_REQUEST"]),
        ("control", INFO_TAG),
    ]
    for slot, kind, _, body in fake.sent:
        if kind == "response":
            ref = full_teacher.compute(ids[slot]).logits
            torch.testing.assert_close(torch.as_tensor(body[0]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["sampled", "compact", "coo", "topk"])
def test_every_format_batches_and_each_answer_is_its_own(tiny_model_dir: str, fmt: str) -> None:
    """Three unseeded requests (different lengths, one padded) in one forward: each answer has
    its request's shape and mask, its own teacher probabilities and N samples per position."""
    from sensai.teacher import TeacherLogitsServer

    teacher = TeacherLogitsServer(
        tiny_model_dir, device="cpu", num_samples=16, output_format=fmt, topk=8
    )
    a, b, c = _ids(2, 11, seed=2), _ids(1, 6, seed=3), _ids(1, 9, seed=4)
    mask_c = np.ones_like(c)
    mask_c[0, 6:] = 0
    fake = _FakeTransport({0: [_Msg([a])], 1: [_Msg([b])], 2: [_Msg([c, mask_c])]})
    service = TeacherService(teacher, fake)
    assert service.serve_round([0, 1, 2]) == 3
    assert service.totals["batches"] == 1 and len(fake.sent) == 3
    for slot, kind, tag, body in fake.sent:
        ids, mask = {0: (a, None), 1: (b, None), 2: (c, mask_c)}[slot]
        assert kind == "response" and tag == FORMAT_TAGS[fmt]
        got = TeacherOutput.from_arrays(tag, body, vocab_size=320, num_samples=16)
        alone = teacher.compute(ids, mask, seed=1)
        assert torch.equal(got.mask, alone.mask)
        torch.testing.assert_close(got.logz_full, alone.logz_full, rtol=1e-5, atol=1e-5)
        logp = torch.log_softmax(teacher.get_logits_from_input_ids(ids, mask), dim=-1)
        lp = got.teacher_logprobs()
        if fmt == "coo":
            bi, _, si, tok = got.coo_indices
            assert bi.max() < ids.shape[0] and si.max() < got.num_positions
            where = (bi, si, tok)
            per_position = torch.bincount(bi * got.num_positions + si)
        elif fmt == "compact":
            pos = got.position_of_entries()
            where = (pos // got.num_positions, pos % got.num_positions, got.tokens.long())
            per_position = torch.zeros(got.mask.numel(), dtype=torch.int64).index_add_(
                0, pos, got.counts.long()
            )
        else:
            where = None
            torch.testing.assert_close(lp, logp.gather(-1, got.indices), rtol=1e-4, atol=1e-4)
        if where is not None:
            real = got.mask[where[0], where[1]]
            torch.testing.assert_close(lp[real], logp[where][real], rtol=1e-4, atol=1e-4)
            assert torch.equal(per_position, torch.full_like(per_position, 16))


class _Arrivals(_FakeTransport):
    """``wait_any`` delivers the next scheduled arrival (slot -> message), else times out."""

    def __init__(self, requests: dict[int, list[_Msg]], arrivals: list[dict[int, _Msg]]):
        super().__init__(requests)
        self.arrivals = list(arrivals)
        self.waits: list[float] = []
        self.gone: set[int] = set()

    def wait_any(self, timeout: float | None = None) -> list[int]:
        from sensai.errors import TransportTimeout

        self.waits.append(float(timeout or 0))
        if not self.arrivals:
            raise TransportTimeout("nothing came")
        come = self.arrivals.pop(0)
        for slot, msg in come.items():
            self.pending.setdefault(slot, []).append(msg)
        return sorted(come)

    def is_connected(self, slot: int) -> bool:
        return slot not in self.gone


def test_clients_answered_last_round_are_gathered_into_one_batch(full_teacher: Any) -> None:
    ids = [_ids(1, 8, seed=i) for i in range(3)]
    fake = _Arrivals({s: [_Msg([ids[s]])] for s in range(3)}, [])
    service = TeacherService(full_teacher, fake, batch_wait=0.5)
    assert service.serve_round([0, 1, 2]) == 3  # nobody to wait for yet
    assert fake.waits == [] and service.totals["batches"] == 1
    round_seconds = service._round_seconds  # the first round's compute time
    assert 0 < round_seconds < 2.5
    # next round: slot 2 is back first; 0 arrives, then 1 (each within the window)
    fake.pending[2] = [_Msg([ids[2]])]
    fake.arrivals = [{0: _Msg([ids[0]])}, {1: _Msg([ids[1]])}]
    assert service.serve_round([2]) == 3
    assert service.totals["batches"] == 2 and service.totals["gathered"] == 2
    assert len(fake.waits) == 2 and all(0 < w <= 0.5 for w in fake.waits)
    # the window is at most a fifth of a round's compute time, not the whole 0.5 s
    assert fake.waits[0] <= 0.2 * round_seconds
    assert len(fake.sent) == 6 and {s for s, *_ in fake.sent[3:]} == {0, 1, 2}


def test_a_lone_client_or_a_gone_one_is_not_waited_for(full_teacher: Any) -> None:
    a = _ids(1, 8)
    fake = _Arrivals({0: [_Msg([a])]}, [])
    service = TeacherService(full_teacher, fake, batch_wait=5.0)
    for _ in range(3):  # one client in a loop: never waits
        fake.pending[0] = [_Msg([a])]
        service.serve_round([0])
    assert fake.waits == []
    # slots 0 and 1 served together; then 1 disconnects: slot 0 alone is not held back
    fake.pending = {0: [_Msg([a])], 1: [_Msg([a])]}
    service.serve_round([0, 1])
    fake.gone.add(1)
    fake.pending[0] = [_Msg([a])]
    service.serve_round([0])
    assert fake.waits == []
    # a connected client that does not come costs one bounded wait, then is not expected
    fake.gone.clear()
    fake.pending = {0: [_Msg([a])], 1: [_Msg([a])]}
    service.serve_round([0, 1])
    fake.pending[0] = [_Msg([a])]
    t0 = time.monotonic()
    service.serve_round([0])
    assert len(fake.waits) == 1 and time.monotonic() - t0 < 5
    fake.pending[0] = [_Msg([a])]
    service.serve_round([0])
    assert len(fake.waits) == 1
    # batch_wait=0 never waits; bad values are refused
    off = TeacherService(full_teacher, fake, batch_wait=0)
    fake.pending = {0: [_Msg([a])], 1: [_Msg([a])]}
    off.serve_round([0, 1])
    fake.pending[0] = [_Msg([a])]
    off.serve_round([0])
    assert len(fake.waits) == 1
    for bad in (-1, 11, "5", True):
        with pytest.raises(ValueError, match="batch_wait must be"):
            TeacherService(full_teacher, fake, batch_wait=bad)


def test_a_client_whose_requests_run_alone_is_not_waited_for(tiny_teacher: Any) -> None:
    """Seeded sampling requests run alone: a client sending them is not gathered for."""
    a = _ids(1, 8)
    fake = _Arrivals({0: [_Msg([a])], 1: [_Msg([a], tag=SEED_FLAG, value=3)]}, [])
    service = TeacherService(tiny_teacher, fake, batch_wait=5.0)
    service.serve_round([0, 1])
    assert service.totals["batches"] == 2
    fake.pending[0] = [_Msg([a])]
    service.serve_round([0])
    assert fake.waits == []


def test_serve_forever_returns_after_stop(full_teacher: Any) -> None:
    from sensai.errors import TransportTimeout

    class Idle(_FakeTransport):
        def wait_any(self, timeout: float | None = None) -> list[int]:
            service.stop()
            raise TransportTimeout("idle")

    service = TeacherService(full_teacher, Idle({}), poll_timeout=0.01)
    t0 = time.monotonic()
    service.serve_forever()
    assert time.monotonic() - t0 < 5


def test_seeded_requests_run_alone_and_oversized_answers_are_reported(tiny_teacher: Any) -> None:
    from sensai.errors import CapacityError

    class Small(_FakeTransport):
        def send_message(self, slot: int, body: Any, **kw: Any) -> None:
            if slot == 1:
                raise CapacityError("message carries too many bytes")
            super().send_message(slot, body, **kw)

    a, b = _ids(1, 7, seed=4), _ids(1, 7, seed=5)
    fake = Small({0: [_Msg([a], tag=SEED_FLAG, value=9)], 1: [_Msg([b], tag=SEED_FLAG, value=9)]})
    service = TeacherService(tiny_teacher, fake)
    service.serve_round([0, 1])
    assert service.totals["batches"] == 2  # seeded sampling: one forward each, reproducible
    (slot0,) = [x for x in fake.sent if x[0] == 0]
    got = TeacherOutput.from_arrays(slot0[2], slot0[3])
    assert torch.equal(got.indices, tiny_teacher.compute(a, seed=9).indices)
    (slot1,) = [x for x in fake.sent if x[0] == 1]
    assert slot1[1:3] == ("error", _core.ERROR_CODES["CAPACITY"])
    assert "does not fit" in slot1[3]
