"""The teacher: ``input_ids`` in, logits or sampled logits out.

:class:`TeacherLogitsServer` keeps the seed's names and attributes. Inside, it runs the model's
body once to get the final hidden states, then applies the LM head and the sampling over chunks
of positions (``chunk_size``, default 1024), so that while sampling no more than one chunk of
``[chunk, V]`` float32 logits exists at a time: never ``[B, S, V]``.

Position ``i`` of an output is the teacher's distribution of the token after input tokens
``0..i``: ``S - 1`` positions for ``S`` input tokens (one position for a one-token input).
With an attention mask, positions are counted over the real tokens (as ``generate`` does, so
left padding gives the same answers as no padding) and padded positions get all-zero logits
(a uniform distribution): they carry no information and a loss must skip them (see
:meth:`TeacherLogitsServer.position_mask`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import sampling
from ..formats import TeacherOutput, build_output
from ..protocol import FORMATS, SamplingParams, format_spec
from .load import load_teacher, resolve_device

__all__ = ["TeacherLogitsServer", "TeacherSamples", "process_logits_request", "DEFAULT_CHUNK_SIZE"]

log = logging.getLogger(__name__)

#: Positions per LM-head/sampling chunk: 1024 x 49,152 float32 logits is 200 MB.
DEFAULT_CHUNK_SIZE = 1024

Seed = int | torch.Generator | None


@dataclass
class TeacherSamples:
    """Samples for a batch: ``indices``/``values`` [B, P, N] (int64 / float32 untempered
    logits), ``logz_sampled``/``logz_full`` [B, P] float32 (see :mod:`sensai.sampling`), and
    ``mask`` [B, P] bool, False at padded positions."""

    indices: torch.Tensor
    values: torch.Tensor
    logz_sampled: torch.Tensor
    logz_full: torch.Tensor
    mask: torch.Tensor


def _check_format(output_format: str, topk: int) -> None:
    if output_format not in FORMATS:
        raise ValueError(
            f"output_format must be one of {', '.join(FORMATS)}, got {output_format!r}"
        )
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 (positions), got {chunk_size!r}")
    return chunk_size


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    """A numpy array, torch tensor or nested list as a tensor; no dtype conversion yet."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, list | tuple):
        try:
            x = np.asarray(x)
        except ValueError as exc:  # ragged nested lists
            raise ValueError(f"{what} must be a rectangular array, got ragged lists") from exc
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise ValueError(f"{what} must hold numbers, got numpy dtype {x.dtype}")
        if x.dtype.kind == "u" and x.size and int(x.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{what} holds {int(x.max())}, which does not fit int64")
        if x.dtype.kind == "u":
            x = x.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(
        f"{what} must be a numpy array, a torch tensor or a list, got {type(x).__name__}"
    )


def _first_bad(bad: torch.Tensor) -> str:
    where = tuple(int(i) for i in bad.nonzero()[0].tolist())
    return f"at index {where}" + (f" ({int(bad.sum())} in all)" if int(bad.sum()) > 1 else "")


def _make_generator(seed: Seed, device: torch.device) -> torch.Generator | None:
    """``seed``: None (torch's global RNG), a generator (used as is) or an int >= 0."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, a torch.Generator or None, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


class TeacherLogitsServer:
    """A causal LM that answers ``input_ids`` with logits or samples of them.

    ``model_name``: see :func:`sensai.teacher.resolve_model` (None: the embedded
    SmolLM2-135M-Instruct). ``num_samples`` None, 0 or -1 makes :meth:`process_input_ids`
    return full logits. ``dtype``, ``chunk_size``, ``output_format`` (the format of
    :meth:`compute`: one of :data:`sensai.formats.FORMATS`) and ``topk`` (k of the ``topk``
    format, distinct from the ``top_k`` sampling mask) are keyword options; the remaining
    ``model_kwargs`` go to ``from_pretrained``.
    """

    def __init__(
        self,
        model_name: str | os.PathLike[str] | None = None,
        device: str | torch.device = "auto",
        num_samples: int | None = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        *,
        dtype: str | torch.dtype | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        output_format: str = "sampled",
        topk: int = 64,
        **model_kwargs: Any,
    ) -> None:
        params = SamplingParams(num_samples, temperature, top_p, top_k)
        _check_chunk_size(chunk_size)
        _check_format(output_format, topk)
        model, tokenizer, dev = load_teacher(model_name, device, dtype, **model_kwargs)
        self._setup(model, tokenizer, dev, params, chunk_size)
        self.output_format, self.topk = output_format, int(topk)

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        num_samples: int | None = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        output_format: str = "sampled",
        topk: int = 64,
    ) -> TeacherLogitsServer:
        """Wrap a model already in memory (e.g. a randomly initialised one for a benchmark).

        ``device`` None keeps the model where it is; otherwise the model moves there.
        """
        params = SamplingParams(num_samples, temperature, top_p, top_k)
        _check_chunk_size(chunk_size)
        if device is None:
            dev = next(model.parameters()).device
        else:
            dev = resolve_device(device)
            model.to(dev)
        model.eval()
        _check_format(output_format, topk)
        self = cls.__new__(cls)
        self._setup(model, tokenizer, dev, params, chunk_size)
        self.output_format, self.topk = output_format, int(topk)
        return self

    def _setup(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        sampling_params: SamplingParams,
        chunk_size: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.num_samples = sampling_params.num_samples
        self.temperature = float(sampling_params.temperature)
        self.top_p = float(sampling_params.top_p)
        self.top_k = int(sampling_params.top_k)
        self.chunk_size = chunk_size
        self._scratch: torch.Tensor | None = None  # see _sampling_scratch
        self._scratch_lock = threading.Lock()
        config = model.config
        head = model.get_output_embeddings()
        if head is None or not isinstance(head, torch.nn.Module):
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
        self._head = head
        weight = getattr(head, "weight", None)
        self.vocab_size = int(weight.shape[0]) if weight is not None else int(config.vocab_size)
        embeddings = model.get_input_embeddings()
        self._input_vocab = int(getattr(embeddings, "num_embeddings", self.vocab_size))
        max_pos = getattr(config, "max_position_embeddings", None)
        self.max_length: int | None = int(max_pos) if max_pos else None
        body = None
        try:
            body = model.get_decoder()
        except (AttributeError, NotImplementedError):
            body = None
        if body is None or body is model:
            body = getattr(model, "base_model", None)
        if body is None or body is model:
            raise ValueError(
                f"{type(model).__name__} exposes no decoder body (get_decoder / base_model); "
                "expected a Hugging Face causal LM"
            )
        self._body = body
        params = inspect.signature(body.forward).parameters
        self._body_takes_positions = "position_ids" in params
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._logits_scaling = getattr(config, "logits_scaling", None)  # Granite: divide
        self._logit_scale = getattr(config, "logit_scale", None)  # Cohere: multiply

    # ------------------------------------------------------------------------- validation

    def prepare_inputs(
        self, input_ids: Any, attention_mask: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate and convert to ``[B, S]`` int64 tensors on the model's device.

        Raises ``ValueError`` naming the problem for float, boolean, negative or out-of-vocabulary
        ids, input that is not 1-D or 2-D or is empty, a mask of another shape or with values
        other than 0/1, and sequences longer than the model's context.
        """
        ids = _as_tensor(input_ids, "input_ids")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(
                f"input_ids must be integer token ids, got dtype {ids.dtype}; expected an "
                "integer array (e.g. int64)"
            )
        if ids.dim() not in (1, 2):
            raise ValueError(
                f"input_ids must be 1-D [S] or 2-D [B, S], got {ids.dim()}-D shape "
                f"{tuple(ids.shape)}"
            )
        if ids.numel() == 0:
            raise ValueError(
                f"input_ids is empty (shape {tuple(ids.shape)}); expected at least one token "
                "per sequence"
            )
        ids = ids.to(torch.int64)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0:
            raise ValueError(
                f"input_ids holds a negative token id {lo} {_first_bad(ids < 0)}; expected ids "
                f"in [0, {self._input_vocab})"
            )
        if hi >= self._input_vocab:
            raise ValueError(
                f"input_ids holds token id {hi} {_first_bad(ids >= self._input_vocab)}, beyond "
                f"the vocabulary: expected ids in [0, {self._input_vocab})"
            )
        seq_len = int(ids.shape[-1])
        if self.max_length is not None and seq_len > self.max_length:
            raise ValueError(
                f"sequence length {seq_len} exceeds the model's context of {self.max_length} "
                "tokens (config.max_position_embeddings); split or truncate the input"
            )
        mask = None
        if attention_mask is not None:
            mask = _as_tensor(attention_mask, "attention_mask")
            if tuple(mask.shape) != tuple(ids.shape):
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)}, but input_ids has shape "
                    f"{tuple(ids.shape)}; expected the same shape"
                )
            if mask.is_complex():
                raise ValueError(f"attention_mask must be 0/1, got dtype {mask.dtype}")
            bad = (mask != 0) & (mask != 1)
            if bool(bad.any()):
                raise ValueError(
                    f"attention_mask holds {mask[bad].flatten()[0].item()!r} "
                    f"{_first_bad(bad)}; expected only 0 (padding) and 1 (token)"
                )
            mask = mask.to(torch.int64)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = mask.unsqueeze(0) if mask is not None else None
        ids = ids.to(self.device)
        if mask is not None:
            mask = mask.to(self.device)
            if bool(mask.all()):
                mask = None  # nothing padded: the plain (faster) path is the same
        return ids, mask

    @property
    def sampling(self) -> SamplingParams:
        """The instance's sampling parameters (validated again if they were reassigned)."""
        return SamplingParams(self.num_samples, self.temperature, self.top_p, self.top_k)

    @staticmethod
    def num_positions(seq_len: int) -> int:
        """Teacher positions for ``seq_len`` input tokens: ``S - 1``, or 1 when ``S == 1``."""
        return max(seq_len - 1, 1)

    def position_mask(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, P]`` bool, False at padded positions, for prepared ``[B, S]`` inputs."""
        b, s = input_ids.shape
        p = self.num_positions(s)
        if mask is None:
            return torch.ones(b, p, dtype=torch.bool, device=input_ids.device)
        return mask[:, :p].to(torch.bool)

    # ------------------------------------------------------------------------------ model

    def _hidden_states(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states at the teacher positions, flattened: ``[B * P, H]``."""
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
        if mask is not None:
            kwargs["attention_mask"] = mask
            if self._body_takes_positions:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_(min=0)
        out = self._body(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        p = self.num_positions(ids.shape[1])
        return hidden[:, :p].reshape(-1, hidden.shape[-1])

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (and the model's logit post-processing) on ``[c, H]``, as float32."""
        logits = self._head(hidden).float()
        if self._logits_scaling:
            logits = logits / self._logits_scaling
        if self._logit_scale:
            logits = logits * self._logit_scale
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def iter_logit_chunks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, logits [c, V] float32)`` over the flat positions ``b * P + p`` of
        already prepared inputs (:meth:`prepare_inputs`), ``chunk_size`` positions at a time.

        Each chunk is fresh and may be modified. Call under ``torch.inference_mode()``.
        """
        size = _check_chunk_size(self.chunk_size if chunk_size is None else chunk_size)
        hidden = self._hidden_states(input_ids, attention_mask)
        flat_mask = None
        if attention_mask is not None:
            flat_mask = self.position_mask(input_ids, attention_mask).reshape(-1)
        for start in range(0, hidden.shape[0], size):
            logits = self._head_logits(hidden[start : start + size])
            if flat_mask is not None:
                logits.masked_fill_(~flat_mask[start : start + size, None], 0.0)
            yield start, logits

    @contextlib.contextmanager
    def _sampling_scratch(
        self, positions: int, chunk_size: int | None, fmt: str = "sampled"
    ) -> Iterator[Any]:
        """The working memory of format ``fmt`` over ``positions`` positions, kept between
        calls on a CPU (where fresh pages cost about as much as the pass they serve; CUDA's
        caching allocator already reuses memory): [chunk, V] float32 buffers in one tensor, two
        for the sampler (the weights and their cumulative sum), one for ``topk``, none for
        ``full``. None on other devices, and while another thread samples with this teacher."""
        buffers = {"full": 0, "topk": 1}.get(fmt, 2)
        if (
            positions <= 0
            or buffers == 0
            or self.device.type != "cpu"
            or not self._scratch_lock.acquire(blocking=False)
        ):
            yield None
            return
        try:
            size = _check_chunk_size(self.chunk_size if chunk_size is None else chunk_size)
            need = buffers * min(positions, size) * self.vocab_size
            if self._scratch is None or self._scratch.numel() < need:
                self._scratch = None  # free the smaller one before allocating
                self._scratch = torch.empty(need, dtype=torch.float32, device=self.device)
            yield self._scratch
        finally:
            self._scratch_lock.release()

    # -------------------------------------------------------------------------- public API

    @torch.inference_mode()
    def get_logits_from_input_ids(
        self, input_ids: Any, attention_mask: Any = None, *, chunk_size: int | None = None
    ) -> torch.Tensor:
        """Full float32 logits ``[B, S-1, V]`` (``[B, 1, V]`` when ``S == 1``) on the model's
        device; 1-D input is one sequence (B = 1)."""
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        b, p = ids.shape[0], self.num_positions(ids.shape[1])
        out = torch.empty(b * p, self.vocab_size, dtype=torch.float32, device=self.device)
        for start, logits in self.iter_logit_chunks(ids, mask, chunk_size):
            out[start : start + logits.shape[0]] = logits
        return out.reshape(b, p, self.vocab_size)

    @torch.inference_mode()
    def sample_input_ids(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        num_samples: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: Seed = None,
        chunk_size: int | None = None,
    ) -> TeacherSamples:
        """Sample every position in bounded memory; parameters default to the instance's.

        ``seed`` (an int or a generator on the model's device) makes the draw reproducible
        for the same inputs and ``chunk_size``.
        """
        params = SamplingParams(
            self.num_samples if num_samples is None else num_samples,
            self.temperature if temperature is None else temperature,
            self.top_p if top_p is None else top_p,
            self.top_k if top_k is None else top_k,
        )
        n = params.samples("sample_input_ids")
        temperature, top_p, top_k = params.temperature, params.top_p, params.top_k
        generator = _make_generator(seed, self.device)
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        b, p = ids.shape[0], self.num_positions(ids.shape[1])
        dev = self.device
        indices = torch.empty(b * p, n, dtype=torch.int64, device=dev)
        values = torch.empty(b * p, n, dtype=torch.float32, device=dev)
        logz_sampled = torch.empty(b * p, dtype=torch.float32, device=dev)
        logz_full = torch.empty(b * p, dtype=torch.float32, device=dev)
        with self._sampling_scratch(b * p, chunk_size) as scratch:
            for start, logits in self.iter_logit_chunks(ids, mask, chunk_size):
                stop = start + logits.shape[0]
                r = sampling.sample_positions(
                    logits, n, temperature, top_p, top_k, generator, scratch=scratch
                )
                indices[start:stop], values[start:stop] = r.indices, r.values
                logz_sampled[start:stop], logz_full[start:stop] = r.logz_sampled, r.logz_full
                del logits, r
        return TeacherSamples(
            indices=indices.reshape(b, p, n),
            values=values.reshape(b, p, n),
            logz_sampled=logz_sampled.reshape(b, p),
            logz_full=logz_full.reshape(b, p),
            mask=self.position_mask(ids, mask),
        )

    @torch.inference_mode()
    def compute(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        seed: Seed = None,
        output_format: str | None = None,
        chunk_size: int | None = None,
    ) -> TeacherOutput:
        """The teacher's answer in ``output_format`` (default: the instance's), computed in
        bounded memory; see :mod:`sensai.formats`. A sampled format needs num_samples >= 1."""
        fmt = self.output_format if output_format is None else output_format
        _check_format(fmt, self.topk)
        sampled = format_spec(fmt).samples
        self.sampling.for_format(fmt)
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        b, p = ids.shape[0], self.num_positions(ids.shape[1])
        with self._sampling_scratch(b * p, chunk_size, fmt) as scratch:
            return build_output(
                fmt,
                self.iter_logit_chunks(ids, mask, chunk_size),
                b,
                p,
                self.vocab_size,
                self.position_mask(ids, mask),
                num_samples=int(self.num_samples or 1) if sampled else 1,  # >= 1: checked
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                topk=min(self.topk, self.vocab_size),
                generator=_make_generator(seed, self.device),
                device=self.device,
                scratch=scratch,
            )

    def sample_from_logits(
        self,
        logits: torch.Tensor,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        *,
        seed: Seed = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The seed's API: ``(tokens, values)`` [num_samples, S] for [S, V] logits
        ([num_samples] for [V]); see :func:`sensai.sampling.sample_from_logits`."""
        generator = _make_generator(seed, logits.device)
        return sampling.sample_from_logits(
            logits, num_samples, temperature, top_p, top_k, generator=generator
        )

    def process_input_ids(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        seed: Seed = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Full logits [B, S-1, V] when ``num_samples`` is None, 0 or -1; otherwise
        ``(indices, values)`` each [B, S-1, num_samples] (int64, float32), on the model's
        device."""
        if self.sampling.full:
            return self.get_logits_from_input_ids(input_ids, attention_mask, chunk_size=chunk_size)
        s = self.sample_input_ids(input_ids, attention_mask, seed=seed, chunk_size=chunk_size)
        return s.indices, s.values

    def sample_to_sparse_coo(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        seed: Seed = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """The seed's sparse layout: per sequence a coalesced torch sparse COO tensor
        ``[num_samples, S-1, V]`` whose indices are ``[sample, position, vocab]`` and whose
        values are the sampled (untempered) logits. One tensor for 1-D input, a list of B
        tensors for [B, S] input."""
        self.sampling.samples("sample_to_sparse_coo")
        one_sequence = _as_tensor(input_ids, "input_ids").dim() == 1
        s = self.sample_input_ids(input_ids, attention_mask, seed=seed, chunk_size=chunk_size)
        b, p, n = s.indices.shape
        dev = s.indices.device
        # sample-major order, one entry per (sample, position): already sorted and unique.
        sample_idx = torch.arange(n, device=dev).repeat_interleave(p)
        pos_idx = torch.arange(p, device=dev).repeat(n)
        out = []
        for row in range(b):
            tokens = s.indices[row].t().reshape(-1)
            vals = s.values[row].t().reshape(-1)
            with warnings.catch_warnings():  # some torch versions warn even when told
                warnings.filterwarnings("ignore", message="Sparse invariant checks")
                coo = torch.sparse_coo_tensor(
                    torch.stack([sample_idx, pos_idx, tokens]),
                    vals,
                    size=(n, p, self.vocab_size),
                    is_coalesced=True,
                    check_invariants=False,
                )
            out.append(coo)
        return out[0] if one_sequence else out


def _split_request(input_data: Any) -> tuple[Any, Any]:
    """``[input_ids, attention_mask]`` / ``[input_ids]`` (lists of arrays) or a bare array."""
    if (
        isinstance(input_data, list | tuple)
        and input_data
        and all(isinstance(x, np.ndarray | torch.Tensor) for x in input_data)
    ):
        if len(input_data) == 1:
            return input_data[0], None
        if len(input_data) == 2:
            return input_data[0], input_data[1]
        raise ValueError(
            f"a request list holds {len(input_data)} arrays; expected [input_ids] or "
            "[input_ids, attention_mask]"
        )
    return input_data, None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


def process_logits_request(teacher: TeacherLogitsServer, input_data: Any) -> list[np.ndarray]:
    """The seed's request handler: ``[logits]`` in full mode, ``[indices, values]`` when
    sampling (numpy), and ``[np.array([-1]), np.array([-1])]`` on any failure (logged)."""
    try:
        input_ids, attention_mask = _split_request(input_data)
        result = teacher.process_input_ids(input_ids, attention_mask)
        if isinstance(result, torch.Tensor):
            return [_to_numpy(result)]
        indices, values = result
        return [_to_numpy(indices), _to_numpy(values)]
    except ValueError as exc:
        log.error("bad logits request: %s", exc)
    except Exception:
        log.exception("logits request failed")
    return [np.array([-1]), np.array([-1])]
