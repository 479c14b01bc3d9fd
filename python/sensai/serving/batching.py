"""``TeacherService``: a teacher served over a transport, batching requests across clients.

Wire protocol (what :class:`sensai.Client` speaks):

* Request: kind ``"request"``, tensors ``[input_ids]`` or ``[input_ids, attention_mask]``
  (``[B, S]`` or ``[S]``). Header tag bit 0 (:data:`SEED_FLAG`) set means "a seed is given",
  and the header value is then the seed (u64). Other tag bits must be zero.
* Response: kind ``"response"``, tag = the output format's tag
  (:data:`sensai.protocol.FORMAT_TAGS`), tensors = ``TeacherOutput.to_arrays()`` as a list.
* INFO: a control request with tag :data:`INFO_TAG` and no tensors; the reply is a control
  message with the same tag and one uint8 1-D tensor holding UTF-8 JSON (see :meth:`info`).
* Failures answer with an error frame: BAD_REQUEST for invalid input, CAPACITY for a response
  larger than the transport allows (reported, never truncated), INTERNAL otherwise.

Batching. Each round takes every pending request from every ready slot, validates each one
separately (a bad one gets its error, the others proceed), and groups the valid ones into
batches whose ``rows * S_max`` stays within ``max_batch_tokens`` (requests are sorted by length
first, to keep padding small). A batch is right-padded (pad id: the tokenizer's pad token, else
0) with an attention mask, computed with one ``teacher.compute`` and split back per request by
batch rows, each part trimmed to the request's own ``S - 1`` positions. Right padding does not
change a causal model's logits at real positions beyond float rounding.

Every format batches: :meth:`TeacherOutput.rows` cuts a request's rows and positions out of
the batch's output (renumbering ``compact`` offsets and ``coo`` batch indices). Requests that
run alone (their own batch):

* a single request larger than ``max_batch_tokens``: it is not refused; it runs alone and the
  teacher's chunked LM head bounds its memory (the hard limits on a request are the transport's
  ``max_nbytes`` and the model's context, both checked before any compute);
* in the sampling formats (``sampled``, ``coo``, ``compact``) a request with a seed (its own or
  the server's default seed): it is computed alone, so its answer equals the in-process
  ``teacher.compute(input_ids, attention_mask, seed=seed)``. ``full`` and ``topk`` do not
  sample, so seeds do not stop them from batching.

Gathering. Clients in a request loop (training processes, DataLoader workers) come back a few
milliseconds after their answers, one after another; a server that started a forward on the
first arrival would split them into a batch of one and a batch of the rest, round after round.
So when a round's requests are taken and some client answered in the previous round has not
sent its next request yet, the server waits for it: at most ``batch_wait`` seconds, and never
more than :data:`BATCH_WAIT_SHARE` of an average round's compute time (so waiting for a client
that does not come costs at most that share of the throughput), and only while the batch is
below ``max_batch_tokens``. A lone client is never waited for; ``batch_wait=0`` turns
gathering off.

Answers on one slot are sent in the order its requests arrived (the transport answers the
oldest unanswered request of a slot).
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import SensAIError, TransportTimeout
from ..protocol import (
    ERROR_CODES,
    FEATURES,
    FORMAT_TAGS,
    INFO_TAG,
    INFO_VERSION,
    PROTOCOL_VERSION,
    SAMPLING_FORMATS,
    SEED_FLAG,
    encode_info,
    tokenizer_fingerprint,
)
from .loop import ServeLoop, deliver

__all__ = [
    "BATCH_WAIT_SHARE",
    "DEFAULT_BATCH_WAIT",
    "DEFAULT_MAX_BATCH_TOKENS",
    "SUMMARY_EVERY",
    "TeacherService",
]

log = logging.getLogger("sensai.serving")

DEFAULT_MAX_BATCH_TOKENS = 16384
#: Longest wait (seconds) for clients expected back before a batch starts.
DEFAULT_BATCH_WAIT = 0.010
#: The wait never exceeds this share of an average round's compute time.
BATCH_WAIT_SHARE = 0.2
#: Seconds between two INFO-level summary lines.
SUMMARY_EVERY = 10.0


@dataclass
class _Request:
    """One received message, and later its answer."""

    slot: int
    ids: torch.Tensor | None = None  # [B, S] int64 on the teacher's device
    mask: torch.Tensor | None = None  # [B, S] int64 or None (nothing padded)
    seed: int | None = None
    # the answer: ("response"|"control", tag, arrays) or ("error", code, message)
    answer: tuple[str, int, Any] | None = None
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.requests = 0
        self.tokens = 0
        self.batches = 0
        self.batched_requests = 0
        self.errors = 0


class TeacherService:
    """Serve ``teacher`` (a :class:`~sensai.logits_server.TeacherLogitsServer`) on ``transport``
    (a server endpoint) until :meth:`stop`.

    ``default_seed``: used by requests that carry none (None: torch's global RNG).
    ``model_name``: reported by INFO (default: the model's ``name_or_path``).
    ``batch_wait``: the longest wait, in seconds, for clients expected back before a batch
    starts (see the module doc; 0 turns it off).
    """

    def __init__(
        self,
        teacher: Any,
        transport: Any,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        *,
        default_seed: int | None = None,
        model_name: str | None = None,
        batch_wait: float = DEFAULT_BATCH_WAIT,
        poll_timeout: float = 0.5,
        summary_every: float = SUMMARY_EVERY,
    ) -> None:
        if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int):
            raise ValueError(f"max_batch_tokens must be an int >= 1, got {max_batch_tokens!r}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if isinstance(batch_wait, bool) or not isinstance(batch_wait, (int, float)):
            raise ValueError(f"batch_wait must be a number of seconds >= 0, got {batch_wait!r}")
        if not 0 <= batch_wait <= 10:
            raise ValueError(f"batch_wait must be in [0, 10] seconds, got {batch_wait}")
        if default_seed is not None and not 0 <= int(default_seed) < 2**64:
            raise ValueError(f"default_seed must be in [0, 2**64), got {default_seed!r}")
        self.teacher = teacher
        self.transport = transport
        self.max_batch_tokens = max_batch_tokens
        self.default_seed = default_seed
        self.batch_wait = float(batch_wait)
        self.poll_timeout = poll_timeout
        self.summary_every = summary_every
        if model_name is None:
            config = getattr(getattr(teacher, "model", None), "config", None)
            model_name = str(getattr(config, "name_or_path", "") or "unknown")
        self.model_name = model_name
        tok = getattr(teacher, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        self.pad_id = int(pad) if isinstance(pad, int) and pad >= 0 else 0
        #: This server's identity in INFO: another id at the same address is another server.
        self.server_id = uuid.uuid4().hex
        self._tokenizer = tokenizer_fingerprint(tok)
        self._loop = ServeLoop(transport, poll_timeout)
        self._stats = _Stats()
        self.totals = {"requests": 0, "batches": 0, "errors": 0, "gathered": 0}
        self._served_last: set[int] = set()  # slots answered by the previous round
        self._round_seconds = 0.0  # moving average of a round's compute time

    # ------------------------------------------------------------------------- config
    def info(self) -> dict[str, Any]:
        """The configuration INFO returns (versioned: see `sensai.protocol`)."""
        t = self.teacher
        fmt = t.output_format
        features = [f for f in FEATURES if f != "tokenizer_fingerprint" or self._tokenizer]
        return {
            "info_version": INFO_VERSION,
            "features": features,
            "server_id": self.server_id,
            "tokenizer": self._tokenizer,
            "model": self.model_name,
            "vocab_size": int(t.vocab_size),
            "output_format": fmt,
            "format_tag": FORMAT_TAGS[fmt],
            "num_samples": t.num_samples,
            "temperature": t.temperature,
            "top_k": t.top_k,
            "top_p": t.top_p,
            "topk": t.topk,
            "protocol_version": PROTOCOL_VERSION,
            "max_batch_tokens": self.max_batch_tokens,
            "batch_wait_ms": self.batch_wait * 1e3,
            "threads": torch.get_num_threads(),
            # a teacher that answers from a store (sensai.store) says which and how
            **(t.extra_info() if callable(getattr(t, "extra_info", None)) else {}),
        }

    def _info_answer(self) -> tuple[str, int, Any]:
        return ("control", INFO_TAG, encode_info(self.info()))

    # --------------------------------------------------------------------------- loop
    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; requests already taken are answered before it returns.
        ``stop()`` then ``transport.close()`` ends a wait at once (see `ServeLoop`)."""

        def tick() -> None:
            if time.monotonic() - self._stats.since >= self.summary_every:
                self._log_summary()

        self._loop.poll_timeout = self.poll_timeout
        try:
            self._loop.run(self.serve_round, tick)
        finally:
            self._log_summary()

    def stop(self) -> None:
        """Make :meth:`serve_forever` return after the current round (safe from a signal
        handler or another thread)."""
        self._loop.stop()

    @property
    def stopping(self) -> bool:
        return self._loop.stopping

    def serve_round(self, ready: list[int]) -> int:
        """Take every pending request of the ``ready`` slots (and of the clients gathered,
        see the module doc), answer them all; returns how many were taken."""
        queues: dict[int, deque[_Request]] = {}
        valid: list[_Request] = []
        taken = self._take(ready, queues, valid)
        self._flush(queues)  # errors and INFO at the head of a slot go out now
        taken += self._gather(queues, valid)
        t0 = time.monotonic()
        for batch in self._plan(valid):
            self._run_batch(batch)
            self._flush(queues)
        if valid:
            spent = time.monotonic() - t0
            avg = self._round_seconds
            self._round_seconds = spent if avg == 0 else 0.7 * avg + 0.3 * spent
        # who to wait for next round: clients whose requests could share a batch
        self._served_last = {r.slot for r in valid if not self._alone(r)}
        return taken

    def _take(
        self, ready: list[int], queues: dict[int, deque[_Request]], valid: list[_Request]
    ) -> int:
        """Receive and parse every pending request of the ``ready`` slots; returns how many."""
        taken = 0
        for slot in ready:
            while True:
                try:
                    msg = self.transport.recv_message(slot)
                except SensAIError as e:
                    log.warning("slot %d: cannot read a request: %s", slot, e)
                    break
                if msg is None:
                    break
                req = self._parse(slot, msg)
                del msg  # on shared memory its arrays view the client's buffer
                queues.setdefault(slot, deque()).append(req)
                taken += 1
                if req.answer is None:
                    valid.append(req)
        return taken

    def _gather(self, queues: dict[int, deque[_Request]], valid: list[_Request]) -> int:
        """Wait (briefly, see the module doc) for the clients answered in the previous round
        that have not sent their next request yet; take what arrives. Returns how many."""
        if self.batch_wait <= 0 or all(self._alone(r) for r in valid):
            return 0  # nothing that another request could join
        connected = getattr(self.transport, "is_connected", lambda slot: True)
        expected = {s for s in self._served_last - queues.keys() if connected(s)}
        if not expected:
            return 0
        window = self.batch_wait
        if self._round_seconds > 0:
            window = min(window, BATCH_WAIT_SHARE * self._round_seconds)
        deadline = time.monotonic() + window
        taken = 0
        while expected and not self.stopping:
            if sum(int(r.ids.numel()) for r in valid if r.ids is not None) >= self.max_batch_tokens:
                break  # a full batch already
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                more = self.transport.wait_any(left)
            except TransportTimeout:
                break
            taken += self._take(more, queues, valid)
            self._flush(queues)
            expected.difference_update(more)
        self.totals["gathered"] += taken
        return taken

    # ---------------------------------------------------------------------- requests
    def _parse(self, slot: int, msg: Any) -> _Request:
        req = _Request(slot)
        self._stats.requests += 1
        self.totals["requests"] += 1
        if msg.kind == "control":
            if msg.tag == INFO_TAG:
                req.answer = self._info_answer()
            else:
                req.answer = self._error(
                    slot, "BAD_REQUEST", f"unknown control tag {msg.tag:#x} (INFO is {INFO_TAG:#x})"
                )
            return req
        if msg.kind != "request":
            req.answer = self._error(slot, "BAD_REQUEST", f"unexpected message kind {msg.kind!r}")
            return req
        if msg.tag & ~SEED_FLAG:
            req.answer = self._error(
                slot, "BAD_REQUEST", f"unknown request flags {msg.tag:#x} (only bit 0, seed)"
            )
            return req
        n = len(msg)
        if n not in (1, 2):
            req.answer = self._error(
                slot,
                "BAD_REQUEST",
                f"a request carries [input_ids] or [input_ids, attention_mask]; got {n} tensors",
            )
            return req
        if msg.has_bfloat16:
            req.answer = self._error(
                slot, "BAD_REQUEST", "input_ids must be integer token ids, got bfloat16"
            )
            return req
        arrays = [np.array(a, copy=True) for a in msg.arrays()]  # own them: msg goes now
        try:
            ids, mask = self.teacher.prepare_inputs(arrays[0], arrays[1] if n == 2 else None)
        except ValueError as e:
            req.answer = self._error(slot, "BAD_REQUEST", str(e))
            return req
        req.ids, req.mask = ids, mask
        req.seed = int(msg.value) if msg.tag & SEED_FLAG else self.default_seed
        req.tokens = int(ids.numel()) if mask is None else int(mask.sum())
        return req

    def _error(self, slot: int, code: str, message: str) -> tuple[str, int, Any]:
        log.warning("slot %d: %s: %s", slot, code.lower().replace("_", " "), message)
        self._stats.errors += 1
        self.totals["errors"] += 1
        return ("error", ERROR_CODES[code], message)

    def _alone(self, req: _Request) -> bool:
        return req.seed is not None and self.teacher.output_format in SAMPLING_FORMATS

    def _plan(self, reqs: list[_Request]) -> list[list[_Request]]:
        """Batches of requests, each within ``max_batch_tokens`` (rows * longest S) unless a
        request alone exceeds it."""
        batches: list[list[_Request]] = []
        shared = []
        for r in reqs:
            (batches.append([r]) if self._alone(r) else shared.append(r))
        shared.sort(key=lambda r: int(r.ids.shape[1]))  # type: ignore[union-attr]
        cur: list[_Request] = []
        rows = s_max = 0
        for r in shared:
            b, s = (int(x) for x in r.ids.shape)  # type: ignore[union-attr]
            if cur and (rows + b) * max(s_max, s) > self.max_batch_tokens:
                batches.append(cur)
                cur, rows, s_max = [], 0, 0
            cur.append(r)
            rows += b
            s_max = max(s_max, s)
        if cur:
            batches.append(cur)
        return batches

    def _run_batch(self, batch: list[_Request]) -> None:
        try:
            if len(batch) == 1:
                r = batch[0]
                out = self.teacher.compute(r.ids, r.mask, seed=r.seed)
                arrays = [t.detach().cpu() for t in out.to_arrays()]
                r.answer = ("response", out.tag, arrays)
            else:
                self._compute_batched(batch)
        except Exception as e:  # noqa: BLE001 - reported to the clients concerned
            traceback.clear_frames(e.__traceback__)
            if len(batch) > 1:
                log.warning("a batch of %d failed (%s); retrying one by one", len(batch), e)
                for r in batch:
                    self._run_batch([r])
                return
            r = batch[0]
            code = "BAD_REQUEST" if isinstance(e, ValueError) else "INTERNAL"
            r.answer = self._error(r.slot, code, f"{type(e).__name__}: {e}")
            return
        self._stats.batches += 1
        self._stats.batched_requests += len(batch)
        self._stats.tokens += sum(r.tokens for r in batch)
        self.totals["batches"] += 1

    def _compute_batched(self, batch: list[_Request]) -> None:
        s_max = max(int(r.ids.shape[1]) for r in batch)  # type: ignore[union-attr]
        dev = batch[0].ids.device  # type: ignore[union-attr]
        ids_parts, mask_parts = [], []
        for r in batch:
            ids = r.ids
            assert ids is not None  # only valid requests are batched
            b, s = ids.shape
            mask = r.mask if r.mask is not None else torch.ones(b, s, dtype=torch.int64, device=dev)
            pad = s_max - s
            if pad:
                ids = torch.nn.functional.pad(ids, (0, pad), value=self.pad_id)
                mask = torch.nn.functional.pad(mask, (0, pad), value=0)
            ids_parts.append(ids)
            mask_parts.append(mask)
        out = self.teacher.compute(torch.cat(ids_parts), torch.cat(mask_parts), seed=None)
        # One copy of the whole batch to the host, then split there: splitting on a GPU would
        # copy (and synchronise) per request and tensor, and compact's split syncs by itself.
        out = out.to("cpu")
        row = 0
        for r in batch:
            b, s = (int(x) for x in r.ids.shape)  # type: ignore[union-attr]
            part = out.rows(row, row + b, self.teacher.num_positions(s))
            r.answer = ("response", out.tag, [t.detach().cpu() for t in part.to_arrays()])
            row += b

    # ------------------------------------------------------------------------ answers
    def _flush(self, queues: dict[int, deque[_Request]]) -> None:
        """Send every answer whose earlier requests on the same slot are answered."""
        for slot, q in queues.items():
            while q and q[0].answer is not None:
                self._send(slot, q.popleft().answer)  # type: ignore[arg-type]

    def _send(self, slot: int, answer: tuple[str, int, Any]) -> None:
        kind, tag, body = answer
        if kind == "error":
            sent = deliver(self.transport, slot, lambda: self.transport.send_error(slot, tag, body))
        else:
            sent = deliver(
                self.transport,
                slot,
                lambda: self.transport.send_message(slot, body, tag=tag, kind=kind),
            )
        if sent is not None:
            self._stats.errors += 1
            self.totals["errors"] += 1

    # ------------------------------------------------------------------------ summary
    def _log_summary(self) -> None:
        st = self._stats
        elapsed = max(time.monotonic() - st.since, 1e-9)
        if st.requests or st.errors:
            mean_batch = st.batched_requests / st.batches if st.batches else 0.0
            log.info(
                "%d requests, %.0f tokens/s, mean batch %.1f requests, %d errors (last %.0f s)",
                st.requests,
                st.tokens / elapsed,
                mean_batch,
                st.errors,
                elapsed,
            )
        st.reset()
