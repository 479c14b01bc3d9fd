"""Security: what another local user, a planted file or a hostile peer can make the server do.

* Files and sockets 0600, directories 0700, whatever the umask.
* A symlink or file planted at the server's paths never redirects it: it refuses, or (a
  stale shared-memory file) replaces the name without writing through it.
* The Unix-socket server refuses peers of another uid (SO_PEERCRED), even with modes widened;
  every client, in turn, refuses a server of another uid (its shared-memory file, its pipe
  directory, its socket's SO_PEERCRED), even as root.
* Lock files: another user's is refused and left untouched; a stale one of our own is reused.
* A client only ever sees its own slot's messages, also while many processes lease slots.
* Wire data is never unpickled, and a hostile header cannot make the server allocate more
  than its limit.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import stat
import struct
import threading
import time
from typing import Any

import numpy as np
import pytest

import fault_helpers as fh
from sensai.errors import RoleError, SensAIError
from sensai.transports._endpoint import DEFAULT_MAX_TENSORS
from test_bad_input_matrix import RawSession, encode, error_of, good_request, put, split
from transport_helpers import (
    MP,
    Procs,
    ServerThread,
    answer_with,
    answer_with_slot,
    double,
    make_client,
    make_server,
    other_user_connect,
)

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


def _tree(root: str) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.lstat(p).st_mode
    return out


# --- modes ---------------------------------------------------------------------------------------


def test_modes_do_not_depend_on_the_umask(kind: str, path: str, short_tmp: str) -> None:
    old = os.umask(0)  # the widest umask: every mode below is the server's own choice
    try:
        server = make_server(kind, path, 2, max_nbytes=1 << 20)
    finally:
        os.umask(old)
    try:
        tree = _tree(short_tmp)
        assert "ep" in tree
        for name, mode in tree.items():
            want = 0o700 if stat.S_ISDIR(mode) else 0o600
            assert stat.S_IMODE(mode) == want, f"{name}: {oct(mode)}"
        kinds = {stat.S_IFMT(m) for m in tree.values()}
        expect = {
            "unix_socket": {stat.S_IFSOCK, stat.S_IFREG},
            "named_pipe": {stat.S_IFDIR, stat.S_IFIFO, stat.S_IFREG},
            "shared_memory": {stat.S_IFREG},
        }[kind]
        assert kinds == expect
    finally:
        server.close()
    assert os.listdir(short_tmp) == []


# --- planted files and symlinks ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["path", "lock"])
def test_planted_symlink_does_not_redirect_the_server(
    kind: str, path: str, short_tmp: str, where: str
) -> None:
    """A symlink at the server's path (or at its lock file) to a file of the victim's: the
    server refuses to start, and the file is untouched."""
    target = os.path.join(short_tmp, "victim.txt")
    with open(target, "w") as f:
        f.write("precious")
    os.chmod(target, 0o644)  # a server that followed the link would make it 0600 or write it
    before = os.stat(target)
    if where == "path":
        planted = path
    elif kind == "named_pipe":
        os.mkdir(path, 0o700)  # our own pipe directory, with a symlink planted inside
        planted = os.path.join(path, "server.lock")
    else:
        planted = path + ".lock"
    os.symlink(target, planted)
    with pytest.raises((SensAIError, OSError)) as ei:
        make_server(kind, path, 1)
    text = str(ei.value)
    assert any(
        s in text for s in ("not a socket", "not a regular file", "not a directory", "symbolic")
    ), text
    assert os.path.islink(planted) and os.readlink(planted) == target
    with open(target) as f:
        assert f.read() == "precious"
    after = os.stat(target)
    assert (after.st_ino, after.st_mode, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_size,
        before.st_mtime_ns,
    ), "the victim file was changed through the link"


def test_planted_file_is_never_written_through(kind: str, path: str, short_tmp: str) -> None:
    """A regular file at the path: refused by the socket and pipe servers; the shared-memory
    server takes it for a dead server's stale file and replaces the name (a new file, made
    with O_EXCL and renamed into place), never writing into the planted one."""
    with open(path, "w") as f:
        f.write("planted")
    keep = os.path.join(short_tmp, "planted-link")
    os.link(path, keep)  # see the planted inode whatever happens to the name
    if kind == "shared_memory":
        server = make_server(kind, path, 1, max_nbytes=1 << 20)
        try:
            assert os.stat(path).st_ino != os.stat(keep).st_ino
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        finally:
            server.close()
    else:
        with pytest.raises((SensAIError, OSError)) as ei:
            make_server(kind, path, 1)
        assert "not a" in str(ei.value), str(ei.value)
        assert os.stat(path).st_ino == os.stat(keep).st_ino
    with open(keep) as f:
        assert f.read() == "planted"


def test_fifo_planted_in_the_pipe_directory_is_replaced(path: str, short_tmp: str) -> None:
    """Files planted in the server's own (pre-existing) pipe directory are removed, not
    used: a symlink at a slot's FIFO name pointing elsewhere is replaced by a real FIFO."""
    target = os.path.join(short_tmp, "victim.txt")
    with open(target, "w") as f:
        f.write("precious")
    os.mkdir(path, 0o755)
    os.symlink(target, os.path.join(path, "slot0.req"))
    server = make_server("named_pipe", path, 1)
    try:
        st = os.lstat(os.path.join(path, "slot0.req"))
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700  # the mode was narrowed
        with ServerThread(server, answer_with(double)):
            with make_client("named_pipe", path) as c:
                np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), 2 * np.arange(3))
    finally:
        server.close()
    with open(target) as f:
        assert f.read() == "precious"


