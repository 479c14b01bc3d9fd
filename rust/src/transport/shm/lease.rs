//! Leasing a slot, and keeping every slot leasable.
//!
//! A client leases a free slot by writing its pid into the slot's lease word; a lease whose
//! pid has exited (dead, or a zombie not yet reaped: [`pid_alive`]) is free. Two things can
//! make a free slot a poor or unusable choice, and leasing without a slot id ranks the free
//! slots by them, best first:
//!
//! * **Kept answers.** A client that closes while some of its received messages live (numpy
//!   arrays viewing its response buffers) leaves those buffers marked held by its pid; the
//!   slot's next client has that many response buffers fewer until they are dropped. A slot
//!   with fewer buffers pinned by live processes comes first, so a fully pinned slot is
//!   leased only when nothing else is free (its client's send then says who pins it).
//! * **Corrupt words.** Any process of the user may write into the file. A slot whose ring
//!   words no honest peer could have written ([`ring_words_fault`]: a tail past its head or
//!   more than K behind it, a buffer state that is none of free, busy or held by a pid)
//!   comes last. The server resets such a slot as soon as no client holds it ([`reset`],
//!   called for an idle slot at each liveness check and for every slot a client attaches
//!   to, before it acknowledges), and reports it ([`ServerEndpoint::take_notices`](crate::transport::ServerEndpoint::take_notices)).

use std::sync::atomic::Ordering;

use crate::transport::lock::pid_alive;

use super::layout::off;
use super::ring::{holder_of, Region, BUSY, FREE, HELD};
use super::server::{ServerSlot, ShmServer};

/// Whether a buffer state word is one the protocol writes: free, busy, or held by a pid.
fn valid_state(state: u64) -> bool {
    state == FREE || state == BUSY || (state >> 32 == HELD >> 32 && state as u32 != 0)
}

fn ring_name(response: bool) -> &'static str {
    if response {
        "response"
    } else {
        "request"
    }
}

/// The first word of `slot`'s rings that no honest peer could have written, judged from
/// the words alone, described for a report; `None` if every word is possible.
pub(super) fn ring_words_fault(region: &Region, slot: usize) -> Option<String> {
    let depth = region.geo.depth as u64;
    for response in [false, true] {
        // Relaxed: a consistency check of words a peer may be changing; every value is
        // checked again, with the ring protocol's orderings, where it is used.
        let tail = region.tail(slot, response).load(Ordering::Relaxed);
        let head = region.head(slot, response).load(Ordering::Relaxed);
        if head < tail || head - tail > depth {
            return Some(format!(
                "{} tail {tail}, head {head}, ring depth {depth}",
                ring_name(response)
            ));
        }
        for b in 0..depth as u32 {
            let state = region.state(slot, response, b).load(Ordering::Relaxed);
            if !valid_state(state) {
                return Some(format!(
                    "{} buffer {b} in state {state:#x}",
                    ring_name(response)
                ));
            }
        }
    }
    None
}

/// As [`ring_words_fault`], and the words only the server writes (the request tail, the
/// response head) must equal its own counts `st.read` and `st.resp_head`.
pub(super) fn server_fault(region: &Region, slot: usize, st: &ServerSlot) -> Option<String> {
    // Relaxed: as in `ring_words_fault`.
    let req_tail = region.tail(slot, false).load(Ordering::Relaxed);
    if req_tail != st.read {
        return Some(format!(
            "request tail {req_tail}, the server has read {}",
            st.read
        ));
    }
    let resp_head = region.head(slot, true).load(Ordering::Relaxed);
    if resp_head != st.resp_head {
        return Some(format!(
            "response head {resp_head}, the server has published {}",
            st.resp_head
        ));
    }
    ring_words_fault(region, slot)
}

