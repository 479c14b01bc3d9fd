//! The shared-memory transport with server and clients in separate processes.
//!
//! The test binary re-executes itself as the other process: `child_entry` does nothing
//! unless `SENSAI_SHM_CHILD` is set, in which case it runs one role and exits.
//! `cargo test --test shm_process -- --nocapture` also prints a small round-trip latency
//! and a 12.6 MB response time between two processes (printed, not asserted).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sensai::frame::{DType, Kind, Limits, Meta, TensorRef, TensorSpec};
use sensai::transport::shm::{ShmClient, ShmServer};
use sensai::transport::{no_interrupt, ClientEndpoint, ServerEndpoint};
use sensai::Error;

const REQUESTS: u64 = 40;
/// [8,511,256] int64 + [8,511,256] float32.
const BULK_BYTES: usize = 8 * 511 * 256 * 12;
const BULK_SHAPE: [u64; 3] = [8, 511, 256];
const T: Option<Duration> = Some(Duration::from_secs(10));

/// What a "keep" child prints once it keeps its answers.
const KEPT: &str = "SENSAI-ANSWERS-KEPT";

fn limits() -> Limits {
    Limits::new(4, 4, 1 << 20).expect("limits")
}

fn attach(path: &str) -> ShmClient {
    ShmClient::attach(path, None, T, &mut no_interrupt()).expect("attach")
}

fn request(c: &mut ShmClient, tag: u64, data: &[u8]) -> u64 {
    let shape = [data.len() as u64];
    let meta = Meta {
        app_tag: tag as u32,
        ..Meta::new(Kind::Request)
    };
    let t = [TensorRef {
        dtype: DType::UInt8,
        shape: &shape,
        data,
    }];
    c.send(meta, &t, T, &mut no_interrupt()).expect("send")
}

fn payload(i: u64) -> Vec<u8> {
    let n = 1 + (i as usize * 7919) % 300_000;
    (0..n).map(|k| (k as u64 * 31 + i) as u8).collect()
}

/// Check an echo answer: every byte incremented, and the tag as an int64 tensor.
fn check(m: &sensai::transport::Message, i: u64, data: &[u8]) {
    let got = m.tensor_bytes(0).expect("tensor 0");
    assert_eq!(got.len(), data.len());
    assert!(
        got.iter().zip(data).all(|(a, b)| *a == b.wrapping_add(1)),
        "corrupt answer {i}"
    );
    let tag = m.tensor_bytes(1).expect("tensor 1");
    assert_eq!(
        i64::from_le_bytes(tag.try_into().expect("8 bytes")),
        i as i64
    );
}