# --- other users ---------------------------------------------------------------------------------


def _become(uid: int) -> str | None:
    """Switch this (child) process to ``uid`` for good; why it could not, or None."""
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError as e:  # PermissionError without CAP_SETUID (a container, a non-root run)
        return f"{type(e).__name__}: {e}"
    return None


def _raw_hello_as(uid: int, path: str, conn: Any) -> None:
    """Drop to ``uid``, connect a bare socket (not a client of ours, which would refuse a
    server of another uid before the server could refuse us) and report what came back. The
    server answers at accept, before reading anything, so nothing is sent (a HELLO could
    meet a closed socket)."""
    why = _become(uid)
    if why is not None:
        conn.send(("setuid failed", why))
        return
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        got = b""
        while chunk := s.recv(1 << 16):
            got += chunk
        conn.send(("answered", got))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("failed", f"{type(e).__name__}: {e}"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_unix_socket_refuses_another_uid_even_with_open_modes(
    path: str, short_tmp: str, procs: Procs
) -> None:
    """The server's side: a peer of another uid gets a ROLE error frame and the connection
    closed, whatever the modes; our own client of that uid refuses the server first."""
    server = make_server("unix_socket", path, 2)
    with ServerThread(server, answer_with(double)):
        os.chmod(short_tmp, 0o755)
        os.chmod(path, 0o666)  # only SO_PEERCRED stands in the way now
        mine, theirs = MP.Pipe()
        procs.start(_raw_hello_as, NOBODY, path, theirs)
        theirs.close()
        assert mine.poll(20)
        res = mine.recv()
        if res[0] != "setuid failed":
            assert res[0] == "answered", res
            code, text = error_of(split(res[1])[0])
            assert code == 6 and "serves only uid 0, the peer runs as uid 65534" in text, text
            mine, theirs = MP.Pipe()
            procs.start(other_user_connect, "unix_socket", path, NOBODY, theirs)
            theirs.close()
            assert mine.poll(20)
            res = mine.recv()
            assert res[0] == "refused" and "runs as uid 0, not as this process's uid" in res[1], res
            with make_client("unix_socket", path) as c:  # the server is unharmed
                np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), 2 * np.arange(3))
    server.close()
    if res[0] == "setuid failed":
        pytest.skip(f"cannot switch to uid {NOBODY} here: {res[1]}")


def _acknowledge_every_hello(listener: socket.socket) -> None:
    """A hostile socket server: answer any HELLO with a HELLO_ACK for slot 0, as a server of
    another user could (the real one would itself refuse a peer of another uid)."""
    held = []
    while True:
        conn, _ = listener.accept()
        hello = b""
        while len(hello) < 64 and (chunk := conn.recv(64 - len(hello))):
            hello += chunk
        if len(hello) == 64:
            rid = struct.unpack_from("<Q", hello, 8)[0]
            limits = np.array([2, 8, 8, 1 << 20, os.getpid()], np.uint64)
            conn.sendall(encode(4, [limits], request_id=rid, tag=2))
        held.append(conn)


