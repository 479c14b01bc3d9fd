"""Torch tensors that hold no dense, strided data (sparse layouts, nested, mkldnn, meta,
quantized) are refused with a TypeError naming what is accepted, by the raw endpoints and by
`sensai.Client`, before anything is sent; the endpoint keeps working after the refusal."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from sensai import Client
from sensai.transports import connect, create_transport, format_address
from transport_helpers import ServerThread

pytestmark = pytest.mark.timeout(60)

ACCEPTED = r"expected a numpy array or a dense, strided torch tensor on the CPU or a GPU"


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 0, 2], [0, 3, 0]], dtype=torch.int64)


def _nested(layout: Any) -> torch.Tensor:
    return torch.nested.nested_tensor([torch.arange(3), torch.arange(2)], layout=layout)


# name -> (a tensor of integer ids in that layout, the words the error must use)
BAD: dict[str, tuple[Callable[[], torch.Tensor], str]] = {
    "sparse_coo": (lambda: _ids().to_sparse(), "sparse_coo"),
    "sparse_csr": (lambda: _ids().to_sparse_csr(), "sparse_csr"),
    "sparse_csc": (lambda: _ids().to_sparse_csc(), "sparse_csc"),
    "sparse_bsr": (lambda: _ids().to_sparse_bsr((1, 1)), "sparse_bsr"),
    "sparse_bsc": (lambda: _ids().to_sparse_bsc((1, 1)), "sparse_bsc"),
    "nested": (lambda: _nested(torch.strided), "nested"),
    "nested_jagged": (lambda: _nested(torch.jagged), "nested"),
    "meta": (lambda: torch.empty(2, 3, dtype=torch.int64, device="meta"), "meta device"),
    "quantized": (
        lambda: torch.quantize_per_tensor(torch.ones(2, 3), 1.0, 0, torch.qint8),
        "quantized",
    ),
}
if torch.backends.mkldnn.is_available():
    BAD["mkldnn"] = (lambda: torch.ones(2, 3).to_mkldnn(), "mkldnn")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A connected client of an echo server (Unix socket: refusals happen before any send)."""
    d = str(tmp_path_factory.mktemp("layouts", numbered=True))
    path = os.path.join(d, "s.sock") if len(d) < 90 else f"/tmp/sai-layouts-{os.getpid()}.sock"
    server, _ = create_transport("unix_socket", path, num_slots=2, max_nbytes=4096)
    with ServerThread(server):
        with connect(format_address("unix_socket", path), connect_timeout=5) as c:
            yield c
    server.close()


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested tensors are a prototype
@pytest.mark.parametrize("name", list(BAD))
def test_raw_endpoint_refuses_a_tensor_without_dense_data(live: Any, name: str) -> None:
    make, words = BAD[name]
    with pytest.raises(TypeError, match=rf"tensor 0: {ACCEPTED}, got .*{words}"):
        live.request(make(), timeout=5)
    with pytest.raises(TypeError, match=rf"tensor 1: {ACCEPTED}, got .*{words}"):
        live.write_tensor([np.arange(3), make()])
    # Nothing was sent: the next request gets its own answer.
    np.testing.assert_array_equal(live.request(torch.arange(4), timeout=5), np.arange(4))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(BAD))
def test_client_refuses_token_ids_without_dense_data(name: str) -> None:
    make, words = BAD[name]
    client = Client("unix:///nonexistent-sensai-dir/s.sock", connect_timeout=0.1)
    with pytest.raises(TypeError, match=rf"input_ids: {ACCEPTED}, got .*{words}"):
        client.get_teacher_logits(make())
    with pytest.raises(TypeError, match=rf"attention_mask: {ACCEPTED}, got .*{words}"):
        client.get_teacher_logits(_ids(), make())
    client.close()


def test_views_and_grad_tensors_are_still_accepted(live: Any) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4).requires_grad_()
    for t in (base, base.t(), base[:, ::2], base.expand(2, 3, 4)):
        np.testing.assert_array_equal(live.request(t, timeout=5), t.detach().numpy())
