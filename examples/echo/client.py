"""The smallest SensAI client: sends a list of arrays to the echo server and checks the answer.

python examples/echo/client.py ADDRESS        # the line the server printed
"""

from __future__ import annotations

import sys

import numpy as np

from sensai.transports import connect


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with connect(sys.argv[1]) as client:  # leases any free slot
        doubled, as_int = client.request([x, x.astype(np.int64)], timeout=10)
    assert np.array_equal(doubled, 2 * x) and np.array_equal(as_int, 2 * x.astype(np.int64))
    print("sent", x.tolist(), "got", doubled.tolist())


if __name__ == "__main__":
    main()
