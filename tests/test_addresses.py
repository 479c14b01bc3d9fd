"""Addresses reach the server they name: a bare shared-memory name means /dev/shm/NAME
everywhere, paths are percent-encoded in addresses (control characters refused), and a Unix
socket path the kernel cannot address is refused when the server starts, not by every client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensai import _core
from sensai.transports import (
    UnixSocketClient,
    connect,
    create_transport,
    format_address,
    parse_address,
)
from transport_helpers import KINDS, ServerThread

pytestmark = pytest.mark.timeout(60)

# The longest path a Unix socket can have: sun_path holds 108 bytes with the final NUL.
SUN_PATH_MAX = 107
SMALL = {"max_nbytes": 4096}


def answer_with_id(ident: int):
    """A slot handler that answers every request with ``[ident]``: who answered."""

    def handle(server, slot: int) -> None:
        if server.read_tensor_slot(slot) is not None:
            server.write_tensor_slot(slot, np.array([ident], dtype=np.int64))

    return handle


def who_answers(address: str) -> int:
    with connect(address, connect_timeout=5) as c:
        return int(c.request(np.zeros(1, dtype=np.int64), timeout=5)[0])


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"sensai-addr-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    for p in (f"/dev/shm/{name}", f"/dev/shm/{name}.lock"):
        if os.path.exists(p):
            os.unlink(p)


# --- item 4: a bare shared-memory name ---------------------------------------------------------


def test_bare_shm_name_means_dev_shm_everywhere(
    shm_name: str, short_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(short_tmp)  # a working directory that is not /dev/shm
    server, _ = create_transport("shared_memory", shm_name, num_slots=1, **SMALL)
    try:
        assert os.path.exists(f"/dev/shm/{shm_name}")
        address = format_address("shared_memory", shm_name)
        assert address == f"shm:///dev/shm/{shm_name}"
        assert parse_address(address) == ("shared_memory", f"/dev/shm/{shm_name}")
        assert parse_address(f"shm:{shm_name}") == ("shared_memory", f"/dev/shm/{shm_name}")
        # The name resolves as the shared-memory core resolves it (./NAME stays in the cwd).
        assert parse_address(format_address("shared_memory", f"./{shm_name}"))[1] == (
            os.path.join(short_tmp, ".", shm_name)
        )
        with ServerThread(server, answer_with_id(4)):
            assert who_answers(address) == 4
            assert who_answers(f"shm:{shm_name}") == 4
    finally:
        server.close()


def test_serve_with_a_bare_shm_name_prints_a_reachable_address(
    tiny_model_dir: str, shm_name: str, short_tmp: str
) -> None:
    cmd = [
        sys.executable, "-m", "sensai.cli", "serve", "--model", tiny_model_dir,
        "--device", "cpu", "--transport", "shared_memory", "--shm-path", shm_name,
        "--num-clients", "1", "--num-samples", "4", "--max-nbytes", "1048576",
    ]  # fmt: skip
    log_path = os.path.join(short_tmp, "stderr.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=short_tmp, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()  # the process's first line, or EOF if it dies
        with open(log_path) as log:
            assert address == f"shm:///dev/shm/{shm_name}", log.read()
        with connect(address, connect_timeout=10) as c:
            assert c.slot_id == 0 and c.server_alive()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert not os.path.exists(f"/dev/shm/{shm_name}")


# --- item 5: escaping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a#b.sock", "a?b=1.sock", "a%23b.sock", "a b.sock", "a;b.sock", "\u00e4\u20ac.sock"]
)
def test_socket_path_with_url_characters_reaches_that_server(short_tmp: str, name: str) -> None:
    decoy, _ = create_transport("unix_socket", os.path.join(short_tmp, "a"), **SMALL)
    named, _ = create_transport("unix_socket", os.path.join(short_tmp, name), **SMALL)
    try:
        with ServerThread(decoy, answer_with_id(1)), ServerThread(named, answer_with_id(2)):
            address = format_address("unix_socket", os.path.join(short_tmp, name))
            assert parse_address(address) == ("unix_socket", os.path.join(short_tmp, name))
            assert who_answers(address) == 2
    finally:
        named.close()
        decoy.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85"])
def test_control_characters_are_refused(kind: str, char: str, short_tmp: str) -> None:
    path = os.path.join(short_tmp, f"a{char}b")
    with pytest.raises(ValueError, match=r"control character .*expected a path"):
        format_address(kind, path)
    with pytest.raises(ValueError, match="control character"):
        create_transport(kind, path, **SMALL)
    assert os.listdir(short_tmp) == []  # refused before anything was created
    scheme = {"unix_socket": "unix", "named_pipe": "pipe", "shared_memory": "shm"}[kind]
    raw = f"{scheme}://{path}"
    with pytest.raises(ValueError, match="control character") as e:
        parse_address(raw)
    assert repr(raw) in str(e.value)  # the error names the address
    encoded = f"{scheme}://{short_tmp}/a%{ord(char):02X}b" if ord(char) < 0x80 else None
    if encoded is not None:
        with pytest.raises(ValueError, match="control character"):
            parse_address(encoded)


@pytest.mark.parametrize(
    "address",
    ["unix:///tmp/a#b.sock", "unix:///tmp/a?b=1.sock", "pipe:///tmp/x#", "shm:///dev/shm/x?"],
)
def test_raw_query_or_fragment_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match=r"percent-encode") as e:
        parse_address(address)
    assert repr(address) in str(e.value)


@pytest.mark.parametrize("address", ["unix://host/tmp/s.sock", "shm://sensai", "unix://", "x:/a"])
def test_other_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        parse_address(address)


def _expected_path(kind: str, path: str, cwd: str) -> str:
    if kind == "shared_memory":
        path = _core.shm_path(path)  # what the server creates: a bare name under /dev/shm
    return path if path.startswith("/") else os.path.join(cwd, path)


# Arbitrary path strings: any text, and any bytes a file name can hold (as os.fsdecode gives them).
PATHS = st.one_of(
    st.text(min_size=1),
    st.binary(min_size=1).filter(lambda b: b"\0" not in b).map(os.fsdecode),
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), path=PATHS)
def test_format_and_parse_round_trip(kind: str, path: str) -> None:
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in path):
        with pytest.raises(ValueError, match="control character"):
            format_address(kind, path)
        return
    address = format_address(kind, path)
    assert address.isascii() and not any(c in address for c in "?# \t\n")
    parsed = parse_address(address)
    assert parsed == (kind, _expected_path(kind, path, os.getcwd()))
    assert format_address(*parsed) == address
    assert parse_address(format_address(*parsed)) == parsed


# --- item 6: the kernel's limit on a socket path --------------------------------------------


def _long_dir(base: str, length: int) -> str:
    """A directory under ``base`` whose path is ``length`` bytes long."""
    d = os.path.join(base, "d" * (length - len(base) - 1))
    os.mkdir(d)
    assert len(d) == length
    return d


@pytest.mark.parametrize("extra", [0, 1, 100])
def test_socket_path_over_the_limit_is_refused_at_start(short_tmp: str, extra: int) -> None:
    # A long name in a short directory: the temporary socket's path is short enough to bind.
    path = os.path.join(short_tmp, "s" * (SUN_PATH_MAX + extra - len(short_tmp)))
    assert len(path) == SUN_PATH_MAX + 1 + extra  # 108, 109, 208 bytes
    with pytest.raises(ValueError, match=rf"at most {SUN_PATH_MAX} bytes.* has {len(path)}"):
        create_transport("unix_socket", path, **SMALL)
    assert os.listdir(short_tmp) == []  # refused before anything was created, the lock included


def test_relative_socket_path_whose_absolute_form_is_over_the_limit_is_refused(
    short_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _long_dir(short_tmp, 103)
    monkeypatch.chdir(d)
    with pytest.raises(ValueError, match=rf"at most {SUN_PATH_MAX} bytes.* has 110"):
        create_transport("unix_socket", "s.sock", **SMALL)  # <103 bytes>/s.sock
    assert os.listdir(d) == []


@pytest.mark.parametrize("name", ["x.sock", "s", "s" * 40])
def test_longest_socket_paths_serve(short_tmp: str, name: str) -> None:
    """Paths up to the limit work although the temporary socket bound first, in a private
    directory beside the path, has a longer path than the limit."""
    d = _long_dir(short_tmp, SUN_PATH_MAX - 1 - len(name))
    path = os.path.join(d, name)
    assert len(path) == SUN_PATH_MAX
    server, _ = create_transport("unix_socket", path, num_slots=1, **SMALL)
    try:
        with ServerThread(server, answer_with_id(6)):
            assert who_answers(format_address("unix_socket", path)) == 6
    finally:
        server.close()
    assert os.listdir(d) == []  # the temporary directory and the lock file are gone


def test_client_of_a_socket_path_over_the_limit_says_why(short_tmp: str) -> None:
    path = os.path.join(_long_dir(short_tmp, 100), "s" * 20)
    with pytest.raises(ValueError, match=rf"at most {SUN_PATH_MAX} bytes.* has {len(path)}"):
        UnixSocketClient(path, connect_timeout=5)
    with pytest.raises(ValueError, match=rf"at most {SUN_PATH_MAX} bytes.* has {len(path)}"):
        connect(format_address("unix_socket", path), connect_timeout=5)
