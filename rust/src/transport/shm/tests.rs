//! Tests of the shared-memory transport.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::frame::{self, DType, Kind, Limits, Meta, TensorRef, TensorSpec};
use crate::transport::{no_interrupt, ClientEndpoint, Interrupt, Message, ServerEndpoint};

use super::client::ShmClient;
use super::layout::{lock_path, off, resolve_path, Geometry, MAX_RING_DEPTH, MAX_SLOTS};
use super::ring::{held_by, holder_of};
use super::server::{no_space, ShmServer};

pub(super) const T: Option<Duration> = Some(Duration::from_secs(5));

pub(super) fn lim() -> Limits {
    Limits::new(4, 4, 1 << 16).unwrap()
}

/// Attach from another thread while this one serves the acknowledgement.
pub(super) fn attach(srv: &mut ShmServer, path: &Path, slot: Option<usize>) -> Result<ShmClient> {
    let p = path.to_path_buf();
    let h = std::thread::spawn(move || ShmClient::attach(&p, slot, T, &mut no_interrupt()));
    while !h.is_finished() {
        match srv.wait_any(Some(Duration::from_millis(5)), &mut no_interrupt()) {
            Ok(_) | Err(Error::Timeout { .. }) => {}
            Err(e) => panic!("wait_any: {e}"),
        }
    }
    h.join().unwrap()
}

pub(super) fn req(c: &mut ShmClient, tag: u32, data: &[u8]) -> u64 {
    let shape = [data.len() as u64];
    let meta = Meta {
        app_tag: tag,
        ..Meta::new(Kind::Request)
    };
    let t = [TensorRef {
        dtype: DType::UInt8,
        shape: &shape,
        data,
    }];
    c.send(meta, &t, T, &mut no_interrupt()).unwrap()
}

/// Answer every pending request of `slot` with its bytes incremented and its tag.
pub(super) fn answer_all(srv: &mut ShmServer, slot: usize) -> usize {
    let mut n = 0;
    while let Some(m) = srv.recv(slot).unwrap() {
        assert!(m.is_shared());
        let out: Vec<u8> = m
            .tensor_bytes(0)
            .unwrap()
            .iter()
            .map(|b| b.wrapping_add(1))
            .collect();
        let shape = [out.len() as u64];
        let meta = Meta {
            app_tag: m.meta().app_tag,
            ..Meta::new(Kind::Response)
        };
        drop(m);
        let t = [TensorRef {
            dtype: DType::UInt8,
            shape: &shape,
            data: &out,
        }];
        srv.send(slot, meta, &t).unwrap();
        n += 1;
    }
    n
}

#[test]
fn round_trips_wrap_the_ring_and_clean_up() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 2, lim(), 2).unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut c = attach(&mut srv, &p, None).unwrap();
    assert!(srv.is_connected(c.slot()));
    assert_eq!(c.ring_depth(), 2);
    for i in 0..50u32 {
        let data: Vec<u8> = (0..(i * 37 % 3000) as usize)
            .map(|k| (k as u32 + i) as u8)
            .collect();
        let id = req(&mut c, i, &data);
        let ready = srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(ready, vec![c.slot()]);
        assert_eq!(answer_all(&mut srv, c.slot()), 1);
        assert!(c.is_ready().unwrap());
        let m = c.recv(T, &mut no_interrupt()).unwrap();
        assert!(m.is_shared());
        assert_eq!(m.meta().request_id, id);
        assert_eq!(m.meta().app_tag, i);
        let want: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
        assert_eq!(m.tensor_bytes(0).unwrap(), &want[..]);
        assert_eq!(m.tensor_bytes(0).unwrap().as_ptr() as usize % 64, 0);
    }
    // Polling with a zero timeout returns an empty list; a short one times out.
    assert!(srv
        .wait_any(Some(Duration::ZERO), &mut no_interrupt())
        .unwrap()
        .is_empty());
    let t0 = Instant::now();
    assert!(matches!(
        srv.wait_any(Some(Duration::from_millis(30)), &mut no_interrupt()),
        Err(Error::Timeout { .. })
    ));
    assert!(t0.elapsed() >= Duration::from_millis(25));
    srv.close();
    assert!(!p.exists(), "the server removes its file");
    assert!(!lock_path(&p).exists(), "and its lock file");
    // The client notices.
    assert!(matches!(
        c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
        Err(Error::PeerGone(_))
    ));
}