/// Response buffers of `slot` held by received messages of live processes (`me` counts as
/// live without asking the kernel).
fn pinned(region: &Region, slot: usize, me: u32) -> usize {
    (0..region.geo.depth as u32)
        .filter(|&b| {
            // Relaxed: a ranking hint; the buffers are taken with the ring protocol.
            let state = region.state(slot, true, b).load(Ordering::Relaxed);
            holder_of(state).is_some_and(|pid| pid == me || pid_alive(pid))
        })
        .count()
}

/// Whether the lease word `lease` leaves the slot free for process `me`: nobody holds it,
/// or its holder has exited. A lease of `me` is another client of this process.
pub(super) fn lease_free(lease: u32, me: u32) -> bool {
    lease == 0 || (lease != me && !pid_alive(lease))
}

/// The free slots of the file, best first: whole slots before corrupt ones, then fewer
/// response buffers pinned by kept answers, then the lower slot id.
pub(super) fn lease_order(region: &Region, me: u32) -> Vec<usize> {
    let mut free: Vec<(bool, usize, usize)> = (0..region.geo.num_slots)
        .filter(|&s| {
            // Relaxed: a hint; the lease is taken with a compare-exchange.
            lease_free(region.slot_u32(s, off::LEASE).load(Ordering::Relaxed), me)
        })
        .map(|s| {
            let corrupt = ring_words_fault(region, s).is_some();
            (corrupt, if corrupt { 0 } else { pinned(region, s, me) }, s)
        })
        .collect();
    free.sort_unstable();
    free.into_iter().map(|(_, _, s)| s).collect()
}

/// Set `state` to free if it is `current` still (a live holder may free its own buffer
/// concurrently, which the exchange then leaves alone).
fn free_if(region: &Region, slot: usize, response: bool, b: u32, current: u64) {
    // AcqRel: as the consumer's release (`Region::release`), our reads of the buffer (none)
    // before the producer's acquire in `take_free`.
    let _ = region.state(slot, response, b).compare_exchange(
        current,
        FREE,
        Ordering::AcqRel,
        Ordering::Relaxed,
    );
}

