//! Tests of the named-pipe transport.

use super::*;
use crate::frame::DType;
use crate::transport::no_interrupt;

fn connect(path: &Path) -> std::thread::JoinHandle<Result<FifoClient>> {
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        FifoClient::connect(
            &p,
            Some(0),
            Some(Duration::from_secs(10)),
            &mut no_interrupt(),
        )
    })
}

fn connect_err(path: &Path) -> Error {
    let t = Some(Duration::from_millis(300));
    match FifoClient::connect(path, Some(0), t, &mut no_interrupt()) {
        Ok(_) => panic!("connected to {}", path.display()),
        Err(e) => e,
    }
}

/// A client talks only through a pipe directory of its own user that nobody else may
/// enter, and FIFOs nobody else may open; each refusal says what was found and expected,
/// and leaves the slot free (the lease is given back).
#[test]
fn a_client_refuses_a_pipe_directory_or_fifo_others_may_use() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pipes");
    let mut srv = FifoServer::bind(&path, 1, Limits::default()).expect("bind");
    for mode in [0o750, 0o701, 0o777] {
        chmod(&path, mode);
        let e = connect_err(&path);
        let want = format!("pipe directory {} has mode {mode:04o}", path.display());
        let text = e.to_string();
        assert!(matches!(e, Error::Role(_)), "{text}");
        assert!(
            text.contains(&want) && text.contains("expected 0700") && text.contains("connect"),
            "{text}"
        );
    }
    chmod(&path, 0o700);
    for (file, mode) in [(resp_path(&path, 0), 0o640), (req_path(&path, 0), 0o602)] {
        chmod(&file, mode);
        let e = connect_err(&path);
        let want = format!("FIFO {} has mode {mode:04o}", file.display());
        assert!(
            matches!(e, Error::Role(_)) && e.to_string().contains(&want),
            "{e}"
        );
        chmod(&file, 0o600);
    }
    // A symbolic link to the directory is not the server's directory.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    let e = connect_err(&link);
    assert!(
        matches!(e, Error::Protocol(_)) && e.to_string().contains("symbolic link"),
        "{e}"
    );
    // With the modes back, the same slot is free and serves.
    let client = connect(&path);
    while !client.is_finished() {
        srv.pump(Duration::from_millis(10)).expect("pump");
    }
    let c = client.join().expect("thread").expect("client");
    assert_eq!(c.slot(), 0);
}

/// The server replaced the slot's FIFOs (as after a previous client's bad frame) while a
/// connecting client's HELLO sat in the old request FIFO: the client starts over at once
/// instead of waiting out the 2 s handshake deadline (in a wire-fuzz profile, one connect
/// in six right after a bad frame waited it out).
#[test]
fn a_hello_lost_to_replaced_fifos_is_sent_again_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pipes");
    let mut srv = FifoServer::bind(&path, 1, Limits::default()).expect("bind");
    let client = connect(&path);
    {
        let mut fds = [PollFd::new(&srv.slots[0].req, PollFlags::IN)];
        let n = poll_fds(&mut fds, Duration::from_secs(10)).expect("poll");
        assert!(n > 0, "no hello came within 10 s");
    }
    let replaced = std::time::Instant::now();
    srv.reset_slot(0, true).expect("replace the FIFOs");
    while !client.is_finished() {
        srv.pump(Duration::from_millis(10)).expect("pump");
    }
    let c = client.join().expect("thread").expect("client");
    let took = replaced.elapsed();
    assert_eq!(c.slot(), 0);
    assert!(
        took < Duration::from_secs(1),
        "the client connected {took:?} after the replacement; expected well under the 2 s \
         handshake deadline"
    );
}