#[test]
fn pipelined_requests_answered_in_order_and_held_buffers_stay_intact() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 1, lim(), 3).unwrap();
    let mut c = attach(&mut srv, &p, Some(0)).unwrap();
    let ids: Vec<u64> = (0..3u8).map(|i| req(&mut c, i.into(), &[i; 100])).collect();
    // Three in flight fill the three response buffers: a fourth is refused.
    assert!(matches!(
        c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
        Err(Error::Capacity(_))
    ));
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    assert_eq!(answer_all(&mut srv, 0), 3);
    let held: Vec<Message> = (0..3)
        .map(|_| c.recv(T, &mut no_interrupt()).unwrap())
        .collect();
    for (i, m) in held.iter().enumerate() {
        assert_eq!(m.meta().request_id, ids[i]);
        assert_eq!(m.tensor_bytes(0).unwrap(), &[i as u8 + 1; 100][..]);
    }
    // All three buffers are held by live messages: no room for an answer.
    assert!(matches!(
        c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
        Err(Error::Capacity(_))
    ));
    // Messages may be dropped in any order: dropping the middle one frees its buffer
    // for exactly one more request.
    let mut held = held;
    let last = held.pop().unwrap();
    drop(held.remove(1));
    req(&mut c, 7, &[7; 10]);
    assert!(matches!(
        c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
        Err(Error::Capacity(_))
    ));
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    assert_eq!(answer_all(&mut srv, 0), 1);
    let m = c.recv(T, &mut no_interrupt()).unwrap();
    assert_eq!(m.tensor_bytes(0).unwrap(), &[8; 10][..]);
    drop(m);
    // Dropping the first too leaves two buffers to the pipeline, while `last` is kept.
    let first = held.remove(0);
    assert_eq!(first.tensor_bytes(0).unwrap(), &[1; 100][..]);
    drop(first);
    for round in 0..5u8 {
        req(&mut c, 8, &[round; 10]);
        req(&mut c, 9, &[round + 100; 10]);
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(&mut srv, 0), 2);
        for v in [round + 1, round + 101] {
            let m = c.recv(T, &mut no_interrupt()).unwrap();
            assert_eq!(m.tensor_bytes(0).unwrap(), &[v; 10][..]);
        }
    }
    // The view kept across all those requests is intact.
    assert_eq!(last.tensor_bytes(0).unwrap(), &[3; 100][..]);
}

#[test]
fn a_full_response_ring_never_blocks_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 2, lim(), 2).unwrap();
    let mut c = attach(&mut srv, &p, Some(1)).unwrap();
    req(&mut c, 1, b"a");
    req(&mut c, 2, b"b");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    assert_eq!(answer_all(&mut srv, 1), 2);
    // The client reads nothing; an extra response finds the ring full at once.
    let t0 = Instant::now();
    let e = srv.send(1, Meta::new(Kind::Response), &[]).unwrap_err();
    assert!(
        matches!(e, Error::Capacity(ref m) if m.contains("full")),
        "{e}"
    );
    let e = srv.send_error(1, 1, "x").unwrap_err();
    assert!(matches!(e, Error::Capacity(_)));
    assert!(t0.elapsed() < Duration::from_millis(100));
    // Slot 0 has no client.
    assert!(matches!(
        srv.send(0, Meta::new(Kind::Response), &[]),
        Err(Error::PeerGone(_))
    ));
    assert_eq!(c.recv(T, &mut no_interrupt()).unwrap().meta().app_tag, 1);
}