/// Make every ring word of `slot` consistent again, for a slot no client holds (it is idle,
/// or a new client waits for the acknowledgement of its attach): requests queued or half
/// written are dropped, responses never read are freed, and the counters are set to the
/// server's own counts. Buffers held by live processes (the server's own request messages,
/// a previous client's kept answers) are left alone; a state word that is no state, or
/// that names a holder that has exited, is freed. The response buffer of an open
/// reservation stays busy. `server` is the server's pid, the only legitimate holder of a
/// request buffer.
pub(super) fn reset(region: &Region, slot: usize, st: &mut ServerSlot, server: u32) {
    ShmServer::drop_unread(region, slot, st, true);
    let reserved = st
        .reservation
        .as_ref()
        .filter(|(open, _)| open.load(Ordering::Acquire))
        .map(|&(_, b)| b);
    for response in [false, true] {
        for b in 0..region.geo.depth as u32 {
            let state = region.state(slot, response, b).load(Ordering::Acquire);
            let gone = match holder_of(state) {
                Some(pid) if !response => pid != server,
                Some(pid) => !pid_alive(pid),
                // Busy: a response queued and never read (the request ring's were freed
                // by `drop_unread`), unless it is being filled.
                None => state != FREE && !(response && state == BUSY && reserved == Some(b)),
            };
            if gone {
                free_if(region, slot, response, b, state);
            }
        }
    }
    // Relaxed: these words are read by the slot's next client only after it acquires the
    // acknowledgement, which the server stores later with release; no client reads them
    // before (the slot has none).
    region.head(slot, false).store(st.read, Ordering::Relaxed);
    region.tail(slot, false).store(st.read, Ordering::Relaxed);
    region
        .tail(slot, true)
        .store(st.resp_head, Ordering::Relaxed);
    region
        .head(slot, true)
        .store(st.resp_head, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::client::ShmClient;
    use super::super::layout::off;
    use super::super::ring::held_by;
    use super::super::server::ShmServer;
    use super::super::tests::{answer_all, attach, lim, req, T};
    use super::*;
    use crate::error::Error;
    use crate::frame::{Kind, Meta};
    use crate::transport::lock::spawn_zombie;
    use crate::transport::{no_interrupt, ClientEndpoint, Message, ServerEndpoint};

    fn recv(c: &mut ShmClient) -> Message {
        c.recv(T, &mut no_interrupt()).unwrap()
    }

    /// Two requests in flight on `c`'s slot, answered, both answers checked.
    fn two_round_trips(srv: &mut ShmServer, c: &mut ShmClient) {
        req(c, 20, b"a");
        req(c, 21, b"b");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(srv, c.slot()), 2);
        for (tag, want) in [(20, b"b"), (21, b"c")] {
            let m = recv(c);
            assert_eq!(
                (m.meta().app_tag, m.tensor_bytes(0).unwrap()),
                (tag, &want[..])
            );
        }
    }

    /// Receive `n` answers on a new client of `slot` and close it, keeping the answers.
    fn keep_answers(srv: &mut ShmServer, p: &Path, slot: usize, n: u32) -> Vec<Message> {
        let mut c = attach(srv, p, Some(slot)).unwrap();
        for i in 0..n {
            req(&mut c, i, b"k");
        }
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        assert_eq!(answer_all(srv, slot), n as usize);
        let kept = (0..n).map(|_| recv(&mut c)).collect();
        c.close();
        kept
    }

    /// Issue 14: a closed client's kept answers pin its slot's response buffers. The next
    /// client was given that slot (the first free lease) although others were free, and
    /// failed to send with "2 buffers are held by received messages still alive", though
    /// it held none. Leasing prefers a slot with fewer pinned buffers, and the error is
    /// true for the client that sees it.
    #[test]
    fn leasing_prefers_slots_no_kept_answer_pins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 3, lim(), 2).unwrap();
        let pin0 = keep_answers(&mut srv, &p, 0, 2);
        let pin1 = keep_answers(&mut srv, &p, 1, 1);
        let mut c2 = attach(&mut srv, &p, None).unwrap();
        assert_eq!(c2.slot(), 2, "a slot nothing pins comes first");
        two_round_trips(&mut srv, &mut c2);
        let mut c1 = attach(&mut srv, &p, None).unwrap();
        assert_eq!(c1.slot(), 1, "then the least pinned");
        let mut c0 = attach(&mut srv, &p, None).unwrap();
        assert_eq!(
            c0.slot(),
            0,
            "a fully pinned slot only when nothing else is free"
        );
        let e = c0
            .send(Meta::new(Kind::Request), &[], T, &mut no_interrupt())
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Capacity(_)), "{e}");
        assert!(
            text.contains("this client's received messages hold 0")
                && text.contains("2 are pinned by messages a previous client of this slot")
                && text.contains("this process"),
            "{text}"
        );
        // Dropping the kept answers frees the buffers for the slot's new client.
        drop(pin0);
        two_round_trips(&mut srv, &mut c0);
        drop(pin1);
        two_round_trips(&mut srv, &mut c1);
    }

    /// Issue 14: a client SIGKILLed and not yet reaped (a zombie) kept its lease, and the
    /// response buffers its answers held, until its parent called waitpid.
    #[test]
    fn a_zombie_holders_lease_and_buffers_are_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
        let (mut child, zombie) = spawn_zombie();
        let region = srv.region().unwrap();
        region
            .slot_u32(0, off::LEASE)
            .store(zombie, Ordering::Release);
        for b in 0..2 {
            region
                .state(0, true, b)
                .store(held_by(zombie), Ordering::Release);
        }
        let mut c = attach(&mut srv, &p, None).unwrap();
        assert_eq!(c.slot(), 0);
        two_round_trips(&mut srv, &mut c);
        child.wait().unwrap();
    }

    /// Issue 14: one impossible word in an idle slot (its response tail, written by a
    /// same-uid process) made every attach without a slot id fail, "the response ring of
    /// slot 0 is corrupt", though the other slots were free; nothing repaired it. A corrupt
    /// slot is skipped, reported by the server and reset by it while no client holds it.
    #[test]
    fn a_corrupt_slot_is_skipped_reported_and_reset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 4, lim(), 2).unwrap();
        let region = srv.region().unwrap();
        region.tail(0, true).store(u64::MAX - 1, Ordering::Release);
        let mut c = attach(&mut srv, &p, None).unwrap();
        assert_eq!(c.slot(), 1, "the corrupt slot is skipped");
        two_round_trips(&mut srv, &mut c);
        srv.sync_slots(&region, true);
        let notes = srv.take_notices();
        assert!(
            notes.iter().any(|n| n.contains("slot 0 ")
                && n.contains("response tail 18446744073709551614")
                && n.contains("reset")),
            "{notes:?}"
        );
        assert_eq!(region.tail(0, true).load(Ordering::Acquire), 0);
        let mut c0 = attach(&mut srv, &p, Some(0)).unwrap();
        two_round_trips(&mut srv, &mut c0);
        assert!(srv.take_notices().is_empty(), "reported once");
    }

    /// Every ring word of a slot a client asks for by id is made whole when it attaches
    /// (before, each of these failed the attach or its first sends, or lost buffers).
    #[test]
    fn every_corrupt_ring_word_is_repaired_when_a_client_attaches() {
        let words: [(&str, usize, u64); 6] = [
            ("response tail", off::RESP_TAIL, u64::MAX),
            ("response head", off::RESP_HEAD, 77),
            ("request head", off::REQ_HEAD, 1 << 40),
            ("request tail", off::REQ_TAIL, 5),
            ("request buffer 1 state", off::STATES + 8, 0xdead_beef),
            ("response buffer 0 state", off::STATES + off::RING_STRIDE, 7),
        ];
        for (what, field, value) in words {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("shm");
            let mut srv = ShmServer::create(&p, 1, lim(), 2).unwrap();
            let region = srv.region().unwrap();
            region.slot_u64(0, field).store(value, Ordering::Release);
            let mut c = attach(&mut srv, &p, Some(0)).unwrap_or_else(|e| panic!("{what}: {e}"));
            for _ in 0..3 {
                two_round_trips(&mut srv, &mut c);
            }
            let notes = srv.take_notices();
            assert!(
                notes.iter().any(|n| n.contains("slot 0 ")),
                "{what}: {notes:?}"
            );
        }
    }

    /// A slot whose rings are corrupted under its client stays out of use until the client
    /// leaves; then the server resets it and the next client gets it whole.
    #[test]
    fn a_slot_corrupted_under_its_client_is_reset_once_it_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shm");
        let mut srv = ShmServer::create(&p, 2, lim(), 2).unwrap();
        let region = srv.region().unwrap();
        let mut c = attach(&mut srv, &p, None).unwrap();
        assert_eq!(c.slot(), 0);
        region.tail(0, true).store(1 << 50, Ordering::Release);
        req(&mut c, 1, b"x");
        srv.wait_any(T, &mut no_interrupt()).unwrap();
        let m = srv.recv(0).unwrap().unwrap();
        drop(m);
        let e = srv.send(0, Meta::new(Kind::Response), &[]).unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        c.close();
        srv.sync_slots(&region, true);
        let notes = srv.take_notices();
        assert!(
            notes
                .iter()
                .any(|n| n.contains("slot 0 ") && n.contains("reset")),
            "{notes:?}"
        );
        let mut c2 = attach(&mut srv, &p, None).unwrap();
        assert_eq!(c2.slot(), 0);
        two_round_trips(&mut srv, &mut c2);
    }
}