fn run_child(mode: &str, path: &str) {
    match mode {
        // One request at a time.
        "work" => {
            let mut c = attach(path);
            for i in 0..REQUESTS {
                let data = payload(i);
                request(&mut c, i, &data);
                let m = c.recv(T, &mut no_interrupt()).expect("recv");
                check(&m, i, &data);
            }
        }
        // As many requests in flight as the ring allows, answered in order.
        "pipeline" => {
            let mut c = attach(path);
            let k = c.ring_depth() as u64;
            assert!(k > 1);
            for round in 0..REQUESTS / k {
                let datas: Vec<Vec<u8>> = (0..k).map(|j| payload(round * k + j)).collect();
                let ids: Vec<u64> = datas
                    .iter()
                    .enumerate()
                    .map(|(j, d)| request(&mut c, round * k + j as u64, d))
                    .collect();
                for (j, d) in datas.iter().enumerate() {
                    let m = c.recv(T, &mut no_interrupt()).expect("recv");
                    assert_eq!(m.meta().request_id, ids[j], "answered out of order");
                    check(&m, round * k + j as u64, d);
                }
            }
        }
        // Receive two answers, close the client and keep the answers (their buffers stay
        // pinned) until stdin closes; KEPT on stdout says they are kept.
        "keep" => {
            let mut c = attach(path);
            for i in 0..2 {
                request(&mut c, i, &payload(i));
            }
            let kept: Vec<_> = (0..2)
                .map(|_| c.recv(T, &mut no_interrupt()).expect("recv"))
                .collect();
            c.close();
            println!("{KEPT}");
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
            drop(kept);
        }
        // The only slot is pinned by another process's kept answers: a send is refused,
        // with an error that says so (and that this client holds none).
        "pinned" => {
            let mut c = attach(path);
            let e = c
                .send(Meta::new(Kind::Request), &[], T, &mut no_interrupt())
                .expect_err("no response buffer is free");
            let text = e.to_string();
            assert!(matches!(e, Error::Capacity(_)), "{e}");
            assert!(
                text.contains("this client's received messages hold 0")
                    && text.contains("2 are pinned by messages a previous client")
                    && text.contains("process "),
                "{text}"
            );
        }
        // Keep the slot until killed.
        "hold" => {
            let _c = attach(path);
            std::thread::sleep(Duration::from_secs(60));
        }
        // A second server on a live server's path must be refused.
        "second" => match ShmServer::create(path, 1, limits(), 2) {
            Err(Error::AddressInUse(_)) => {}
            other => panic!(
                "second server: expected AddressInUse, got {:?}",
                other.map(|_| ())
            ),
        },
        // Serve echo until killed.
        "server" => {
            let mut srv = ShmServer::create(path, 2, limits(), 2).expect("create");
            serve_until(&mut srv, Duration::from_secs(60), |_| false);
        }
        // Small round trips, timed.
        "latency" => {
            let mut c = attach(path);
            let data = [7u8; 64];
            let shape = [1u64, 8];
            let t = [TensorRef {
                dtype: DType::Int64,
                shape: &shape,
                data: &data,
            }];
            let mut times = Vec::with_capacity(10_000);
            for i in 0..12_000 {
                let t0 = Instant::now();
                c.send(Meta::new(Kind::Request), &t, T, &mut no_interrupt())
                    .expect("send");
                let m = c.recv(T, &mut no_interrupt()).expect("recv");
                let dt = t0.elapsed();
                assert_eq!(m.tensor_bytes(0).expect("t0")[0], 8);
                if i >= 2000 {
                    times.push(dt);
                }
            }
            times.sort();
            let pct = |p: usize| times[times.len() * p / 100].as_secs_f64() * 1e6;
            println!(
                "shm small round trip ([1,8] int64 request, echo + int64 tag), {} trips: \
                 p50 {:.1} us, p99 {:.1} us",
                times.len(),
                pct(50),
                pct(99)
            );
        }
        // The typical sampled-teacher response: [8,511,256] int64 + [8,511,256] float32.
        "bulk" => {
            let mut c = attach(path);
            let data: Vec<u8> = (0..8 * 512 * 8).map(|k| k as u8).collect();
            let shape = [8u64, 512];
            let t = [TensorRef {
                dtype: DType::Int64,
                shape: &shape,
                data: &data,
            }];
            let mut times = Vec::new();
            for i in 0..40u32 {
                let meta = Meta {
                    app_tag: i,
                    ..Meta::new(Kind::Request)
                };
                let t0 = Instant::now();
                c.send(meta, &t, T, &mut no_interrupt()).expect("send");
                let m = c.recv(T, &mut no_interrupt()).expect("recv");
                let dt = t0.elapsed();
                // Every byte was written by the server for this request (checked untimed).
                for k in 0..2 {
                    let b = m.tensor_bytes(k).expect("tensor");
                    assert!(
                        b.iter().all(|&x| x == (i as u8).wrapping_add(k as u8)),
                        "bulk {i}"
                    );
                }
                if i >= 5 {
                    times.push(dt);
                }
            }
            times.sort();
            let p50 = times[times.len() / 2];
            // The physical floor of a one-copy transport: one memcpy of the payload.
            let src = vec![1u8; BULK_BYTES];
            let mut dst = vec![0u8; BULK_BYTES];
            let mut copies = Vec::new();
            for _ in 0..20 {
                let t0 = Instant::now();
                dst.copy_from_slice(std::hint::black_box(&src));
                copies.push(t0.elapsed());
                std::hint::black_box(&dst);
            }
            copies.sort();
            let copy = copies[copies.len() / 2];
            println!(
                "shm 12.6 MB response round trip (server fills it in place): p50 {:.2} ms \
                 ({:.1} GB/s); one memcpy of the payload {:.2} ms; ratio {:.2}",
                p50.as_secs_f64() * 1e3,
                BULK_BYTES as f64 / p50.as_secs_f64() / 1e9,
                copy.as_secs_f64() * 1e3,
                p50.as_secs_f64() / copy.as_secs_f64()
            );
        }
        other => panic!("unknown child mode {other}"),
    }
}

#[test]
fn child_entry() {
    if let Ok(spec) = std::env::var("SENSAI_SHM_CHILD") {
        let (mode, path) = spec.split_once('|').expect("mode|path");
        run_child(mode, path);
    }
}

fn spawn_child(mode: &str, path: &Path) -> Child {
    Command::new(std::env::current_exe().expect("exe"))
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env("SENSAI_SHM_CHILD", format!("{mode}|{}", path.display()))
        .stdin(if mode == "keep" {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(match mode {
            "latency" | "bulk" => Stdio::inherit(),
            "keep" => Stdio::piped(),
            _ => Stdio::null(),
        })
        .spawn()
        .expect("spawn child")
}

/// A "keep" child, served until it says that it keeps its two answers (its stdin stays
/// open: closing it lets the child drop them and exit).
fn spawn_keeper(srv: &mut ShmServer, path: &Path) -> Child {
    use std::io::BufRead;
    let mut keeper = spawn_child("keep", path);
    let out = keeper.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // Contained, not equal: the harness prints "test child_entry ... " before it.
            if line.contains(KEPT) {
                let _ = tx.send(());
            }
        }
    });
    serve_until(srv, Duration::from_secs(30), |_| rx.try_recv().is_ok());
    keeper
}