#[test]
fn reserve_fill_publish_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    let mut c = attach(&mut srv, &p, None).unwrap();
    let id = req(&mut c, 0, b"q");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    let _m = srv.recv(0).unwrap().unwrap();
    let specs = [
        TensorSpec {
            dtype: DType::Int64,
            shape: &[3, 4],
        },
        TensorSpec {
            dtype: DType::Float32,
            shape: &[5],
        },
    ];
    let mut r = srv.reserve(0, Meta::new(Kind::Response), &specs).unwrap();
    assert_eq!(r.request_id(), id);
    assert_eq!(r.num_tensors(), 2);
    assert!(r.tensor_mut(2).is_none());
    // A second reservation (or a send) while one is open is refused.
    assert!(matches!(
        srv.reserve(0, Meta::new(Kind::Response), &specs),
        Err(Error::InvalidArgument(_))
    ));
    let a = r.tensor_mut(0).unwrap();
    assert_eq!(a.len(), 96);
    for (i, ch) in a.chunks_exact_mut(8).enumerate() {
        ch.copy_from_slice(&(i as i64 * 11).to_le_bytes());
    }
    let (ptr, n) = r.tensor_raw(1).unwrap();
    assert_eq!((ptr as usize % 64, n), (0, 20));
    r.tensor_mut(1).unwrap().copy_from_slice(&[7u8; 20]);
    srv.publish(r).unwrap();
    let m = c.recv(T, &mut no_interrupt()).unwrap();
    assert_eq!(m.decoded().tensors[0].shape, vec![3, 4]);
    let got: Vec<i64> = m
        .tensor_bytes(0)
        .unwrap()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(got, (0..12).map(|i| i * 11).collect::<Vec<_>>());
    assert_eq!(m.tensor_bytes(1).unwrap(), &[7u8; 20][..]);
    // A dropped reservation sends nothing and unblocks the slot.
    req(&mut c, 1, b"q");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    drop(srv.recv(0).unwrap().unwrap());
    drop(srv.reserve(0, Meta::new(Kind::Response), &specs).unwrap());
    assert!(!c.is_ready().unwrap());
    srv.send_error(0, frame::error_code::INTERNAL, "boom")
        .unwrap();
    let e = c.recv(T, &mut no_interrupt()).unwrap_err();
    assert!(
        matches!(e, Error::Remote { ref message, .. } if message == "boom"),
        "{e}"
    );
}

#[test]
fn closed_client_frees_its_slot_at_once_and_its_live_messages_stay_intact() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    let mut c = attach(&mut srv, &p, None).unwrap();
    req(&mut c, 0, b"x");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    answer_all(&mut srv, 0);
    let m = c.recv(T, &mut no_interrupt()).unwrap();
    c.close();
    // The slot is free at once (same process, explicit slot)...
    let mut c2 = attach(&mut srv, &p, Some(0)).unwrap();
    assert_eq!(c2.slot(), 0);
    // ...with one response buffer fewer while `m` lives: one request in flight at a time.
    for i in 0..5u32 {
        req(&mut c2, i, b"a");
        assert!(matches!(
            c2.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
            Err(Error::Capacity(_))
        ));
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        answer_all(&mut srv, 0);
        let r = c2.recv(T, &mut no_interrupt()).unwrap();
        assert_eq!(
            (r.meta().app_tag, r.tensor_bytes(0).unwrap()),
            (i, &b"b"[..])
        );
    }
    assert_eq!(m.tensor_bytes(0).unwrap(), b"y");
    drop(m);
    // Both buffers are back.
    req(&mut c2, 10, b"c");
    req(&mut c2, 11, b"d");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    assert_eq!(answer_all(&mut srv, 0), 2);
    for (tag, want) in [(10, b"d"), (11, b"e")] {
        let r = c2.recv(T, &mut no_interrupt()).unwrap();
        assert_eq!(
            (r.meta().app_tag, r.tensor_bytes(0).unwrap()),
            (tag, &want[..])
        );
    }
    c2.close();
    srv.wait_any(Some(Duration::ZERO), &mut no_interrupt())
        .unwrap();
    assert!(!srv.is_connected(0));
}

