//! Fuzz the shared-memory transport's handling of its file: arbitrary header bytes for a
//! client that attaches, and arbitrary slot-table bytes (leases, attach/ack words, ring
//! counters, queue entries, buffer states, frames) under a live server and its clients.
//!
//! The first input byte picks a mode:
//!
//! * even: **file**. The rest of the input is the whole file (header and slot table, at most
//!   64 KiB). Fix-ups chosen by bits of the first byte let the fuzzer past the checks it
//!   cannot guess: bit 1 writes this process's pid as the server pid (a live server), bit 2
//!   sizes the file to the length its header claims (at most 1 MiB, the rest zero), bit 3
//!   acknowledges the next attach to slot 0 (or the slot asked for) ahead of time (so attach completes without a server).
//!   A client then attaches with a zero timeout and, if it got a slot, sends, polls and
//!   receives once; everything must end in a clean error or success.
//! * odd: **server**. A real `ShmServer` creates a small file (1-3 slots, ring depth 2-4,
//!   small limits, from byte 1), then the rest of the input is a program of operations:
//!   patch the file's bytes anywhere (as a hostile or buggy peer would), attach clients
//!   (optionally acknowledged ahead of time), send and receive on both sides, hold and drop
//!   messages, reserve and publish, close clients. Every blocking call has a zero timeout.
//!
//! The target fails on any panic (debug assertions are on, so arithmetic overflow too), any
//! sanitizer report and any out-of-bounds access; libFuzzer's timeout catches a hang. It also
//! checks that what a client or the server receives satisfies the frame rules (every tensor
//! inside the message) and that a client's answer is addressed to its slot.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use sensai::frame::{error_code, DType, Kind, Limits, Meta, TensorRef, TensorSpec};
use sensai::transport::shm::{ShmClient, ShmServer};
use sensai::transport::{no_interrupt, ClientEndpoint, Message, ServerEndpoint};

const ZERO: Option<Duration> = Some(Duration::ZERO);
/// Layout constants of `rust/src/transport/shm.rs` (documented in its module docs).
const HEADER_REGION: u64 = 4096;
const SERVER_PID: u64 = 28;
const SLOT_STRIDE: u64 = 48;
const FILE_LEN: u64 = 56;
const ATTACH_SEQ: u64 = 4;
const ACK_SEQ: u64 = 8;
const MAX_RAW: usize = 64 << 10;
const MAX_EXTEND: u64 = 1 << 20;
const MAX_OPS: usize = 48;

/// A private directory for this fuzzing process (in /dev/shm when there is one).
pub fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("sensai-fuzz-shm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).expect("create the fuzz directory");
        d
    })
}

/// Reads the input front to back; past the end every read is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn read_u32(f: &std::fs::File, off: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    (f.read_at(&mut b, off).ok()? == 4).then(|| u32::from_ne_bytes(b))
}

fn read_u64(f: &std::fs::File, off: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    (f.read_at(&mut b, off).ok()? == 8).then(|| u64::from_ne_bytes(b))
}

/// Make the next attach to the slot at `base` complete without a server: ack = attach + 1.
/// Only inside the file (a write past its end would grow it).
fn pre_ack(f: &std::fs::File, base: u64) {
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if base.checked_add(ACK_SEQ + 4).map_or(true, |end| end > len) {
        return;
    }
    if let Some(a) = read_u32(f, base + ATTACH_SEQ) {
        let _ = f.write_at(&a.wrapping_add(1).to_ne_bytes(), base + ACK_SEQ);
    }
}

/// Every tensor of a received message lies inside its bytes; touch them all.
fn check_message(m: &Message) {
    let len = m.bytes().len();
    let mut sum = 0u8;
    for (i, t) in m.decoded().tensors.iter().enumerate() {
        assert!(t.range().end <= len, "tensor {i} outside its message");
        let b = m.tensor_bytes(i).expect("tensor in range");
        sum = b.iter().fold(sum, |s, x| s.wrapping_add(*x));
    }
    std::hint::black_box(sum);
}

fn request(c: &mut ShmClient, n: usize) {
    let data = vec![0x5a_u8; n];
    let shape = [n as u64];
    let t = [TensorRef {
        dtype: DType::UInt8,
        shape: &shape,
        data: &data,
    }];
    let _ = c.send(Meta::new(Kind::Request), &t, ZERO, &mut no_interrupt());
}

fn client_recv(c: &mut ShmClient, held: &mut Vec<Message>, keep: bool) {
    if let Ok(m) = c.recv_raw(ZERO, &mut no_interrupt()) {
        check_message(&m);
        assert_eq!(
            m.meta().slot as usize,
            c.slot(),
            "an answer for another slot"
        );
        if keep && held.len() < 8 {
            held.push(m);
        }
    }
}

fn file_mode(data: &[u8]) {
    let mut inp = Input(data);
    let flags = inp.u8();
    let path = dir().join("raw");
    let _ = std::fs::remove_file(&path);
    let Ok(f) = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
    else {
        return;
    };
    let body = inp.bytes(MAX_RAW);
    f.write_all_at(body, 0).expect("write the fuzz file");
    if flags & 2 != 0 && body.len() >= 32 {
        let _ = f.write_at(&std::process::id().to_ne_bytes(), SERVER_PID);
    }
    if flags & 4 != 0 {
        if let Some(want) = read_u64(&f, FILE_LEN) {
            if want > body.len() as u64 && want <= MAX_EXTEND {
                let _ = f.set_len(want);
            }
        }
    }
    let slot = match flags >> 4 {
        0 => None,
        s => Some(usize::from(s - 1)),
    };
    if flags & 8 != 0 {
        let stride = read_u64(&f, SLOT_STRIDE).unwrap_or(0);
        let s = slot.unwrap_or(0) as u64;
        if let Some(base) = stride
            .checked_mul(s)
            .and_then(|o| o.checked_add(HEADER_REGION))
        {
            pre_ack(&f, base);
        }
    }
    drop(f);
    if let Ok(mut c) = ShmClient::attach(&path, slot, ZERO, &mut no_interrupt()) {
        let mut held = Vec::new();
        request(&mut c, 16);
        let _ = c.is_ready();
        client_recv(&mut c, &mut held, false);
    }
    let _ = std::fs::remove_file(&path);
}