def _serve_as_another_user(kind: str, path: str, uid: int, conn: Any) -> None:
    """Drop to ``uid`` and serve on ``path`` with every mode widened (so nothing but the
    owner check stands in a client's way), until the parent says stop or goes away.

    Shared memory and named pipes run the real server; the Unix socket a hostile one
    (:func:`_acknowledge_every_hello`)."""
    why = _become(uid)
    if why is not None:
        conn.send(("setuid failed", why))
        return
    try:
        if kind == "unix_socket":
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(4)
            os.chmod(path, 0o666)
            threading.Thread(target=_acknowledge_every_hello, args=(listener,), daemon=True).start()
            conn.send(("ready", ""))
            conn.recv()
            return
        server = make_server(kind, path, 2, max_nbytes=1 << 20)
        for name, mode in _tree(os.path.dirname(path)).items():
            os.chmod(
                os.path.join(os.path.dirname(path), name), 0o777 if stat.S_ISDIR(mode) else 0o666
            )
        with ServerThread(server, answer_with(double)):
            conn.send(("ready", ""))
            try:
                conn.recv()
            except EOFError:
                pass
        server.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("failed", f"{type(e).__name__}: {e}"))


_REFUSAL = {
    "shared_memory": "shared-memory file {path} is owned by uid {them}, "
    "not by this process's uid {me}; refusing to attach",
    "named_pipe": "pipe directory {path} is owned by uid {them}, "
    "not by this process's uid {me}; refusing to connect",
    "unix_socket": "the server at {path} runs as uid {them}, "
    "not as this process's uid {me}; refusing to connect",
}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a server as another uid")
def test_a_client_refuses_a_server_of_another_uid(kind: str, short_tmp: str, procs: Procs) -> None:
    """A server of uid nobody, its files widened to 0666 and 0777 (a bare socket that
    acknowledges any HELLO for the Unix socket): the client (root here, whom no mode stops)
    refuses it before any request, naming the owner it found and the uid it expected."""
    os.chmod(short_tmp, 0o755)
    home = os.path.join(short_tmp, "nobody")
    os.mkdir(home)
    os.chown(home, NOBODY, NOBODY)  # a directory the other user can write
    path = os.path.join(home, "ep")
    mine, theirs = MP.Pipe()
    child = procs.start(_serve_as_another_user, kind, path, NOBODY, theirs)
    theirs.close()
    assert mine.poll(30), "the other user's server did not start"
    status, text = mine.recv()
    if status == "setuid failed":
        pytest.skip(f"cannot switch to uid {NOBODY} here: {text}")
    assert status == "ready", text
    try:
        with pytest.raises(RoleError) as ei:
            make_client(kind, path, None, connect_timeout=5).close()
        want = _REFUSAL[kind].format(path=path, them=NOBODY, me=os.geteuid())
        assert want in str(ei.value), str(ei.value)
    finally:
        mine.send("stop")
        child.join(10)


# --- lock files ----------------------------------------------------------------------------------


def _lock_of(kind: str, path: str) -> str:
    """The server's lock file (a named-pipe server's lives in its directory)."""
    return os.path.join(path, "server.lock") if kind == "named_pipe" else path + ".lock"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a file of another uid")
def test_a_planted_lock_file_of_another_uid_is_refused_and_left_alone(kind: str, path: str) -> None:
    """Another user's lock file (mode 0666) at the server's lock path: the server refuses
    to start, naming the owner, and neither locks, writes, chmods nor removes the file."""
    if kind == "named_pipe":
        os.mkdir(path, 0o700)  # our own pipe directory, with the file planted inside
    lock = _lock_of(kind, path)
    with open(lock, "w") as f:
        f.write("planted\n")
    os.chown(lock, NOBODY, NOBODY)
    os.chmod(lock, 0o666)
    before = os.lstat(lock)
    with pytest.raises(RoleError) as ei:
        make_server(kind, path, 1, max_nbytes=1 << 20)
    want = (
        f"lock file {lock} is owned by uid {NOBODY}, not by this process's uid "
        f"{os.geteuid()}; refusing to use it"
    )
    assert want in str(ei.value), str(ei.value)
    after = os.lstat(lock)
    fields = ("st_ino", "st_uid", "st_mode", "st_size", "st_mtime_ns")
    assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]
    with open(lock) as f:
        assert f.read() == "planted\n"
    # Nothing half-created beside it.
    assert os.listdir(os.path.dirname(lock)) == [os.path.basename(lock)]


