"""The seed's minimal example, with the seed's imports: a server doubling every tensor it gets.

The test runs this file as a script (``python test_seed_example.py PIPE_DIR``) for the server
process, and is the client itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from sensai.client import SensAIClient
from sensai.server import SensAIServer
from sensai.transports.named_pipe import NamedPipeClient, NamedPipeServer


def double(x):
    if isinstance(x, list):
        return [t * 2 for t in x]
    return x * 2


def serve(path: str) -> None:
    """The seed's server: prints "ready", serves until Ctrl-C, then removes its pipes."""
    with NamedPipeServer(path, 1) as t:
        print("ready", flush=True)
        try:
            SensAIServer(t).run_loop(double)
        except KeyboardInterrupt:
            print("stopped", flush=True)


@pytest.mark.timeout(30)
def test_seed_minimal_example(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "pipes")
    server = subprocess.Popen(
        [sys.executable, __file__, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
        with NamedPipeClient(path, slot_id=0) as t:
            out = SensAIClient(t).send_tensor([x, x.astype(np.int64)])
        assert isinstance(out, list) and len(out) == 2
        assert out[0].dtype == np.float32 and out[1].dtype == np.int64
        np.testing.assert_array_equal(out[0], 2 * x)
        np.testing.assert_array_equal(out[1], 2 * x.astype(np.int64))
        assert os.path.isdir(path)  # the client left the server's files alone
        server.send_signal(signal.SIGINT)
        stdout, stderr = server.communicate(timeout=10)
        assert server.returncode == 0, stderr
        assert stdout.strip() == "stopped"
        assert not os.path.exists(path), "the server did not remove its pipe directory"
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=5)


if __name__ == "__main__":
    serve(sys.argv[1])