#[test]
fn attach_frees_what_a_dead_or_closed_predecessor_left() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    let mut c = attach(&mut srv, &p, None).unwrap();
    req(&mut c, 0, b"x");
    req(&mut c, 1, b"y");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    assert_eq!(answer_all(&mut srv, 0), 2);
    // One answer received and "held" by a process that died, one never read.
    let m = c.recv(T, &mut no_interrupt()).unwrap();
    let region = srv.region().unwrap();
    let held: Vec<u32> = (0..2)
        .filter(|&b| holder_of(region.state(0, true, b).load(Ordering::Acquire)).is_some())
        .collect();
    assert_eq!(held.len(), 1);
    let dead = dead_pid();
    region
        .state(0, true, held[0])
        .store(held_by(dead), Ordering::Release);
    std::mem::forget(m); // its Drop would free the buffer
    c.close();
    // The next client gets both response buffers.
    let mut c2 = attach(&mut srv, &p, None).unwrap();
    req(&mut c2, 2, b"a");
    req(&mut c2, 3, b"b");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    assert_eq!(answer_all(&mut srv, 0), 2);
    assert_eq!(c2.recv(T, &mut no_interrupt()).unwrap().meta().app_tag, 2);
    assert_eq!(c2.recv(T, &mut no_interrupt()).unwrap().meta().app_tag, 3);
}

#[test]
fn answers_to_abandoned_requests_do_not_wedge_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    let mut c = attach(&mut srv, &p, None).unwrap();
    let short = Some(Duration::from_millis(20));
    for tag in [1, 2] {
        let id = req(&mut c, tag, b"late");
        let e = c.recv_for(id, short, &mut no_interrupt()).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
    }
    // Both response buffers are owed to abandoned requests whose answers have not come:
    // a send waits for them (and times out), it does not fail at once.
    let t0 = Instant::now();
    let e = c
        .send(Meta::new(Kind::Request), &[], short, &mut no_interrupt())
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(15));
    // The late answers arrive: the next send discards them and goes through.
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    assert_eq!(answer_all(&mut srv, 0), 2);
    let id = req(&mut c, 3, b"now");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    assert_eq!(answer_all(&mut srv, 0), 1);
    let m = c.recv_for(id, T, &mut no_interrupt()).unwrap();
    assert_eq!(
        (m.meta().app_tag, m.tensor_bytes(0).unwrap()),
        (3, &b"opx"[..])
    );
    // Requests the caller still waits for are a capacity error at once, as before.
    drop(m);
    req(&mut c, 4, b"a");
    req(&mut c, 5, b"b");
    assert!(matches!(
        c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt()),
        Err(Error::Capacity(_))
    ));
}

fn dead_pid() -> u32 {
    let mut ch = std::process::Command::new("true").spawn().unwrap();
    let pid = ch.id();
    ch.wait().unwrap();
    pid
}

#[test]
fn a_dead_clients_lease_is_reclaimed_and_its_requests_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    let mut c = attach(&mut srv, &p, None).unwrap();
    req(&mut c, 1, b"stale");
    // Pretend the client died: its pid in the lease is a dead one.
    let region = srv.region().unwrap();
    let lease = region.slot_u32(0, off::LEASE);
    let dead = dead_pid();
    lease.store(dead, Ordering::Release);
    std::mem::forget(c); // its Drop would try to give the lease back
    let mut c2 = attach(&mut srv, &p, Some(0)).unwrap();
    assert_eq!(lease.load(Ordering::Acquire), std::process::id());
    assert!(
        !srv.is_ready_slot(0).unwrap(),
        "the dead client's request is dropped"
    );
    req(&mut c2, 2, b"fresh");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    let m = srv.recv(0).unwrap().unwrap();
    assert_eq!(m.tensor_bytes(0).unwrap(), b"fresh");
}

