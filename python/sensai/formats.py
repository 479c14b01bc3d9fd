"""Teacher output formats: what a server sends for each position, and `TeacherOutput`.

Five formats, chosen when the server starts; each response carries the format's tag in the
frame header (``app_tag``) so a client decodes it without guessing. The table below is
`sensai.protocol.FORMAT_TABLE`, which the wire code reads.

=========  ===  =======================================================================
format     tag  tensors, in wire order (P = batch x positions)
=========  ===  =======================================================================
full         1  logits [B, S, V]
sampled      2  indices [B, S, N] int64, values [B, S, N] float32 (the seed's layout)
coo          3  coo_indices [4, B*S*N] int64 (batch, sample, position, token), coo_values
compact      4  offsets [P+1] int64, tokens [T] int32, counts [T] int16, logprobs [T] float32
topk         5  indices [B, S, k] int64, logprobs [B, S, k] float32
=========  ===  =======================================================================

(``counts`` is int32 when N > 32767.) Every format but ``full`` then carries, per
position, ``logz_sampled`` [B, S] (the log-partition of the distribution the samples were
drawn from: tempered and masked) and ``logz_full`` [B, S] (that of the untempered logits),
so that any returned logit ``x`` turns into an exact probability under either:
``exp(x / T - logz_sampled)`` and ``exp(x - logz_full)``.
Every format ends with ``mask`` [B, S] bool: False marks padded positions (attention mask 0),
which a loss must skip. Here S is the number of teacher positions (S_input - 1, or 1 for a
one-token input): position i is the teacher's distribution after tokens 0..i.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from .protocol import FORMAT_TAGS, FORMATS, SAMPLING_FORMATS, format_name, format_spec

__all__ = [
    "FORMAT_TAGS",
    "FORMATS",
    "OutputBuilder",
    "TeacherOutput",
    "build_output",
    "format_name",
]


def _t(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


@dataclass
class TeacherOutput:
    """The teacher's answer for one batch, in one of the formats (see the module doc).

    Fields a format does not use are None. ``temperature``, ``top_k`` and ``top_p`` describe
    the distribution the samples were drawn from. ``has_logprobs`` False marks an answer
    replayed from a counts-only store: it carries sampled tokens and their counts but no
    teacher log-probs or log-partitions (those tensors hold NaN), so `teacher_logprobs` and
    `sampled_logprobs` raise.
    """

    format: str
    mask: torch.Tensor
    logits: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    coo_indices: torch.Tensor | None = None
    coo_values: torch.Tensor | None = None
    logz_sampled: torch.Tensor | None = None
    logz_full: torch.Tensor | None = None
    vocab_size: int = 0
    num_samples: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    has_logprobs: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __getstate__(self) -> dict[str, Any]:
        # A client keeps the received message in extra["message"] while uncopied tensors view
        # its buffer; a pickled copy (a DataLoader worker's batch) carries the tensors' data
        # itself, and the message (a live transport buffer) cannot travel.
        state = self.__dict__.copy()
        state["extra"] = {k: v for k, v in self.extra.items() if k != "message"}
        return state

    # -- shape ---------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_positions(self) -> int:
        return int(self.mask.shape[1])

    @property
    def tag(self) -> int:
        return FORMAT_TAGS[self.format]

    # -- wire ----------------------------------------------------------------------
    def to_arrays(self) -> list[torch.Tensor]:
        """The tensors sent on the wire, in order (see the module doc)."""
        names = format_spec(self.format).fields
        return [getattr(self, name).contiguous() for name in names]

    @classmethod
    def from_arrays(cls, tag: int, arrays: list[Any], **params: Any) -> TeacherOutput:
        """Rebuild an output from the wire tensors of format ``tag``; ``params`` sets
        vocab_size, num_samples, temperature, top_k, top_p (from the server's info)."""
        spec = format_spec(int(tag))
        ts = [_t(a) for a in arrays]
        names = spec.fields
        if len(ts) != len(names):
            raise ValueError(
                f"a {spec.name!r} teacher output has {len(names)} tensors, this message has "
                f"{len(ts)}"
            )
        tensors: dict[str, Any] = dict(zip(names, ts, strict=True))
        tensors["mask"] = tensors["mask"].to(torch.bool)
        return cls(format=spec.name, **tensors, **params)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (tensor data only)."""
        return sum(t.numel() * t.element_size() for t in self.to_arrays())

    # -- conversions ----------------------------------------------------------------
    def rows(self, lo: int, hi: int, num_positions: int | None = None) -> TeacherOutput:
        """The output of batch rows ``lo..hi`` and their first ``num_positions`` positions
        (default: all), as if those rows had been computed alone: the same tensors in every
        format, ``compact`` offsets and ``coo`` batch indices renumbered from 0. This is how a
        server splits one batched forward back into its requests."""
        b, s = self.batch_size, self.num_positions
        p = s if num_positions is None else int(num_positions)
        if not (0 <= lo < hi <= b and 0 < p <= s):
            raise ValueError(
                f"rows {lo}..{hi} x {p} positions do not fit an output of {b} rows x {s}"
            )
        kw: dict[str, Any] = {"mask": self.mask[lo:hi, :p].contiguous()}
        for name in ("logits", "indices", "values", "logz_sampled", "logz_full"):
            v = getattr(self, name)
            if v is not None:
                kw[name] = v[lo:hi, :p].contiguous()
        if self.format == "topk":
            kw["logprobs"] = self.logprobs[lo:hi, :p].contiguous()  # type: ignore[index]
        elif self.format == "compact":
            offsets = self.offsets
            assert offsets is not None
            dev = offsets.device
            pos = torch.arange(lo, hi, device=dev)[:, None] * s + torch.arange(p, device=dev)
            pos = pos.reshape(-1)
            starts, lengths = offsets[pos], offsets[pos + 1] - offsets[pos]
            new = torch.zeros(pos.numel() + 1, dtype=offsets.dtype, device=dev)
            torch.cumsum(lengths, 0, out=new[1:])
            # entry j of the result comes from starts[its position] + its rank in the position
            take = torch.repeat_interleave(starts - new[:-1], lengths) + torch.arange(
                int(new[-1]), device=dev, dtype=offsets.dtype
            )
            kw["offsets"] = new
            for name in ("tokens", "counts", "logprobs"):
                kw[name] = getattr(self, name)[take]
        elif self.format == "coo":
            idx = self.coo_indices
            assert idx is not None and self.coo_values is not None
            keep = (idx[0] >= lo) & (idx[0] < hi) & (idx[2] < p)
            sub = idx[:, keep]
            sub[0] -= lo
            kw["coo_indices"] = sub
            kw["coo_values"] = self.coo_values[keep]
        return replace(self, extra={}, **kw)

    def to(self, device: torch.device | str) -> TeacherOutput:
        """A copy with every tensor on ``device``."""
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                kw[f.name] = v.to(device)
        return replace(self, **kw)

    def pin_memory(self) -> TeacherOutput:
        """A copy in page-locked memory (what a DataLoader with ``pin_memory=True`` calls)."""
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                kw[f.name] = v.pin_memory()
        return replace(self, **kw)

    def _need_logprobs(self, what: str) -> None:
        if not self.has_logprobs:
            raise ValueError(
                f"{what}: this answer comes from a counts-only store, which keeps the sampled "
                "tokens and their counts but not the teacher's log-probs (record with level "
                "'fp16' or 'lossless' to keep them)"
            )

    def teacher_logprobs(self) -> torch.Tensor:
        """Exact log-probabilities under the untempered teacher of the tokens this output
        carries: [B, S, N] for sampled, [B, S, k] for topk, [T] for compact, [B, S, V] for
        full (a log-softmax), [nnz] for coo."""
        self._need_logprobs("teacher_logprobs")
        f = self.format
        if f == "full":
            return torch.log_softmax(self.logits.float(), dim=-1)  # type: ignore[union-attr]
        if f in ("compact", "topk"):
            return self.logprobs  # type: ignore[return-value]
        if f == "sampled":
            return self.values.float() - self.logz_full.unsqueeze(-1)  # type: ignore[union-attr]
        b, _, s, _ = self.coo_indices  # type: ignore[misc]
        return self.coo_values.float() - self.logz_full[b, s]  # type: ignore[index,union-attr]

    def sampled_logprobs(self) -> torch.Tensor:
        """Log-probabilities, under the distribution the samples were drawn from (tempered
        and masked), of the tokens a sampled format carries."""
        self._need_logprobs("sampled_logprobs")
        t = float(self.temperature)
        f = self.format
        if f == "sampled":
            return self.values.float() / t - self.logz_sampled.unsqueeze(-1)  # type: ignore[union-attr]
        if f == "compact":
            pos = self.position_of_entries()
            b, s = pos // self.num_positions, pos % self.num_positions
            logits = self.logprobs + self.logz_full[b, s]  # type: ignore[operator,index]
            return logits / t - self.logz_sampled[b, s]  # type: ignore[index]
        if f == "coo":
            b, _, s, _ = self.coo_indices  # type: ignore[misc]
            return self.coo_values.float() / t - self.logz_sampled[b, s]  # type: ignore[union-attr,index]
        raise ValueError(f"the {f!r} format carries no samples")

    def position_of_entries(self) -> torch.Tensor:
        """For ``compact``: the flat position (b * S + s) of each entry."""
        if self.format != "compact":
            raise ValueError("position_of_entries is for the compact format")
        lengths = self.offsets[1:] - self.offsets[:-1]  # type: ignore[index]
        return torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lengths.device), lengths
        )

    def to_sparse_coo(self) -> torch.Tensor:
        """The seed's sparse layout: a COO tensor [B, num_samples, S, V] of sampled logits
        (index [batch, sample, position, token])."""
        b, s, n, v = self.batch_size, self.num_positions, self.num_samples, self.vocab_size
        if self.format == "coo":
            idx, vals = self.coo_indices, self.coo_values
        elif self.format == "sampled":
            n = self.indices.shape[-1]  # type: ignore[union-attr]
            idx, vals = _coo_from_sampled(self.indices, self.values)  # type: ignore[arg-type]
        else:
            raise ValueError(
                f"to_sparse_coo needs the 'sampled' or 'coo' format, not {self.format!r}"
            )
        assert idx is not None and vals is not None  # every tensor of its format is set
        return torch.sparse_coo_tensor(idx, vals, size=(b, n, s, v), check_invariants=True)


def _coo_from_sampled(
    indices: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, N] sampled indices/values -> COO indices [4, B*S*N] (batch, sample, position,
    token) and values [B*S*N]."""
    b, s, n = indices.shape
    dev = indices.device
    bi, si, ni = torch.meshgrid(
        torch.arange(b, device=dev),
        torch.arange(s, device=dev),
        torch.arange(n, device=dev),
        indexing="ij",
    )
    idx = torch.stack([bi.reshape(-1), ni.reshape(-1), si.reshape(-1), indices.reshape(-1)])
    return idx, values.reshape(-1)


class OutputBuilder:
    """Builds a `TeacherOutput` from logits delivered in chunks of positions, so that a
    teacher never holds [B, S, V] logits at once (except in the ``full`` format, whose
    output is exactly that).

    Positions are flat: p = b * S + s. Call :meth:`add` with consecutive chunks covering
    0..B*S, then :meth:`finish`. ``scratch`` (a float32 tensor of at least chunk x V elements)
    is the sampler's working buffer, instead of a fresh one per chunk.
    """

    def __init__(
        self,
        fmt: str,
        batch_size: int,
        num_positions: int,
        vocab_size: int,
        *,
        num_samples: int = 256,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        topk: int = 64,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        logits_dtype: torch.dtype = torch.float32,
        scratch: torch.Tensor | None = None,
    ) -> None:
        format_spec(fmt)  # ValueError for an unknown format
        if fmt == "topk" and not 1 <= topk <= vocab_size:
            raise ValueError(f"topk must be in 1..{vocab_size} (the vocabulary), got {topk}")
        self.fmt = fmt
        self.b, self.s, self.v = batch_size, num_positions, vocab_size
        self.n = num_samples
        self.temperature, self.top_k, self.top_p, self.k = temperature, top_k, top_p, topk
        self.generator = generator
        self.scratch = scratch  # the sampler's working buffer, reused across chunks
        p = batch_size * num_positions
        dev = torch.device(device)
        self._next = 0
        self.logz_sampled = torch.empty(p, dtype=torch.float32, device=dev)
        self.logz_full = torch.empty(p, dtype=torch.float32, device=dev)
        if fmt == "full":
            self.logits = torch.empty(p, vocab_size, dtype=logits_dtype, device=dev)
        elif fmt in ("sampled", "coo"):
            self.indices = torch.empty(p, num_samples, dtype=torch.int64, device=dev)
            self.values = torch.empty(p, num_samples, dtype=torch.float32, device=dev)
        elif fmt == "topk":
            self.indices = torch.empty(p, topk, dtype=torch.int64, device=dev)
            self.logprobs = torch.empty(p, topk, dtype=torch.float32, device=dev)
        else:  # compact
            self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, logits: torch.Tensor) -> None:
        """The logits [c, V] of the next c positions."""
        from . import sampling

        c = int(logits.shape[0])
        lo, hi = self._next, self._next + c
        if hi > self.b * self.s:
            raise ValueError(f"{hi} positions added to an output of {self.b * self.s}")
        self._next = hi
        if self.fmt == "full":
            self.logits[lo:hi] = logits
            return
        if self.fmt == "topk":
            idx, lp, lz = sampling.topk_positions(logits, self.k, scratch=self.scratch)
            self.indices[lo:hi], self.logprobs[lo:hi], self.logz_full[lo:hi] = idx, lp, lz
            self.logz_sampled[lo:hi] = lz
            return
        r = sampling.sample_positions(
            logits,
            self.n,
            self.temperature,
            self.top_p,
            self.top_k,
            generator=self.generator,
            scratch=self.scratch,
        )
        self.logz_sampled[lo:hi], self.logz_full[lo:hi] = r.logz_sampled, r.logz_full
        if self.fmt in ("sampled", "coo"):
            self.indices[lo:hi], self.values[lo:hi] = r.indices, r.values
            return
        # The sampler's ids are valid: skip compact_counts' range check (a device sync).
        offsets, tokens, counts, rows = sampling._compact_counts(r.indices)
        if self.n <= torch.iinfo(torch.int16).max:
            counts = counts.to(torch.int16)  # 2 bytes a token: compact stays < 25% of the seed's
        # One log-prob per distinct token: gather the untempered logits again at them.
        lp = logits[rows, tokens.long()].float() - r.logz_full[rows]
        self._parts.append((offsets, tokens, counts, lp))

    def finish(self, mask: torch.Tensor) -> TeacherOutput:
        """The output; ``mask`` [B, S] bool marks the real (non-padded) positions."""
        if self._next != self.b * self.s:
            raise ValueError(f"only {self._next} of {self.b * self.s} positions were added")
        b, s = self.b, self.s
        out = TeacherOutput(
            format=self.fmt,
            mask=mask.to(torch.bool).reshape(b, s),
            vocab_size=self.v,
            num_samples=self.n if self.fmt in SAMPLING_FORMATS else 0,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )
        if self.fmt == "full":
            out.logits = self.logits.reshape(b, s, self.v)
            return out
        out.logz_sampled = self.logz_sampled.reshape(b, s)
        out.logz_full = self.logz_full.reshape(b, s)
        if self.fmt == "sampled":
            out.indices = self.indices.reshape(b, s, self.n)
            out.values = self.values.reshape(b, s, self.n)
        elif self.fmt == "topk":
            out.indices = self.indices.reshape(b, s, self.k)
            out.logprobs = self.logprobs.reshape(b, s, self.k)
        elif self.fmt == "coo":
            out.coo_indices, out.coo_values = _coo_from_sampled(
                self.indices.reshape(b, s, self.n), self.values.reshape(b, s, self.n)
            )
        else:
            offs, toks, cnts, lps = [], [], [], []
            base = 0
            for i, (o, t, c, lp) in enumerate(self._parts):
                offs.append(o[:-1] + base if i < len(self._parts) - 1 else o + base)
                base += int(o[-1])
                toks.append(t)
                cnts.append(c)
                lps.append(lp)
            out.offsets = torch.cat(offs)
            out.tokens = torch.cat(toks)
            out.counts = torch.cat(cnts)
            out.logprobs = torch.cat(lps)
        return out


def build_output(
    fmt: str,
    chunks: Any,
    batch_size: int,
    num_positions: int,
    vocab_size: int,
    mask: torch.Tensor,
    **options: Any,
) -> TeacherOutput:
    """A `TeacherOutput` of format ``fmt`` from an iterable of ``(start, logits [c, V])``
    chunks covering the flat positions in order (what
    ``TeacherLogitsServer.iter_logit_chunks`` yields). ``options`` go to `OutputBuilder`
    (num_samples, temperature, top_k, top_p, topk, generator, device, logits_dtype, scratch)."""
    builder = OutputBuilder(fmt, batch_size, num_positions, vocab_size, **options)
    for _start, logits in chunks:
        builder.add(logits)
    return builder.finish(mask)
