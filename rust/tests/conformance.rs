//! One behaviour suite for every transport.
//!
//! Each test is written once, generic over a [`Transport`] (how to bind a server and connect
//! a client), and instantiated for Unix sockets, named pipes and shared memory by
//! `conformance!` at the bottom. A behaviour the transports share is asserted here, once;
//! what only one transport does (socket path lengths, FIFO replacement, ring words) stays in
//! that transport's own tests.
//!
//! Clients run in their own thread while the test thread serves, as in a real deployment:
//! the stream transports finish their handshakes and queued answers inside the server's
//! `wait_any`.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use sensai::frame::{control, error_code, DType, Kind, Limits, Meta, TensorRef};
use sensai::transport::fifo::{FifoClient, FifoServer};
use sensai::transport::shm::{ShmClient, ShmServer};
use sensai::transport::uds::{UdsClient, UdsServer};
use sensai::transport::{no_interrupt, ClientEndpoint, Interrupt, Message, ServerEndpoint};
use sensai::{Error, Result};

const T: Option<Duration> = Some(Duration::from_secs(10));

/// How to make one transport's endpoints.
trait Transport: 'static {
    type S: ServerEndpoint + 'static;
    type C: ClientEndpoint + 'static;
    /// The address of a server inside the test's directory.
    fn address(dir: &Path) -> PathBuf;
    fn bind(path: &Path, slots: usize, limits: Limits) -> Result<Self::S>;
    fn connect(
        path: &Path,
        slot: Option<usize>,
        timeout: Option<Duration>,
        interrupt: Interrupt<'_>,
    ) -> Result<Self::C>;
}

macro_rules! transport {
    ($name:ident, $s:ty, $c:ty, $file:literal, $bind:expr, $connect:path) => {
        struct $name;
        impl Transport for $name {
            type S = $s;
            type C = $c;
            fn address(dir: &Path) -> PathBuf {
                dir.join($file)
            }
            fn bind(path: &Path, slots: usize, limits: Limits) -> Result<$s> {
                $bind(path, slots, limits)
            }
            fn connect(
                path: &Path,
                slot: Option<usize>,
                timeout: Option<Duration>,
                interrupt: Interrupt<'_>,
            ) -> Result<$c> {
                $connect(path, slot, timeout, interrupt)
            }
        }
    };
}

transport!(
    Uds,
    UdsServer,
    UdsClient,
    "s.sock",
    UdsServer::bind,
    UdsClient::connect
);
transport!(
    Fifo,
    FifoServer,
    FifoClient,
    "pipes",
    FifoServer::bind,
    FifoClient::connect
);
transport!(
    Shm,
    ShmServer,
    ShmClient,
    "ring.shm",
    |p: &Path, n, l| ShmServer::create(p, n, l, 4),
    ShmClient::attach
);

/// Small limits: shared memory reserves every buffer up front.
fn limits() -> Limits {
    Limits::new(64, 8, 1 << 20).expect("limits")
}

/// A bound server in its own directory.
struct Setup<X: Transport> {
    _dir: tempfile::TempDir,
    path: PathBuf,
    srv: X::S,
}

fn setup<X: Transport>(slots: usize) -> Setup<X> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = X::address(dir.path());
    let srv = X::bind(&path, slots, limits()).expect("bind");
    Setup {
        _dir: dir,
        path,
        srv,
    }
}

/// Run `script` with a client of `slot` in a new thread.
fn client<X: Transport, R: Send + 'static>(
    path: &Path,
    slot: Option<usize>,
    script: impl FnOnce(X::C) -> R + Send + 'static,
) -> JoinHandle<R> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let c = X::connect(&path, slot, T, &mut no_interrupt()).expect("connect");
        script(c)
    })
}

/// Serve until the thread `h` is done, handing each request to `on_request`, then join it.
fn serve_until<S: ServerEndpoint, R>(
    srv: &mut S,
    h: JoinHandle<R>,
    mut on_request: impl FnMut(&mut S, usize, Message),
) -> R {
    while !h.is_finished() {
        pump(srv, &mut on_request);
    }
    // What arrived between the last round and the end of the thread.
    pump(srv, &mut on_request);
    h.join().expect("client thread panicked")
}