#[test]
fn a_lease_word_that_is_no_pid_is_reclaimed() {
    // Found by the shm_attach fuzz target: a lease above i32::MAX reached kill(2) as a
    // process group (and tripped a debug assertion in rustix).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    let region = srv.region().unwrap();
    let lease = region.slot_u32(0, off::LEASE);
    for bogus in [u32::MAX, 1 << 31] {
        lease.store(bogus, Ordering::Release);
        let c = attach(&mut srv, &p, Some(0)).unwrap();
        assert_eq!(lease.load(Ordering::Acquire), std::process::id());
        drop(c);
    }
}

#[test]
fn a_response_addressed_to_another_slot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 2, lim(), 2).unwrap();
    let mut c = attach(&mut srv, &p, Some(0)).unwrap();
    req(&mut c, 1, b"x");
    srv.wait_any(T, &mut no_interrupt()).unwrap();
    assert_eq!(answer_all(&mut srv, 0), 1);
    // A stray writer rewrites the slot field (bytes 16..20) of the published frame.
    let region = srv.region().unwrap();
    let b = region.queue(0, true, 0).load(Ordering::Relaxed);
    let ptr = region.buf_ptr(0, true, b);
    // SAFETY: the published response buffer lies inside the mapping and holds a frame of
    // at least 64 bytes; nothing else accesses it during this single-threaded test.
    unsafe { std::ptr::copy_nonoverlapping(1u32.to_le_bytes().as_ptr(), ptr.add(16), 4) };
    let got = c.recv(T, &mut no_interrupt());
    assert!(
        matches!(&got, Err(Error::Protocol(m)) if m.contains("addressed to slot 1")),
        "{got:?}"
    );
}

#[test]
fn second_server_refused_stale_file_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    let e = ShmServer::create(&p, 1, lim(), 2).err().unwrap();
    assert!(matches!(e, Error::AddressInUse(_)), "{e}");
    assert!(
        p.exists(),
        "the refused server leaves the live one's file alone"
    );
    drop(srv);
    // A stale file of a dead server (no lock holder) is replaced.
    std::fs::write(&p, b"stale").unwrap();
    let srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    assert!(std::fs::metadata(&p).unwrap().len() > 5);
    drop(srv);
    // A directory is not replaced.
    std::fs::create_dir(&p).unwrap();
    assert!(ShmServer::create(&p, 1, lim(), 2).is_err());
    assert!(!lock_path(&p).exists());
}

#[test]
fn bad_arguments_and_too_little_space() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    for (slots, depth) in [(0, 2), (1, 1), (1, MAX_RING_DEPTH + 1), (MAX_SLOTS + 1, 2)] {
        assert!(matches!(
            ShmServer::create(&p, slots, lim(), depth),
            Err(Error::InvalidArgument(_))
        ));
    }
    let huge = Limits::new(1, 1, 1 << 40).unwrap();
    let e = ShmServer::create(&p, 4, huge, 2).err().unwrap();
    let msg = e.to_string();
    assert!(matches!(e, Error::Capacity(_)), "{msg}");
    assert!(
        msg.contains("cannot reserve") && msg.contains("free"),
        "{msg}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
    assert_eq!(resolve_path(Path::new("x")), Path::new("/dev/shm/x"));
    assert_eq!(resolve_path(Path::new("./x")), Path::new("./x"));
}

fn attach_err(p: &Path, timeout: Duration) -> Error {
    ShmClient::attach(p, None, Some(timeout), &mut no_interrupt())
        .err()
        .unwrap()
}

