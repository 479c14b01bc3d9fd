"""sensai.protocol: the format table, the INFO codec and its versioning, the tokenizer
fingerprint and SamplingParams; a new client against a server of today's INFO (version 0)."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest

from sensai import Client
from sensai.errors import ProtocolError, TokenizerMismatchError, UnsupportedFeatureError
from sensai.protocol import (
    FEATURES,
    FORMAT_TABLE,
    INFO_TAG,
    LEGACY_FEATURES,
    SamplingParams,
    decode_info,
    encode_info,
    format_spec,
    require_features,
)
from transport_helpers import make_server

PROMPT = 10.0


def test_protocol_does_not_import_torch() -> None:
    code = "import sys, sensai.protocol; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_format_table_drives_the_wire_order() -> None:
    from sensai.formats import TeacherOutput

    assert [f.tag for f in FORMAT_TABLE] == [1, 2, 3, 4, 5]
    assert format_spec("compact").fields == (
        "offsets", "tokens", "counts", "logprobs", "logz_sampled", "logz_full", "mask",
    )  # fmt: skip
    assert format_spec(1).fields == ("logits", "mask")
    with pytest.raises(ValueError, match="unknown teacher output format tag 9"):
        format_spec(9)
    with pytest.raises(ValueError, match="unknown output format 'dense'"):
        format_spec("dense")
    import torch

    out = TeacherOutput.from_arrays(5, [torch.zeros(1, 2, 3, dtype=torch.int64),
                                        torch.zeros(1, 2, 3), torch.zeros(1, 2),
                                        torch.zeros(1, 2), torch.ones(1, 2)])  # fmt: skip
    assert out.format == "topk" and out.mask.dtype == torch.bool
    assert len(out.to_arrays()) == 5
    with pytest.raises(ValueError, match="has 5 tensors, this message has 2"):
        TeacherOutput.from_arrays(5, out.to_arrays()[:2])


class _Msg:
    def __init__(self, kind: str, tag: int, arrays: list[np.ndarray]) -> None:
        self.kind, self.tag, self._arrays = kind, tag, arrays

    def arrays(self) -> list[np.ndarray]:
        return self._arrays


def test_info_codec_round_trips_and_refuses_what_is_not_info() -> None:
    info = {"model": "m", "info_version": 1, "features": ["seed"]}
    assert decode_info(_Msg("control", INFO_TAG, encode_info(info))) == info
    with pytest.raises(ProtocolError, match="unexpected answer"):
        decode_info(_Msg("response", INFO_TAG, encode_info(info)))
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        decode_info(_Msg("control", INFO_TAG, [np.frombuffer(b"\xff{", dtype=np.uint8)]))
    with pytest.raises(ProtocolError, match="not a JSON object"):
        decode_info(_Msg("control", INFO_TAG, encode_info([1, 2])))  # type: ignore[arg-type]


def test_features_of_old_and_new_servers() -> None:
    require_features({}, LEGACY_FEATURES)  # version 0: today's features
    with pytest.raises(UnsupportedFeatureError, match="'tokenizer_fingerprint'") as e:
        require_features({}, ["seed", "tokenizer_fingerprint"])
    assert e.value.features == ["tokenizer_fingerprint"] and e.value.info_version == 0
    new = {"info_version": 1, "features": list(FEATURES)}
    require_features(new, FEATURES)
    with pytest.raises(UnsupportedFeatureError, match="'token_logprobs'"):
        require_features(new, ["token_logprobs"])


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"num_samples": -2}, "num_samples"),
        ({"num_samples": 2.5}, "num_samples"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kwargs)


def test_sampling_params_full_mode_and_formats() -> None:
    for n in (None, 0, -1):
        assert SamplingParams(num_samples=n).full
        with pytest.raises(ValueError, match="'compact' format samples"):
            SamplingParams(num_samples=n).for_format("compact")
        SamplingParams(num_samples=n).for_format("topk")
    assert SamplingParams(num_samples=4).samples() == 4


# -- a server of today's INFO, a new client ------------------------------------------------
def _serve(transport: Any, teacher: Any, old: bool) -> tuple[Any, threading.Thread]:
    from sensai.serving.batching import TeacherService

    class OldService(TeacherService):
        def info(self) -> dict[str, Any]:  # what servers said before INFO was versioned
            info = super().info()
            for key in ("info_version", "features", "server_id", "tokenizer"):
                del info[key]
            return info

    service = (OldService if old else TeacherService)(teacher, transport, batch_wait=0)
    t = threading.Thread(target=service.serve_forever, daemon=True)
    t.start()
    return service, t


@pytest.mark.parametrize("old", [True, False], ids=["info-v0", "info-v1"])
def test_new_client_against_old_and_new_servers(
    old: bool, tmp_path: Any, tiny_teacher: Any
) -> None:
    path = str(tmp_path / "s.sock")
    transport = make_server("unix_socket", path)
    service, t = _serve(transport, tiny_teacher, old)
    try:
        with Client(f"unix://{path}", timeout=30, require=["seed"]) as c:
            out = c.get_teacher_logits(np.arange(1, 7)[None], seed=3)
            assert out.format == "sampled" and out.batch_size == 1
            if old:
                assert c.features() == frozenset(LEGACY_FEATURES)
                with pytest.raises(UnsupportedFeatureError, match="'tokenizer_fingerprint'"):
                    c.check_tokenizer(tiny_teacher.tokenizer)
            else:
                info = c.info()
                assert info["info_version"] == 1 and info["server_id"] == service.server_id
                assert info["tokenizer"]["vocab_size"] == len(tiny_teacher.tokenizer.get_vocab())
                c.check_tokenizer(tiny_teacher.tokenizer)
                c.check_tokenizer(tiny_teacher.tokenizer, vocab_size=512)  # padded: fine
                with pytest.raises(TokenizerMismatchError, match="fewer than"):
                    c.check_tokenizer(tiny_teacher.tokenizer, vocab_size=10)
                other = _OtherTokenizer(tiny_teacher.tokenizer)
                with pytest.raises(TokenizerMismatchError, match="not the teacher's"):
                    c.check_tokenizer(other)
            with pytest.raises(UnsupportedFeatureError, match="'token_logprobs'"):
                c.require("token_logprobs")
        with (
            pytest.raises(UnsupportedFeatureError, match="'token_logprobs'"),
            Client(f"unix://{path}", timeout=30, require=["token_logprobs"]) as c2,
        ):
            c2.info()
    finally:
        service.stop()
        transport.close()
        t.join(PROMPT)
    assert not t.is_alive()


class _OtherTokenizer:
    """The teacher's tokenizer with one more token."""

    def __init__(self, tok: Any) -> None:
        self._vocab = {**tok.get_vocab(), "<extra>": 10_000}
        self.special_tokens_map = tok.special_tokens_map

    def get_vocab(self) -> dict[str, int]:
        return self._vocab
