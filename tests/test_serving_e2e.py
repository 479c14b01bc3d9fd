"""End to end: `sensai serve` in its own process, DataLoader workers with the collate wrapper."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from sensai import Client, wrap_collate_function
from test_service import TRANSPORTS, Server


class _Texts(Dataset):
    """Sixteen rows of 9 token ids of the tiny vocabulary."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.rows = torch.randint(3, 320, (16, 9), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def _collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack(items)}


@pytest.fixture(scope="module")
def e2e_servers(tiny_model_dir: str) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for kind in TRANSPORTS:
            started[kind] = Server(tiny_model_dir, kind, "--num-clients", "6", wait=False)
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.cleanup()


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_four_dataloader_workers_get_correct_answers(
    e2e_servers: dict[str, Server], tiny_teacher, kind: str
) -> None:
    client = Client(e2e_servers[kind].address, connect_timeout=10)
    assert client.info()["vocab_size"] == tiny_teacher.vocab_size  # used before the fork
    loader = DataLoader(
        _Texts(),
        batch_size=2,
        num_workers=4,
        collate_fn=wrap_collate_function(_collate, client),
        multiprocessing_context="fork",
    )
    seen = 0
    for batch in loader:
        idx, vals = batch["teacher_logits_indices"], batch["teacher_logits_values"]
        assert idx.shape == (2, 8, 16) and batch["teacher_logits_format"] == "sampled"
        # every sampled value is the teacher's own logit at that token
        logits = tiny_teacher.get_logits_from_input_ids(batch["input_ids"])
        torch.testing.assert_close(vals, logits.gather(-1, idx), atol=1e-4, rtol=1e-4)
        seen += 1
    assert seen == 8
    client.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_killed_server_makes_the_wrapper_warn_and_continue(
    tiny_model_dir: str, kind: str
) -> None:
    server = Server(tiny_model_dir, kind)
    try:
        client = Client(server.address, connect_timeout=1)
        collate = wrap_collate_function(
            _collate, client, num_retries=2, retry_delay=0.05, on_error="skip"
        )
        rows = [_Texts()[i] for i in range(2)]
        assert "teacher_logits_indices" in collate(rows)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning):
            batch = collate(rows)
        assert time.monotonic() - t0 < 15
        assert not any(k.startswith("teacher_logits") for k in batch)
        assert torch.equal(batch["input_ids"], torch.stack(rows))
    finally:
        server.cleanup()