/// A refusal of the handshake with request id 0 (one the server made before it read the
/// HELLO) answers our HELLO, as `parse_hello_ack` says: it is raised at once, not taken
/// for a stale acknowledgement and retried until the connect deadline.
#[test]
fn a_refusal_with_request_id_0_is_raised_not_retried() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pipes");
    let srv = FifoServer::bind(&path, 1, Limits::default()).expect("bind");
    let client = connect(&path);
    {
        let mut fds = [PollFd::new(&srv.slots[0].req, PollFlags::IN)];
        let n = poll_fds(&mut fds, Duration::from_secs(10)).expect("poll");
        assert!(n > 0, "no hello came within 10 s");
    }
    let refusal = crate::frame::encode_error(
        0,
        0,
        crate::frame::error_code::UNAVAILABLE,
        "the server is shutting down",
    );
    let mut resp = open_fifo(&resp_path(&path, 0), true).expect("open");
    resp.write_all(refusal.as_slice()).expect("write");
    let start = std::time::Instant::now();
    let e = client.join().expect("thread").err().expect("refused");
    assert!(
        matches!(e, Error::Capacity(_)) && e.to_string().contains("shutting down"),
        "{e:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// What a client checks after opening a slot's FIFOs: a path the server replaced since
/// no longer names the FIFO that was opened from it.
#[test]
fn a_replaced_fifo_is_told_from_the_one_that_was_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pipes");
    let mut srv = FifoServer::bind(&path, 1, Limits::default()).expect("bind");
    let rs = resp_path(&path, 0);
    let old = open_fifo(&rs, false).expect("open");
    assert!(still_names(&rs, &old));
    srv.reset_slot(0, true).expect("replace the FIFOs");
    assert!(!still_names(&rs, &old));
    assert!(still_names(&rs, &open_fifo(&rs, false).expect("open")));
    srv.close();
    assert!(!still_names(&rs, &old));
}

/// The server polls the last client's hang-up; before it acts on that poll, the next
/// client's hello arrives. The hello opens a new session, and the stale hang-up of the
/// old response FIFO must not end it (seen as a rare CI failure of the concurrent
/// leasing test: the new client's first request met "the server closed the connection").
#[test]
fn a_stale_hangup_does_not_end_the_next_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pipes");
    let mut srv = FifoServer::bind(&path, 1, Limits::default()).expect("bind");
    let first = connect(&path);
    while !first.is_finished() {
        srv.pump(Duration::from_millis(10)).expect("pump");
    }
    drop(first.join().expect("thread").expect("first client"));
    let stale = loop {
        let ev = srv.poll_events(Duration::from_millis(100)).expect("poll");
        if ev
            .iter()
            .any(|&(_, req, _, e)| !req && e.intersects(PollFlags::ERR))
        {
            break ev;
        }
    };
    let second = connect(&path);
    // Wait for its hello to sit in the request FIFO, then act on the stale poll.
    let start = std::time::Instant::now();
    while rustix::io::ioctl_fionread(&srv.slots[0].req).expect("fionread") == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "no hello came");
        std::thread::sleep(Duration::from_millis(5));
    }
    srv.apply_events(&stale).expect("apply");
    assert!(
        srv.is_connected(0),
        "the stale hang-up ended the new session"
    );
    while !second.is_finished() {
        srv.pump(Duration::from_millis(10)).expect("pump");
    }
    let mut c = second.join().expect("thread").expect("second client");
    let data = [7u8; 16];
    let t = [TensorRef {
        dtype: DType::UInt8,
        shape: &[16],
        data: &data,
    }];
    let timeout = Some(Duration::from_secs(10));
    c.send(Meta::new(Kind::Request), &t, timeout, &mut no_interrupt())
        .expect("send");
    let got = loop {
        let ready = srv.wait_any(timeout, &mut no_interrupt()).expect("wait");
        if ready.contains(&0) {
            break srv.recv(0).expect("recv").expect("a request");
        }
    };
    srv.send(0, Meta::new(Kind::Response), &t).expect("answer");
    assert_eq!(got.tensor_bytes(0).expect("tensor"), &data);
    let answer = c.recv(timeout, &mut no_interrupt()).expect("the answer");
    assert_eq!(answer.tensor_bytes(0).expect("tensor"), &data);
}

/// As for Unix sockets: no inotify watch for a running server, and a server that comes
/// up while the client waits for it (its directory first, then its files) is found at once.
#[test]
fn connect_watches_only_while_no_server_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pipes");
    crate::transport::testing::assert_watches_only_while_waiting(
        || FifoServer::bind(&p, 1, Limits::default()).unwrap(),
        |s: &mut FifoServer| s.pump(Duration::from_millis(5)).unwrap(),
        || {
            let p = p.clone();
            move |i: Interrupt<'_>| FifoClient::connect(&p, None, Some(Duration::from_secs(10)), i)
        },
        &[(0, 0, 0), (1, 1, 0), (2, 1, 1)],
    );
}