fn pump<S: ServerEndpoint>(srv: &mut S, on_request: &mut impl FnMut(&mut S, usize, Message)) {
    let ready = match srv.wait_any(Some(Duration::from_millis(5)), &mut no_interrupt()) {
        Ok(r) => r,
        Err(Error::Timeout { .. }) => return,
        Err(e) => panic!("wait_any: {e}"),
    };
    for s in ready {
        while let Some(m) = srv.recv(s).expect("recv") {
            on_request(srv, s, m);
        }
    }
}

/// Owned copy of a message's tensors.
type Tensors = Vec<(DType, Vec<u64>, Vec<u8>)>;

fn tensors_of(m: &Message) -> Tensors {
    m.decoded()
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let bytes = m.tensor_bytes(i).expect("tensor").to_vec();
            (t.dtype, t.shape.clone(), bytes)
        })
        .collect()
}

fn refs(t: &Tensors) -> Vec<TensorRef<'_>> {
    t.iter()
        .map(|(dtype, shape, data)| TensorRef {
            dtype: *dtype,
            shape,
            data,
        })
        .collect()
}

/// Answer a request with its own tensors, tag and value.
fn echo<S: ServerEndpoint>(srv: &mut S, slot: usize, m: Message) {
    let t = tensors_of(&m);
    let meta = Meta {
        app_tag: m.meta().app_tag,
        app_value: m.meta().app_value,
        ..Meta::new(Kind::Response)
    };
    drop(m);
    srv.send(slot, meta, &refs(&t)).expect("answer");
}

fn request(tag: u32) -> Meta {
    Meta {
        app_tag: tag,
        ..Meta::new(Kind::Request)
    }
}