fn server_mode(data: &[u8]) {
    let mut inp = Input(data);
    let _ = inp.u8();
    let g = inp.u8();
    let num_slots = 1 + usize::from(g % 3);
    let depth = 2 + usize::from((g >> 2) % 3);
    let payload = if g & 0x40 != 0 { 4096 } else { 256 };
    let limits = Limits::new(4, 4, payload).expect("valid limits");
    let path = dir().join("srv");
    let mut srv = match ShmServer::create(&path, num_slots, limits, depth) {
        Ok(s) => s,
        // A leftover of a crashed run: start clean next time.
        Err(_) => {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(dir().join("srv.lock"));
            return;
        }
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the server's file");
    let file_len = f.metadata().expect("stat").len();
    let stride = (file_len - HEADER_REGION) / num_slots as u64;
    let mut clients: Vec<ShmClient> = Vec::new();
    let mut held: Vec<Message> = Vec::new();
    let mut srv_held: Vec<Message> = Vec::new();
    let mut reservation = None;
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        let op = inp.u8();
        let arg = inp.u8();
        let slot = usize::from(arg) % (num_slots + 1);
        match op % 16 {
            // Patch bytes: in the header (offset < 4096) or anywhere in the slots.
            0 | 1 => {
                let at = if op % 16 == 0 {
                    u64::from(inp.u16()) % HEADER_REGION
                } else {
                    HEADER_REGION + u64::from(inp.u16()) * 8 % (file_len - HEADER_REGION)
                };
                let n = usize::from(arg % 17);
                let b = inp.bytes(n).to_vec();
                let _ = f.write_at(&b, at);
            }
            // Attach a client (to any slot or to one), optionally acknowledged ahead.
            2 => {
                if clients.len() < 3 {
                    if arg & 0x80 != 0 {
                        for s in 0..num_slots as u64 {
                            pre_ack(&f, HEADER_REGION + s * stride);
                        }
                    }
                    let want = (arg & 0x40 != 0).then_some(slot);
                    if let Ok(c) = ShmClient::attach(&path, want, ZERO, &mut no_interrupt()) {
                        clients.push(c);
                    }
                }
            }
            3 => {
                if let Ok(ready) = srv.wait_any(ZERO, &mut no_interrupt()) {
                    assert!(ready.iter().all(|&s| s < num_slots));
                }
            }
            4 => {
                let _ = srv.is_ready_slot(slot);
                let _ = srv.is_connected(slot);
            }
            5 => {
                if let Ok(Some(m)) = srv.recv(slot) {
                    check_message(&m);
                    if arg & 0x80 != 0 && srv_held.len() < 8 {
                        srv_held.push(m);
                    }
                }
            }
            6 => {
                let n = usize::from(inp.u8()) * 4;
                let data = vec![0xa5_u8; n];
                let shape = [n as u64];
                let t = [TensorRef {
                    dtype: DType::UInt8,
                    shape: &shape,
                    data: &data,
                }];
                let _ = srv.send(slot, Meta::new(Kind::Response), &t);
            }
            7 => {
                let msg = "x".repeat(usize::from(inp.u8()) * 8);
                let _ = srv.send_error(slot, error_code::BAD_REQUEST, &msg);
            }
            8 => {
                if reservation.is_none() {
                    let shape = [u64::from(inp.u8())];
                    let specs = [TensorSpec {
                        dtype: DType::Float32,
                        shape: &shape,
                    }];
                    reservation = srv.reserve(slot, Meta::new(Kind::Response), &specs).ok();
                    if let Some(r) = reservation.as_mut() {
                        if let Some(b) = r.tensor_mut(0) {
                            b.fill(0x3c);
                        }
                    }
                }
            }
            9 => {
                if let Some(r) = reservation.take() {
                    if arg & 1 != 0 {
                        let _ = srv.publish(r);
                    }
                }
            }
            10 | 11 => {
                if let Some(c) = clients.get_mut(usize::from(arg) % 3) {
                    request(c, usize::from(inp.u8()) * 2);
                }
            }
            12 => {
                if let Some(c) = clients.get_mut(usize::from(arg) % 3) {
                    let _ = c.is_ready();
                    client_recv(c, &mut held, arg & 0x80 != 0);
                }
            }
            13 => {
                if let Some(c) = clients.get_mut(usize::from(arg) % 3) {
                    if let Ok(m) = c.recv_for(u64::from(inp.u8()), ZERO, &mut no_interrupt()) {
                        check_message(&m);
                    }
                }
            }
            14 => {
                let i = usize::from(arg);
                if arg & 1 != 0 && !held.is_empty() {
                    held.swap_remove(i % held.len());
                } else if !srv_held.is_empty() {
                    srv_held.swap_remove(i % srv_held.len());
                }
            }
            _ => {
                if !clients.is_empty() {
                    let i = usize::from(arg) % clients.len();
                    clients.swap_remove(i).close();
                }
            }
        }
    }
    drop(reservation);
    drop(clients);
    drop(held);
    drop(srv_held);
    srv.close();
}

/// One input, the whole check: panics on any failure.
pub fn run(data: &[u8]) {
    match data.first() {
        Some(b) if b & 1 == 1 => server_mode(data),
        _ => file_mode(data),
    }
}
