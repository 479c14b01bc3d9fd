"""Write the committed seeds of the shm_attach fuzz target (corpus/shm_attach/seed-*).

The layout is the one documented in rust/src/transport/shm.rs; see fuzz_targets/shm_attach.rs
for the input format. Run from rust/fuzz: python3 make_shm_seeds.py
"""

import os
import struct

READY, CLOSED = 0x59444552, 0x45534C43
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "shm_attach")


def align(x: int, a: int = 64) -> int:
    return (x + a - 1) // a * a


def header(
    slots: int,
    depth: int,
    tensors: int,
    dims: int,
    payload: int,
    ready: int = READY,
    version: int = 2,
) -> bytes:
    capacity = align(align(64 + tensors * (24 + 8 * dims)) + payload + tensors * 64)
    stride = (2 * depth * capacity + 2048 + 4095) // 4096 * 4096
    file_len = 4096 + stride * slots
    h = b"SNSAshm\0" + struct.pack("<IIIIII", version, slots, depth, tensors, dims, 0)
    h += struct.pack("<QQQQ", capacity, payload, stride, file_len)
    return h + struct.pack("<I", ready)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    fix = 0x02 | 0x04 | 0x08  # live pid, sized file, attach acknowledged ahead
    seeds = {
        # file mode: a valid header, attach to any slot / to slot 1
        "file_valid": bytes([fix]) + header(1, 2, 4, 4, 256),
        "file_valid_slot1": bytes([fix | 0x20]) + header(2, 3, 8, 8, 4096),
        "file_closed": bytes([fix]) + header(1, 2, 4, 4, 256, ready=CLOSED),
        "file_bad_version": bytes([fix]) + header(1, 2, 4, 4, 256, version=3),
        "file_not_ready": bytes([0x06]) + header(1, 2, 4, 4, 256, ready=0),
        # server mode (hex: mode, geometry, then op/arg pairs; see fuzz_targets/shm_attach.rs):
        # attach (acknowledged ahead), sync, request, serve, answer, receive, close
        "server_round_trip": bytes.fromhex("0100 0280 0300 0a00 08 0300 0500 0600 04 0c00 0f00"),
        # two clients, a reservation, an error answer, held messages, a patched queue entry
        "server_two_clients": bytes.fromhex(
            "0146 0280 0280 0300 0a00 08 0b01 03 0300 0580 0800 05 0901 0501 0701 02 0c80 0c01"
            " 0e01 0104 4000 ffffffff 0a00 01 0300 0500 0d00 01 0f00 0f01"
        ),
    }
    for name, data in seeds.items():
        with open(os.path.join(OUT, f"seed-{name}"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