/// A client attaches only to a regular file of its own user that nobody else may write
/// to; the refusal names the file, the mode found and the mode expected, and changes
/// nothing (the server keeps serving once the mode is back).
#[test]
fn attach_refuses_a_file_others_may_write_to() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    let t = Duration::from_millis(200);
    for mode in [0o620, 0o602, 0o666] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = attach_err(&p, t);
        let text = e.to_string();
        assert!(matches!(e, Error::Role(_)), "{mode:o}: {e}");
        assert!(
            text.contains(&format!(
                "shared-memory file {} has mode {mode:04o}",
                p.display()
            )) && text.contains("expected 0600")
                && text.contains("refusing to attach"),
            "{text}"
        );
    }
    // Readable by others is not a way in (only writes are): attach works.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    attach(&mut srv, &p, None).expect("attach to a 0644 file");
    // A FIFO at the path is not mapped (opened without blocking, then refused).
    let fifo = dir.path().join("fifo");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    let e = attach_err(&fifo, t);
    assert!(
        matches!(e, Error::Protocol(_)) && e.to_string().contains("not a regular file"),
        "{e}"
    );
}

#[test]
fn attach_to_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    let good = std::fs::read(&p).unwrap();
    let q = dir.path().join("copy");
    let t = Duration::from_millis(200);
    let proto = |bytes: &[u8], what: &str| {
        std::fs::write(&q, bytes).unwrap();
        let e = attach_err(&q, t);
        assert!(matches!(e, Error::Protocol(_)), "{what}: {e}");
        e.to_string()
    };
    // Garbage.
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    assert!(proto(&garbage, "garbage").contains("magic"));
    proto(b"short", "short garbage");
    // A frame is not a transport file.
    let f = frame::encode(&Meta::new(Kind::Request), &[], &lim()).unwrap();
    let mut fb = f.as_slice().to_vec();
    fb.resize(8192, 0);
    assert!(proto(&fb, "frame").contains("frame"));
    // Truncated: the header survives, the slots do not; or the header is cut.
    assert!(proto(&good[..good.len() / 2], "truncated").contains("truncated"));
    assert!(proto(&good[..100], "header cut").contains("truncated"));
    // Another layout version.
    let mut v = good.clone();
    v[off::VERSION..off::VERSION + 4].copy_from_slice(&99u32.to_ne_bytes());
    assert!(proto(&v, "version").contains("version 99"));
    // Inconsistent header fields.
    let mut v = good.clone();
    v[off::CAPACITY] ^= 0x40;
    assert!(proto(&v, "capacity").contains("capacity"));
    let mut v = good.clone();
    v[off::RING_DEPTH..off::RING_DEPTH + 4].copy_from_slice(&1u32.to_ne_bytes());
    proto(&v, "depth");
    // The copy of a live file whose server is dead: peer gone.
    let mut v = good.clone();
    v[off::SERVER_PID..off::SERVER_PID + 4].copy_from_slice(&dead_pid().to_ne_bytes());
    std::fs::write(&q, &v).unwrap();
    assert!(matches!(attach_err(&q, t), Error::PeerGone(_)));
    // A half-written file (zeros, not ready) is waited on, then times out.
    std::fs::write(&q, vec![0u8; 8192]).unwrap();
    let t0 = Instant::now();
    assert!(matches!(attach_err(&q, t), Error::Timeout { .. }));
    assert!(t0.elapsed() >= t);
    std::fs::write(&q, b"").unwrap();
    assert!(matches!(attach_err(&q, t), Error::Timeout { .. }));
    // No file at all.
    assert!(matches!(
        attach_err(&dir.path().join("none"), t),
        Error::PeerGone(_)
    ));
    drop(srv);
}

/// Attaching to a running server makes no inotify watch (closing one costs milliseconds
/// in the kernel); a server that comes up while the client waits on its watch is found
/// at once.
#[test]
fn attach_watches_only_while_no_server_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    crate::transport::testing::assert_watches_only_while_waiting(
        || ShmServer::create(&p, 1, lim(), 2).unwrap(),
        |s: &mut ShmServer| match s.wait_any(Some(Duration::from_millis(5)), &mut no_interrupt()) {
            Ok(_) | Err(Error::Timeout { .. }) => {}
            Err(e) => panic!("wait_any: {e}"),
        },
        || {
            let p = p.clone();
            move |i: Interrupt<'_>| ShmClient::attach(&p, None, Some(Duration::from_secs(10)), i)
        },
        &[(0, 0, 0), (1, 1, 1)],
    );
}

