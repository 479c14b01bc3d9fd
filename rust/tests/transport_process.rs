//! Servers and clients in separate processes, over both stream transports.
//!
//! The test binary re-executes itself as the client: `child_entry` does nothing unless
//! `SENSAI_CHILD` is set, in which case it runs one client and exits.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sensai::frame::{DType, Kind, Limits, Meta, TensorRef};
use sensai::transport::fifo::{FifoClient, FifoServer};
use sensai::transport::uds::{UdsClient, UdsServer};
use sensai::transport::{no_interrupt, ClientEndpoint, ServerEndpoint};

const REQUESTS: u64 = 40;

fn connect(kind: &str, path: &str, slot: Option<usize>) -> Box<dyn ClientEndpoint> {
    let t = Some(Duration::from_secs(10));
    match kind {
        "uds" => Box::new(UdsClient::connect(path, slot, t, &mut no_interrupt()).expect("connect")),
        _ => Box::new(FifoClient::connect(path, slot, t, &mut no_interrupt()).expect("connect")),
    }
}

fn bind(kind: &str, path: &Path, slots: usize) -> Box<dyn ServerEndpoint> {
    let l = Limits::default();
    match kind {
        "uds" => Box::new(UdsServer::bind(path, slots, l).expect("bind")),
        _ => Box::new(FifoServer::bind(path, slots, l).expect("bind")),
    }
}

/// The client's work: REQUESTS requests of growing size; the server answers each with
/// every byte incremented, and a second int64 tensor holding the request's tag.
fn run_child(kind: &str, path: &str, mode: &str) {
    let mut c = connect(kind, path, None);
    if mode == "hold" {
        // Keep the slot until killed.
        println!("slot {}", c.slot());
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    for i in 0..REQUESTS {
        let n = 1 + (i as usize * 7919) % 300_000;
        let data: Vec<u8> = (0..n).map(|k| (k as u64 * 31 + i) as u8).collect();
        let shape = [n as u64];
        let meta = Meta {
            app_tag: i as u32,
            ..Meta::new(Kind::Request)
        };
        let t = [TensorRef {
            dtype: DType::UInt8,
            shape: &shape,
            data: &data,
        }];
        c.send(meta, &t, Some(Duration::from_secs(10)), &mut no_interrupt())
            .expect("send");
        let m = c
            .recv(Some(Duration::from_secs(10)), &mut no_interrupt())
            .expect("recv");
        let got = m.tensor_bytes(0).expect("tensor 0");
        assert_eq!(got.len(), n);
        assert!(
            got.iter().zip(&data).all(|(a, b)| *a == b.wrapping_add(1)),
            "corrupt answer {i}"
        );
        let tag = m.tensor_bytes(1).expect("tensor 1");
        assert_eq!(
            i64::from_le_bytes(tag.try_into().expect("8 bytes")),
            i as i64
        );
    }
}

#[test]
fn child_entry() {
    if let Ok(spec) = std::env::var("SENSAI_CHILD") {
        let parts: Vec<&str> = spec.splitn(3, '|').collect();
        run_child(parts[0], parts[2], parts[1]);
    }
}

fn spawn_child(kind: &str, path: &Path, mode: &str) -> Child {
    Command::new(std::env::current_exe().expect("exe"))
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env("SENSAI_CHILD", format!("{kind}|{mode}|{}", path.display()))
        .spawn()
        .expect("spawn child")
}

fn serve_until<F: FnMut(&mut dyn ServerEndpoint) -> bool>(
    srv: &mut dyn ServerEndpoint,
    limit: Duration,
    mut done: F,
) {
    let start = Instant::now();
    while !done(srv) {
        assert!(start.elapsed() < limit, "server loop timed out");
        let ready = match srv.wait_any(Some(Duration::from_millis(100)), &mut no_interrupt()) {
            Ok(r) => r,
            Err(sensai::Error::Timeout { .. }) => continue,
            Err(e) => panic!("wait_any: {e}"),
        };
        for s in ready {
            while let Some(m) = srv.recv(s).expect("recv") {
                let mut out = m.tensor_bytes(0).expect("t0").to_vec();
                out.iter_mut().for_each(|b| *b = b.wrapping_add(1));
                let tag = (m.meta().app_tag as i64).to_le_bytes();
                let shape = [out.len() as u64];
                let t = [
                    TensorRef {
                        dtype: DType::UInt8,
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

fn many_clients(kind: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir
        .path()
        .join(if kind == "uds" { "s.sock" } else { "pipes" });
    let mut srv = bind(kind, &path, 3);
    let mut children: Vec<Child> = (0..3).map(|_| spawn_child(kind, &path, "work")).collect();
    let mut statuses = vec![None; 3];
    serve_until(srv.as_mut(), Duration::from_secs(60), |_| {
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
    srv.close();
    assert!(!path.exists(), "server must remove its files");
}

/// `pause`: how long the server stays away from its loop after the kill, so that the new
/// client's hello is already there when the server learns that the old client is gone.
fn killed_client_frees_slot(kind: &str, pause: Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir
        .path()
        .join(if kind == "uds" { "s.sock" } else { "pipes" });
    let mut srv = bind(kind, &path, 1);
    let mut holder = spawn_child(kind, &path, "hold");
    serve_until(srv.as_mut(), Duration::from_secs(20), |s| s.is_connected(0));
    holder.kill().expect("kill");
    holder.wait().expect("wait");
    // A new client gets the slot once the server has seen the old one go.
    let mut worker = spawn_child(kind, &path, "work");
    std::thread::sleep(pause);
    let mut status = None;
    serve_until(srv.as_mut(), Duration::from_secs(30), |_| {
        status = worker.try_wait().expect("try_wait");
        status.is_some()
    });
    assert!(status.expect("status").success());
}

#[test]
fn uds_many_client_processes() {
    many_clients("uds");
}

#[test]
fn fifo_many_client_processes() {
    many_clients("fifo");
}

#[test]
fn uds_killed_client_frees_slot() {
    killed_client_frees_slot("uds", Duration::ZERO);
}

#[test]
fn fifo_killed_client_frees_slot() {
    killed_client_frees_slot("fifo", Duration::ZERO);
}

#[test]
fn uds_next_client_arrives_before_the_server_sees_the_last_go() {
    killed_client_frees_slot("uds", Duration::from_millis(800));
}

#[test]
fn fifo_next_client_arrives_before_the_server_sees_the_last_go() {
    killed_client_frees_slot("fifo", Duration::from_millis(800));
}