/// Echo server loop: answer each request with its bytes incremented and its tag.
fn serve_until<F: FnMut(&mut ShmServer) -> bool>(
    srv: &mut ShmServer,
    limit: Duration,
    mut done: F,
) {
    let start = Instant::now();
    while !done(srv) {
        assert!(start.elapsed() < limit, "server loop timed out");
        let ready = match srv.wait_any(Some(Duration::from_millis(100)), &mut no_interrupt()) {
            Ok(r) => r,
            Err(Error::Timeout { .. }) => continue,
            Err(e) => panic!("wait_any: {e}"),
        };
        for s in ready {
            while let Some(m) = srv.recv(s).expect("recv") {
                let mut out = m.tensor_bytes(0).expect("t0").to_vec();
                out.iter_mut().for_each(|b| *b = b.wrapping_add(1));
                let tag = (m.meta().app_tag as i64).to_le_bytes();
                let shape = m.decoded().tensors[0].shape.clone();
                let dtype = m.decoded().tensors[0].dtype;
                drop(m);
                let t = [
                    TensorRef {
                        dtype,
                        shape: &shape,
                        data: &out,
                    },
                    TensorRef {
                        dtype: DType::Int64,
                        shape: &[],
                        data: &tag,
                    },
                ];
                srv.send(s, Meta::new(Kind::Response), &t).expect("send");
            }
        }
    }
}

fn wait_children(srv: &mut ShmServer, children: &mut [Child], limit: Duration) {
    let mut statuses = vec![None; children.len()];
    serve_until(srv, limit, |_| {
        for (i, c) in children.iter_mut().enumerate() {
            if statuses[i].is_none() {
                statuses[i] = c.try_wait().expect("try_wait");
            }
        }
        statuses.iter().all(|s| s.is_some())
    });
    for s in statuses {
        assert!(s.expect("status").success(), "a client failed");
    }
}

fn shm_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("sensai.shm")
}

#[test]
fn several_client_processes_exchange_verified_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = shm_path(&dir);
    let mut srv = ShmServer::create(&path, 3, limits(), 2).expect("create");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut second = spawn_child("second", &path);
    assert!(
        second.wait().expect("wait").success(),
        "a second server was not refused"
    );
    let mut children: Vec<Child> = (0..3).map(|_| spawn_child("work", &path)).collect();
    wait_children(&mut srv, &mut children, Duration::from_secs(30));
    srv.close();
    assert!(!path.exists(), "the server must remove its file");
    assert!(
        !dir.path().join("sensai.shm.lock").exists(),
        "and its lock file"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = shm_path(&dir);
    let mut srv = ShmServer::create(&path, 2, limits(), 4).expect("create");
    let mut children: Vec<Child> = (0..2).map(|_| spawn_child("pipeline", &path)).collect();
    wait_children(&mut srv, &mut children, Duration::from_secs(30));
}

/// A client holding the only slot is SIGKILLed; a new one (another process) then leases
/// it. `reap`: the holder is reaped first; otherwise it stays a zombie meanwhile.
fn a_killed_clients_slot_is_reused_when(reap: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = shm_path(&dir);
    let mut srv = ShmServer::create(&path, 1, limits(), 2).expect("create");
    let mut holder = spawn_child("hold", &path);
    serve_until(&mut srv, Duration::from_secs(20), |s| s.is_connected(0));
    holder.kill().expect("kill");
    if !reap {
        // Wait for its exit without reaping it (WNOWAIT).
        let pid = rustix::process::Pid::from_raw(holder.id() as i32).expect("pid");
        rustix::process::waitid(
            rustix::process::WaitId::Pid(pid),
            rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
        )
        .expect("waitid");
    } else {
        holder.wait().expect("wait");
    }
    let mut worker = [spawn_child("work", &path)];
    wait_children(&mut srv, &mut worker, Duration::from_secs(30));
    holder.wait().expect("reap");
}

#[test]
fn a_killed_clients_slot_is_reused() {
    a_killed_clients_slot_is_reused_when(true);
}

/// Issue 14: a client SIGKILLed and not yet reaped (a zombie) kept its slot until waitpid.
#[test]
fn a_killed_clients_slot_is_reused_before_it_is_reaped() {
    a_killed_clients_slot_is_reused_when(false);
}