/// Send `t` and return the answer's tensors.
fn round_trip<C: ClientEndpoint>(c: &mut C, tag: u32, t: &Tensors) -> Result<(u32, Tensors)> {
    let id = c.send(request(tag), &refs(t), T, &mut no_interrupt())?;
    let m = c.recv_for(id, T, &mut no_interrupt())?;
    Ok((m.meta().app_tag, tensors_of(&m)))
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn every_dtype_round_trips<X: Transport>() {
    let mut s = setup::<X>(1);
    let h = client::<X, _>(&s.path, None, |mut c| {
        for (k, dtype) in DType::ALL.iter().enumerate() {
            let shape = vec![3, 5];
            let data = pattern(15 * dtype.itemsize() as usize, k as u8);
            let t = vec![(*dtype, shape, data)];
            let (tag, got) = round_trip(&mut c, k as u32 + 7, &t).expect("round trip");
            assert_eq!(tag, k as u32 + 7, "{}", dtype.name());
            assert_eq!(got, t, "{}", dtype.name());
        }
    });
    serve_until(&mut s.srv, h, echo);
}

fn many_tensors_and_empty_ones_round_trip<X: Transport>() {
    let mut s = setup::<X>(1);
    let h = client::<X, _>(&s.path, None, |mut c| {
        let t: Tensors = vec![
            (DType::Float32, vec![2, 3], pattern(24, 1)),
            (DType::Int64, vec![0], Vec::new()),
            (DType::UInt8, vec![7], pattern(7, 2)),
            (DType::BFloat16, vec![1, 1, 1], pattern(2, 3)),
            (
                DType::Bool,
                vec![],
                pattern(1, 0).iter().map(|b| b & 1).collect(),
            ),
            (DType::Float64, vec![100_000], pattern(800_000, 4)),
        ];
        let (_, got) = round_trip(&mut c, 1, &t).expect("round trip");
        assert_eq!(got, t);
        // No tensors at all.
        let (_, got) = round_trip(&mut c, 2, &Vec::new()).expect("round trip");
        assert!(got.is_empty());
    });
    serve_until(&mut s.srv, h, echo);
}

fn limits_are_enforced_both_ways<X: Transport>() {
    let mut s = setup::<X>(1);
    let h = client::<X, _>(&s.path, None, |mut c| {
        assert_eq!(
            c.limits(),
            &limits(),
            "the client learns the server's limits"
        );
        let big = vec![(DType::UInt8, vec![2 << 20], vec![0u8; 2 << 20])];
        let e = c
            .send(request(1), &refs(&big), T, &mut no_interrupt())
            .expect_err("over max_payload_bytes");
        assert!(matches!(e, Error::Capacity(_)), "{e:?}");
        let dims = vec![(DType::UInt8, vec![1; 9], vec![0u8; 1])];
        let e = c
            .send(request(1), &refs(&dims), T, &mut no_interrupt())
            .expect_err("over max_dims");
        assert!(matches!(e, Error::Capacity(_) | Error::Frame(_)), "{e:?}");
        // The server may not answer past the limits either: it answers with an error frame.
        let e = round_trip(&mut c, 99, &Vec::new()).expect_err("too big an answer");
        match e {
            Error::Remote { code, message } => {
                assert_eq!(code, error_code::CAPACITY);
                assert!(message.contains("too big"), "{message}");
            }
            e => panic!("{e:?}"),
        }
        // The session is intact.
        let t = vec![(DType::Int32, vec![4], pattern(16, 9))];
        assert_eq!(round_trip(&mut c, 1, &t).expect("after").1, t);
    });
    serve_until(&mut s.srv, h, |srv, slot, m| {
        if m.meta().app_tag != 99 {
            return echo(srv, slot, m);
        }
        drop(m);
        let big = vec![(DType::UInt8, vec![2 << 20], vec![0u8; 2 << 20])];
        let e = srv
            .send(slot, Meta::new(Kind::Response), &refs(&big))
            .expect_err("over the limits");
        assert!(matches!(e, Error::Capacity(_)), "{e:?}");
        srv.send_error(slot, error_code::CAPACITY, "answer too big")
            .expect("error frame");
    });
}

fn slots_are_leased_one_client_each<X: Transport>() {
    let mut s = setup::<X>(2);
    let path = s.path.clone();
    let h = std::thread::spawn(move || {
        let short = Some(Duration::from_millis(300));
        let a = X::connect(&path, None, T, &mut no_interrupt()).expect("first");
        let b = X::connect(&path, None, T, &mut no_interrupt()).expect("second");
        let mut got = [a.slot(), b.slot()];
        got.sort();
        assert_eq!(got, [0, 1]);
        let e = X::connect(&path, None, short, &mut no_interrupt())
            .err()
            .expect("all in use");
        assert!(matches!(e, Error::Capacity(_)), "{e:?}");
        let e = X::connect(&path, Some(b.slot()), short, &mut no_interrupt())
            .err()
            .expect("taken");
        assert!(matches!(e, Error::Capacity(_)), "{e:?}");
        let e = X::connect(&path, Some(2), short, &mut no_interrupt())
            .err()
            .expect("no such slot");
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("out of range"), "{e}");
        // A closed client's slot is free at once.
        let freed = a.slot();
        drop(a);
        let c = X::connect(&path, Some(freed), T, &mut no_interrupt()).expect("reuse");
        assert_eq!(c.slot(), freed);
        (c, b)
    });
    let (c, b) = serve_until(&mut s.srv, h, echo);
    // The server knows who holds what.
    for _ in 0..100 {
        if s.srv.is_connected(c.slot()) && s.srv.is_connected(b.slot()) {
            break;
        }
        pump(&mut s.srv, &mut echo);
    }
    assert!(s.srv.is_connected(c.slot()) && s.srv.is_connected(b.slot()));
}

fn a_closed_client_is_seen_gone<X: Transport>() {
    let mut s = setup::<X>(1);
    let h = client::<X, _>(&s.path, Some(0), |mut c| {
        let t = vec![(DType::UInt8, vec![3], vec![1, 2, 3])];
        round_trip(&mut c, 1, &t).expect("round trip");
    });
    serve_until(&mut s.srv, h, echo);
    let mut gone = false;
    for _ in 0..400 {
        pump(&mut s.srv, &mut echo);
        if !s.srv.is_connected(0) {
            gone = true;
            break;
        }
    }
    assert!(gone, "the server still counts a closed client as connected");
    let e = s
        .srv
        .send(0, Meta::new(Kind::Response), &[])
        .expect_err("nobody to answer");
    assert!(matches!(e, Error::PeerGone(_)), "{e:?}");
    // Out of range is the caller's mistake on every transport.
    let e = s.srv.recv(5).expect_err("no slot 5");
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
}