def test_a_stale_lock_file_of_our_own_is_reused(kind: str, path: str, procs: Procs) -> None:
    """A server killed with SIGKILL leaves its lock file (its pid dead); widened to 0644
    since. The next server takes that same file, sets it back to 0600, writes its own pid,
    serves, and removes the file when it closes."""
    ready = MP.Event()
    dead = procs.start(fh.serve_process, kind, path, 1, ready, 1 << 20)
    assert ready.wait(30)
    os.kill(dead.pid, signal.SIGKILL)
    dead.join(10)
    lock = _lock_of(kind, path)
    with open(lock) as f:
        assert f.read() == f"{dead.pid}\n"
    os.chmod(lock, 0o644)
    inode = os.stat(lock).st_ino
    server = make_server(kind, path, 1, max_nbytes=1 << 20)
    try:
        st = os.lstat(lock)
        assert st.st_ino == inode, "the stale lock file was replaced, not reused"
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        with open(lock) as f:
            assert f.read() == f"{os.getpid()}\n"
        with ServerThread(server, answer_with(double)):
            with make_client(kind, path) as c:
                np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), 2 * np.arange(3))
    finally:
        server.close()
    assert not os.path.exists(lock)


# --- slots ---------------------------------------------------------------------------------------


def _lease_and_check(kind: str, path: str, seed: int, rounds: int, conn: Any) -> None:
    """Lease any slot, send requests only this process can produce, check that each answer
    is our own data and names our slot; close and lease again, ``rounds`` times."""
    try:
        seen = []
        for r in range(rounds):
            with make_client(kind, path, None, connect_timeout=20) as c:
                seen.append(c.slot_id)
                for i in range(5):
                    x = np.full(257, seed * 1_000_000 + r * 100 + i, dtype=np.int64)
                    out, slot = c.request(x, timeout=20)
                    assert np.array_equal(out, x), f"got another client's data: {out[:3]}"
                    assert int(slot) == c.slot_id, f"answered for slot {slot}, we hold {c.slot_id}"
                # The answers are zero-copy views of the slot's response buffers: holding them
                # past the lease would keep those buffers from the slot's next holder.
                del out, slot
                other = (c.slot_id + 1) % 8
                for name, args in (
                    ("write_tensor_slot", (other, x)),
                    ("read_tensor_slot", (other,)),
                ):
                    try:
                        getattr(c, name)(*args)
                        raise AssertionError(f"used slot {other} while holding {c.slot_id}")
                    except RoleError:
                        pass
        conn.send(("ok", seen))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("fail", f"{type(e).__name__}: {e}"))


def test_clients_only_see_their_own_slot_under_concurrent_leasing(
    kind: str, path: str, procs: Procs
) -> None:
    """8 processes lease, use and give back the 8 slots 6 times each, all at once."""
    server = make_server(kind, path, 8, max_nbytes=1 << 20)
    with ServerThread(server, answer_with_slot):
        pipes = []
        for seed in range(8):
            mine, theirs = MP.Pipe()
            procs.start(_lease_and_check, kind, path, seed, 6, theirs)
            theirs.close()
            pipes.append(mine)
        deadline = time.monotonic() + 120  # 48 leases and requests on a loaded 2-core machine
        for mine in pipes:
            assert mine.poll(max(0.0, deadline - time.monotonic())), "a client did not finish"
            res = mine.recv()
            assert res[0] == "ok", res
    server.close()