/// Issue 14: a live process that closed its client but keeps two received answers left its
/// slot looking free: the next client (another process) was given it although another slot
/// was free, and failed with "2 buffers are held by received messages still alive".
#[test]
fn kept_answers_of_another_process_do_not_poison_leasing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = shm_path(&dir);
    let mut srv = ShmServer::create(&path, 2, limits(), 2).expect("create");
    let mut keeper = spawn_keeper(&mut srv, &path);
    let mut worker = [spawn_child("work", &path)];
    wait_children(&mut srv, &mut worker, Duration::from_secs(30));
    drop(keeper.stdin.take());
    assert!(keeper.wait().expect("wait").success());
}

/// With one slot, pinned by another process's kept answers, the new client's send error
/// names that process and says this client holds none; once they are dropped it works.
#[test]
fn a_send_on_a_slot_pinned_by_another_process_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = shm_path(&dir);
    let mut srv = ShmServer::create(&path, 1, limits(), 2).expect("create");
    let mut keeper = spawn_keeper(&mut srv, &path);
    let mut pinned = [spawn_child("pinned", &path)];
    wait_children(&mut srv, &mut pinned, Duration::from_secs(30));
    drop(keeper.stdin.take());
    assert!(keeper.wait().expect("wait").success());
    let mut worker = [spawn_child("work", &path)];
    wait_children(&mut srv, &mut worker, Duration::from_secs(30));
}

#[test]
fn a_killed_server_ends_the_clients_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = shm_path(&dir);
    let mut server = spawn_child("server", &path);
    let mut c = attach(path.to_str().expect("utf-8 path"));
    let data = payload(3);
    request(&mut c, 3, &data);
    check(&c.recv(T, &mut no_interrupt()).expect("recv"), 3, &data);
    server.kill().expect("kill");
    server.wait().expect("wait");
    // A request nobody will answer: the wait ends with PeerGone well within its timeout.
    let sent = c.send(Meta::new(Kind::Request), &[], T, &mut no_interrupt());
    let t0 = Instant::now();
    let e = match sent {
        Err(e) => e,
        Ok(_) => c
            .recv(Some(Duration::from_secs(5)), &mut no_interrupt())
            .expect_err("no server"),
    };
    assert!(
        matches!(e, Error::PeerGone(_) | Error::Timeout { .. }),
        "{e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
    // The dead server's file is stale: attaching waits for a new server until its deadline,
    // then says so; a new server replaces it.
    assert!(path.exists());
    let wait = Duration::from_millis(200);
    let t0 = Instant::now();
    let e = ShmClient::attach(&path, None, Some(wait), &mut no_interrupt())
        .err()
        .expect("stale");
    assert!(t0.elapsed() >= wait, "failed after {:?}", t0.elapsed());
    assert!(
        matches!(e, Error::PeerGone(_)) && e.to_string().contains("gone"),
        "{e}"
    );
    let mut srv = ShmServer::create(&path, 1, limits(), 2).expect("replace stale file");
    let mut worker = [spawn_child("work", &path)];
    wait_children(&mut srv, &mut worker, Duration::from_secs(30));
}

/// Answer each bulk request by filling a reserved response in place (every byte written).
#[test]
fn bulk_response_timing_printout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = shm_path(&dir);
    let lim = Limits::new(4, 4, BULK_BYTES as u64 + 4096).expect("limits");
    let mut srv = ShmServer::create(&path, 1, lim, 2).expect("create");
    let mut child = spawn_child("bulk", &path);
    let specs = [
        TensorSpec {
            dtype: DType::Int64,
            shape: &BULK_SHAPE,
        },
        TensorSpec {
            dtype: DType::Float32,
            shape: &BULK_SHAPE,
        },
    ];
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(status.success(), "bulk client failed");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "bulk test timed out"
        );
        let ready = match srv.wait_any(Some(Duration::from_millis(100)), &mut no_interrupt()) {
            Ok(r) => r,
            Err(Error::Timeout { .. }) => continue,
            Err(e) => panic!("wait_any: {e}"),
        };
        for s in ready {
            while let Some(m) = srv.recv(s).expect("recv") {
                let tag = m.meta().app_tag as u8;
                drop(m);
                let mut r = srv
                    .reserve(s, Meta::new(Kind::Response), &specs)
                    .expect("reserve");
                for k in 0..2 {
                    r.tensor_mut(k)
                        .expect("tensor")
                        .fill(tag.wrapping_add(k as u8));
                }
                srv.publish(r).expect("publish");
            }
        }
    }
}

#[test]
fn small_round_trip_latency_printout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = shm_path(&dir);
    let mut srv = ShmServer::create(&path, 1, limits(), 2).expect("create");
    let mut child = [spawn_child("latency", &path)];
    wait_children(&mut srv, &mut child, Duration::from_secs(120));
}