fn a_closed_server_ends_a_waiting_client<X: Transport>() {
    let mut s = setup::<X>(1);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let h = client::<X, _>(&s.path, None, move |mut c| {
        c.send(request(1), &[], T, &mut no_interrupt())
            .expect("send");
        tx.send(()).expect("test thread");
        let start = std::time::Instant::now();
        let e = c
            .recv(T, &mut no_interrupt())
            .expect_err("the server closed");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "noticed only after {:?}",
            start.elapsed()
        );
        assert!(matches!(e, Error::PeerGone(_)), "{e:?}");
        assert!(!c.server_alive());
    });
    // Take the request, never answer it, close.
    let mut got = false;
    while !got {
        pump(&mut s.srv, &mut |_: &mut X::S, _, _| got = true);
    }
    rx.recv_timeout(Duration::from_secs(10)).expect("sent");
    s.srv.close();
    h.join().expect("client thread panicked");
}

/// What a client may send is decided once for every transport: requests, and control frames
/// with the codes of upper layers. A control frame with a code the transports keep for
/// themselves (HELLO_ACK, from a confused or hostile client) never reaches the application:
/// it is answered with a ROLE error frame, and the session goes on.
fn a_client_may_not_send_transport_control_codes<X: Transport>() {
    let mut s = setup::<X>(1);
    let h = client::<X, _>(&s.path, None, |mut c| {
        let reserved = Meta {
            app_tag: control::HELLO_ACK,
            ..Meta::new(Kind::Control)
        };
        let id = c
            .send(reserved, &[], T, &mut no_interrupt())
            .expect("sent; the server decides");
        let e = c.recv_for(id, T, &mut no_interrupt()).expect_err("refused");
        match &e {
            Error::Remote { code, message } => {
                assert_eq!(*code, error_code::ROLE, "{message}");
                assert!(message.contains("control"), "{message}");
            }
            e => panic!("expected a ROLE error frame, got {e:?}"),
        }
        // An upper layer's control frame is the application's.
        let user = Meta {
            app_tag: control::USER_BASE + 1,
            ..Meta::new(Kind::Control)
        };
        let id = c.send(user, &[], T, &mut no_interrupt()).expect("user");
        let m = c.recv_for(id, T, &mut no_interrupt()).expect("answered");
        assert_eq!(m.meta().app_tag, control::USER_BASE + 1);
        // A client sends no responses or error frames: refused before anything is sent.
        for kind in [Kind::Response, Kind::Error] {
            let e = c
                .send(Meta::new(kind), &[], T, &mut no_interrupt())
                .expect_err("not a client's frame");
            assert!(matches!(e, Error::Role(_)), "{e:?}");
        }
        let t = vec![(DType::UInt8, vec![1], vec![5])];
        assert_eq!(round_trip(&mut c, 3, &t).expect("still served").1, t);
    });
    let mut seen = Vec::new();
    serve_until(&mut s.srv, h, |srv, slot, m| {
        seen.push((m.meta().kind, m.meta().app_tag));
        echo(srv, slot, m)
    });
    assert_eq!(
        seen,
        [(Kind::Control, control::USER_BASE + 1), (Kind::Request, 3)],
        "what reached the application"
    );
}

/// Answers come back in the order the requests were sent, each carrying its request's id; an
/// answer the caller gave up on is never taken for a later one.
fn pipelined_answers_keep_their_order<X: Transport>() {
    let mut s = setup::<X>(1);
    let h = client::<X, _>(&s.path, None, |mut c| {
        for round in 0..5u32 {
            let ids: Vec<u64> = (0..3)
                .map(|k| {
                    let t = vec![(
                        DType::UInt32,
                        vec![1],
                        (round * 3 + k).to_le_bytes().to_vec(),
                    )];
                    c.send(request(round * 3 + k), &refs(&t), T, &mut no_interrupt())
                        .expect("send")
                })
                .collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
            // Give up on the first two: the third's answer is the one returned.
            let m = c.recv_for(ids[2], T, &mut no_interrupt()).expect("third");
            assert_eq!(m.meta().request_id, ids[2]);
            assert_eq!(m.meta().app_tag, round * 3 + 2);
        }
        for k in 0..3u32 {
            c.send(request(100 + k), &[], T, &mut no_interrupt())
                .expect("send");
        }
        for k in 0..3u32 {
            let m = c.recv(T, &mut no_interrupt()).expect("in order");
            assert_eq!(m.meta().app_tag, 100 + k);
        }
    });
    let mut order = Vec::new();
    serve_until(&mut s.srv, h, |srv, slot, m| {
        order.push(m.meta().app_tag);
        echo(srv, slot, m)
    });
    let want: Vec<u32> = (0..15).chain(100..103).collect();
    assert_eq!(order, want, "requests reached the server out of order");
}