@pytest.mark.parametrize("kind", ["unix_socket", "named_pipe"])
def test_a_frame_naming_another_slot_is_answered_on_its_own(kind: str, path: str) -> None:
    """A raw client writes another slot's number in its request header: the server answers
    it on the raw client's own connection, and the slot's real holder sees nothing."""
    server = make_server(kind, path, 2, max_nbytes=1 << 20)
    with ServerThread(server, answer_with_slot):
        with make_client(kind, path, 0) as holder:
            raw = RawSession(kind, path)
            assert raw.slot == 1
            raw.write(put(good_request(1), "<I", 16, 0))  # claims slot 0
            answer = raw.read_frame()
            assert answer[6] == 2 and struct.unpack_from("<I", answer, 16)[0] == 1
            assert not holder.is_ready()
            out, slot = holder.request(np.arange(4), timeout=5)
            assert int(slot) == 0 and np.array_equal(out, np.arange(4))
            raw.close()
    server.close()


# --- hostile data --------------------------------------------------------------------------------


class _Planted:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (os.environ["SENSAI_PICKLE_MARKER"],))


def test_wire_data_is_never_unpickled(kind: str, path: str, short_tmp: str) -> None:
    """A pickle that would create a directory when loaded travels as bytes, both ways."""
    marker = os.path.join(short_tmp, "unpickled")
    os.environ["SENSAI_PICKLE_MARKER"] = marker
    try:
        blob = np.frombuffer(pickle.dumps(_Planted()), dtype=np.uint8)
    finally:
        del os.environ["SENSAI_PICKLE_MARKER"]
    server = make_server(kind, path, 1, max_nbytes=1 << 20)
    with ServerThread(server) as st:  # echoes, keeping a copy of what it received
        with make_client(kind, path) as c:
            out = c.request([blob, blob.reshape(1, -1)], timeout=5)
        assert np.array_equal(out[0], blob) and np.array_equal(st.received[0][0], blob)
    server.close()
    assert not os.path.exists(marker)


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("kind", ["unix_socket", "named_pipe"])
def test_hostile_sizes_in_a_header_allocate_nothing(kind: str, path: str, procs: Procs) -> None:
    """Headers claiming 1 TiB, 2^63 bytes or just over the limit are refused with the limit
    in the error, and the server's peak memory does not grow by more than a few MiB."""
    limit = 1 << 20
    ready = MP.Event()
    server = procs.start(fh.serve_process, kind, path, 2, ready, limit)
    assert ready.wait(30)
    with make_client(kind, path) as c:  # warm up: the server's normal working set
        for _ in range(3):
            np.testing.assert_array_equal(c.request(np.ones(limit // 8), timeout=10), 2.0)
    before = _vm_hwm_kib(server.pid)
    # docs/PROTOCOL.md section 9, with the server's default max_tensors and max_dims (8)
    t = DEFAULT_MAX_TENSORS
    max_frame = ((64 + t * (24 + 8 * 8) + 63) & ~63) + limit + 64 * t
    for claim in (1 << 40, 1 << 63, max_frame + 1, (1 << 64) - 1):
        for _ in range(5):
            raw = RawSession(kind, path)
            raw.write(put(good_request(raw.slot), "<Q", 24, claim))
            frames = split(raw.finish())
            code, text = error_of(frames[0])
            assert code == 2 and "total_len" in text and "over the limit" in text, text
    grown = _vm_hwm_kib(server.pid) - before
    assert grown < 16 * 1024, f"peak memory grew by {grown} KiB"
    with make_client(kind, path) as c:
        np.testing.assert_array_equal(c.request(np.arange(5.0), timeout=10), 2 * np.arange(5.0))
    os.kill(server.pid, signal.SIGTERM)


def test_unix_socket_hello_from_a_stranger_is_checked(path: str) -> None:
    """Bytes before the handshake are read with the handshake's small limits: a first frame
    claiming a large size is refused before any allocation, a non-HELLO is refused."""
    server = make_server("unix_socket", path, 1, max_nbytes=1 << 20)
    with ServerThread(server, answer_with(double)):
        for data, text in (
            (put(encode(4, [], tag=1), "<Q", 24, 1 << 30), "over the limit"),
            (encode(4, [], tag=7), "expected a HELLO"),
        ):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(path)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(1 << 16):
                got += chunk
            s.close()
            code, message = error_of(split(got)[0])
            assert text in message, message
        with make_client("unix_socket", path) as c:
            np.testing.assert_array_equal(c.request(np.arange(3), timeout=5), 2 * np.arange(3))
    server.close()