/// The file a server of a dead pid left at `p` (its copy, with the pid replaced).
fn write_stale_file(p: &Path) -> u32 {
    let srv = ShmServer::create(p, 1, lim(), 2).unwrap();
    let mut v = std::fs::read(p).unwrap();
    drop(srv);
    let pid = dead_pid();
    v[off::SERVER_PID..off::SERVER_PID + 4].copy_from_slice(&pid.to_ne_bytes());
    std::fs::write(p, &v).unwrap();
    pid
}

/// A stale file (its server died) is waited on like a missing one: the client connects to
/// the server that replaces it, and without one it fails at its deadline, not at once,
/// saying whose file it was.
#[test]
fn a_stale_file_is_waited_on_until_a_new_server_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let pid = write_stale_file(&p);
    let t = Duration::from_millis(300);
    let t0 = Instant::now();
    let e = attach_err(&p, t);
    assert!(t0.elapsed() >= t, "failed after {:?}", t0.elapsed());
    assert!(matches!(e, Error::PeerGone(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("pid {pid}")) && msg.contains("gone"),
        "{msg}"
    );
    // A server comes up while the client waits on its watch (at its first interrupt call,
    // after it found the file stale twice): found at once.
    let c = crate::transport::testing::connect_as_server_starts(
        1,
        || ShmServer::create(&p, 1, lim(), 2).unwrap(),
        |s: &mut ShmServer| match s.wait_any(Some(Duration::from_millis(5)), &mut no_interrupt()) {
            Ok(_) | Err(Error::Timeout { .. }) => {}
            Err(e) => panic!("wait_any: {e}"),
        },
        {
            let p = p.clone();
            move |i: Interrupt<'_>| ShmClient::attach(&p, None, Some(Duration::from_secs(10)), i)
        },
    );
    if let Err(e) = &c.result {
        panic!("attach after the stale file was replaced: {e}");
    }
    assert_eq!((c.watches, c.waits), (1, 1));
    assert!(c.after_bind < Duration::from_secs(2), "{:?}", c.after_bind);
}

/// Creating a server removes the temporary files that servers of the same name, killed
/// while creating theirs, left behind; those of live pids and of other names stay.
#[test]
fn create_removes_stale_temp_files_of_dead_servers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shm");
    let dead = dead_pid();
    let mine = std::process::id();
    let stale = dir.path().join(format!(".shm.{dead}.1f2e.tmp"));
    let live = dir.path().join(format!(".shm.{mine}.abc.tmp"));
    let other = dir.path().join(format!(".other.{dead}.1f2e.tmp"));
    let odd = dir.path().join(format!(".shm.{dead}.notours.tmp"));
    for f in [&stale, &live, &other, &odd] {
        std::fs::write(f, b"half-built").unwrap();
    }
    let _srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
    assert!(
        !stale.exists(),
        "the dead server's temp file is still there"
    );
    for f in [&live, &other, &odd] {
        assert!(f.exists(), "{} was removed", f.display());
    }
}

/// Not enough room: the error names the CLI flags, Docker's --shm-size and both sizes.
#[test]
fn no_space_names_the_flags_and_the_sizes() {
    let geo = Geometry::new(8, 2, lim()).unwrap();
    let msg = no_space(Path::new("/dev/shm/x"), &geo, Some(64 << 20)).to_string();
    for want in [
        "--max-nbytes",
        "--num-clients",
        "ring depth",
        "--shm-size=",
        &geo.file_len.to_string(),
        &(64u64 << 20).to_string(),
    ] {
        assert!(msg.contains(want), "{want:?} missing from: {msg}");
    }
}