/// Every blocking call gives up when its interrupt callback fails, with that error, and
/// when its timeout passes.
fn waits_end_on_interrupt_and_timeout<X: Transport>() {
    let mut s = setup::<X>(1);
    let h = client::<X, _>(&s.path, None, |mut c| {
        let mut calls = 0;
        let mut stop = || {
            calls += 1;
            if calls >= 3 {
                Err(Error::Interrupted)
            } else {
                Ok(())
            }
        };
        c.send(request(1), &[], T, &mut no_interrupt())
            .expect("send");
        let e = c.recv(None, &mut stop).expect_err("interrupted");
        assert!(matches!(e, Error::Interrupted), "{e:?}");
        let e = c
            .recv(Some(Duration::from_millis(100)), &mut no_interrupt())
            .expect_err("timed out");
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    });
    // Hold the request unanswered until the client is done.
    serve_until(&mut s.srv, h, |_, _, _| {});
    let mut calls = 0;
    let mut stop = || {
        calls += 1;
        if calls >= 2 {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    };
    let start = std::time::Instant::now();
    let e = s.srv.wait_any(None, &mut stop).expect_err("interrupted");
    assert!(matches!(e, Error::Interrupted), "{e:?}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let e = s
        .srv
        .wait_any(Some(Duration::from_millis(100)), &mut no_interrupt())
        .expect_err("timed out");
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    let none = s
        .srv
        .wait_any(Some(Duration::ZERO), &mut no_interrupt())
        .expect("a zero timeout polls");
    assert!(none.is_empty());
    // A connect to nobody ends at its deadline with the same error everywhere.
    let dir = tempfile::tempdir().expect("tempdir");
    let nobody = X::address(dir.path());
    let e = X::connect(
        &nobody,
        None,
        Some(Duration::from_millis(200)),
        &mut no_interrupt(),
    )
    .err()
    .expect("nobody there");
    assert!(
        matches!(e, Error::PeerGone(_) | Error::Timeout { .. }),
        "{e:?}"
    );
}

/// A second server on a live server's address is refused; the first's files go with it.
fn one_server_per_address<X: Transport>() {
    let mut s = setup::<X>(1);
    let e = X::bind(&s.path, 1, limits()).err().expect("in use");
    assert!(matches!(e, Error::AddressInUse(_)), "{e:?}");
    s.srv.close();
    assert!(!s.path.exists(), "{} left behind", s.path.display());
    let mut again = X::bind(&s.path, 1, limits()).expect("free again");
    again.close();
}

macro_rules! conformance {
    ($($m:ident: $t:ty),*) => {$(
        mod $m {
            use super::*;
            #[test] fn every_dtype_round_trips() { super::every_dtype_round_trips::<$t>() }
            #[test] fn many_tensors_and_empty_ones_round_trip() {
                super::many_tensors_and_empty_ones_round_trip::<$t>()
            }
            #[test] fn limits_are_enforced_both_ways() { super::limits_are_enforced_both_ways::<$t>() }
            #[test] fn slots_are_leased_one_client_each() {
                super::slots_are_leased_one_client_each::<$t>()
            }
            #[test] fn a_closed_client_is_seen_gone() { super::a_closed_client_is_seen_gone::<$t>() }
            #[test] fn a_closed_server_ends_a_waiting_client() {
                super::a_closed_server_ends_a_waiting_client::<$t>()
            }
            #[test] fn a_client_may_not_send_transport_control_codes() {
                super::a_client_may_not_send_transport_control_codes::<$t>()
            }
            #[test] fn pipelined_answers_keep_their_order() {
                super::pipelined_answers_keep_their_order::<$t>()
            }
            #[test] fn waits_end_on_interrupt_and_timeout() {
                super::waits_end_on_interrupt_and_timeout::<$t>()
            }
            #[test] fn one_server_per_address() { super::one_server_per_address::<$t>() }
        }
    )*};
}

conformance!(uds: Uds, fifo: Fifo, shm: Shm);
