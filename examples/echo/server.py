"""The smallest SensAI server: doubles every tensor it receives (no model).

    python examples/echo/server.py [--transport shared_memory|unix_socket|named_pipe] [--path P]

Prints the address for the client, then serves until Ctrl-C or SIGTERM, and removes its files
on exit.
"""

from __future__ import annotations

import argparse
import signal

from sensai import SensAIServer
from sensai.transports import TRANSPORT_KINDS, create_transport, format_address


def double(x):
    """Any numpy function works here: it gets what the client sent (an array or a list)."""
    return [t * 2 for t in x] if isinstance(x, list) else x * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="shared_memory", choices=TRANSPORT_KINDS)
    ap.add_argument("--path", default=None, help="file, socket or directory (default: a temp path)")
    ap.add_argument("--num-clients", type=int, default=4)
    args = ap.parse_args()
    transport, path = create_transport(args.transport, path=args.path, num_slots=args.num_clients)
    server = SensAIServer(transport)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())  # `kill` stops it cleanly too
    print(format_address(args.transport, path), flush=True)
    try:
        server.serve_forever(double)
    except KeyboardInterrupt:
        pass
    finally:
        transport.close()


if __name__ == "__main__":
    main()
