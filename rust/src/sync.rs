//! Cross-process wake-up for the shared-memory transport: futex wait/wake on words in a
//! shared mapping, and the atomics protocol of the slot rings.
//!
//! # Words
//!
//! Every synchronisation word lives in the shared file (see `transport::shm` for the byte
//! layout) on its own 64-byte cache line. All are naturally aligned and only ever accessed
//! atomically; the file is native-endian (client and server run on the same machine).
//!
//! * **Ring counters** (`u64`, never wrap in practice): each ring has a pool of K buffers
//!   and a queue of K buffer indices with a `head` (count of entries published, written only
//!   by the producer) and a `tail` (count of entries popped, written only by the consumer);
//!   entry `pos` lives at queue index `pos % K`.
//! * **Buffer states** (`u64`, one per buffer): free, busy (the producer fills it, or it
//!   waits in the queue) or held by a received message of process `pid`. Only the producer
//!   takes a buffer out of the free state; whoever holds it puts it back.
//! * **Events** ([`Event`]): a `u32` sequence number plus a `u32` count of sleepers. A
//!   notifier bumps the sequence after making its change visible; a waiter that found
//!   nothing to do sleeps in `FUTEX_WAIT` on the sequence value it read *before* checking.
//!
//! # Publishing and consuming a buffer
//!
//! ```text
//! producer                                   consumer
//! find b with state[b].load(Acquire) == free h = head.load(Acquire)       -- (2) pairs with (1)
//!   -- (4) pairs with (5); state[b] = busy   b = queue[t % K] (t = own tail < h)
//! write the frame into buffer b              state[b] = held(pid); tail.store(t + 1, Release)
//! queue[h % K] = b                           read the frame in buffer b, as long as it is held
//! head.store(h + 1, Release)     -- (1)      state[b].store(free, Release) -- (5)
//! event.notify()
//! ```
//!
//! The release store (1) orders the frame bytes and the queue entry before the new head; the
//! consumer's acquire load (2) makes them visible before it reads them. Symmetrically, (5)
//! orders the consumer's last read of a buffer before the producer's acquire load (4) lets it
//! reuse the buffer. A received message is a view into its buffer and holds it; messages may
//! be dropped in any order, and one kept alive costs one buffer, never the whole ring. Each
//! queued entry is a distinct busy buffer, so a producer that found a free buffer also finds
//! a free queue position.
//!
//! # Wake-ups without lost notifications
//!
//! ```text
//! waiter                                     notifier
//! s = seq.load(Acquire)                      make the change (e.g. head.store Release)
//! if condition holds: done                   seq.fetch_add(1, SeqCst)
//! spin a few µs re-checking condition        if waiters.load(SeqCst) > 0: FUTEX_WAKE(seq)
//! waiters.fetch_add(1, SeqCst)
//! FUTEX_WAIT(seq, s, slice)                  -- returns at once if seq != s
//! waiters.fetch_sub(1)
//! ```
//!
//! If the notifier's change came after the waiter's check, its `fetch_add` comes after the
//! waiter's load of `s`, so the kernel's compare in `FUTEX_WAIT` fails (or the wake finds
//! the waiter queued). The `waiters` count only lets the notifier skip the `FUTEX_WAKE`
//! system call when nobody sleeps: the waiter's increment and the notifier's bump are both
//! sequentially consistent read-modify-writes, so at least one of them sees the other (the
//! waiter sees a changed `seq` in the kernel, or the notifier sees `waiters > 0`). A waiter
//! killed while asleep leaves `waiters` too high, which costs only spare wake calls.
//!
//! The server has one such event for all slots, the *doorbell*: a client bumps it after
//! publishing a request, and the server's `wait_any` reads it, scans every request ring and
//! sleeps on it only if no ring has anything pending. Each slot has a response event (the
//! client waits for responses and for the attach acknowledgement on it) and a request-space
//! event (a client with a full request ring waits for the server to release a buffer).
//!
//! Every sleep is bounded by a slice of at most `transport::INTERRUPT_CHECK`, after which the
//! caller checks its interrupt callback and the peer's liveness; futexes are *shared*
//! (no `FUTEX_PRIVATE_FLAG`) because the words live in a mapping shared between processes.
//!
//! # Slot leases and attach
//!
//! Each slot's control block holds `lease` (the client's pid, 0 = free), `attach_seq` and
//! `ack_seq`. A client claims a slot with `compare_exchange(0 or a dead pid -> own pid)`,
//! then bumps `attach_seq` (Release), rings the doorbell and waits until `ack_seq` equals
//! its attach number. The server, seeing `attach_seq != ack_seq`, drops what the previous
//! holder left (unread requests, request buffers it left busy, unanswered ids, open
//! reservations), stores `ack_seq` (Release) and notifies the slot's response event. The
//! client's acquire load of `ack_seq` then orders all earlier server writes to the rings
//! before the client reads the counters: it frees the responses still queued and the buffers
//! held by dead processes, and starts from the current `head` of the response ring, so it
//! never sees a response meant for its predecessor. A client gives its lease back when it is
//! closed (compare-exchange from its pid to 0), whether or not its messages are still alive:
//! the buffers they hold stay marked with its pid until they are dropped.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::thread::futex;

/// How long a waiter spins re-checking its condition before it sleeps in the kernel.
///
/// A futex wake-up costs scheduler latency, 30-80 µs measured on a 2-vCPU VM. The window
/// must exceed it: otherwise, once one side sleeps, the other side's spin runs out while the
/// first is still waking, and both stay in sleep/wake lockstep (measured: a 30 or 50 µs
/// window gave an 80-120 µs small round trip, 200 µs gave 3.5 µs). 200 µs of spinning after
/// each message is negligible CPU when idle.
pub const SPIN: Duration = Duration::from_micros(200);

/// Outcome of one bounded futex sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Woken by a notifier, or the value had already changed.
    Woken,
    /// The slice passed (or a signal interrupted the sleep); the caller re-checks.
    TimedOut,
}

/// `FUTEX_WAIT` on a shared (inter-process) word: sleep while `*word == expected`, for at
/// most `timeout`.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> Wake {
    let ts = futex::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match futex::wait(word, futex::Flags::empty(), expected, Some(&ts)) {
        Ok(()) => Wake::Woken,
        // The value changed before we slept.
        Err(Errno::AGAIN) => Wake::Woken,
        // TIMEDOUT, INTR and anything unexpected: report a plain timeout, the caller's loop
        // re-checks the condition, its interrupt callback and its deadline.
        Err(_) => Wake::TimedOut,
    }
}

/// `FUTEX_WAKE` every waiter on a shared word.
pub fn futex_wake_all(word: &AtomicU32) {
    // An error here (EFAULT on a bad address cannot happen for a live reference) would only
    // mean nobody was woken; waiters wake on their slice anyway.
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}

/// An event in shared memory: a sequence word and a sleeper count (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    seq: &'a AtomicU32,
    waiters: &'a AtomicU32,
}

impl<'a> Event<'a> {
    pub fn new(seq: &'a AtomicU32, waiters: &'a AtomicU32) -> Event<'a> {
        Event { seq, waiters }
    }

    /// The current sequence value; read it *before* checking the condition you wait for.
    pub fn current(&self) -> u32 {
        self.seq.load(Ordering::Acquire)
    }

    /// Announce a change made visible (with release ordering) before this call.
    pub fn notify(&self) {
        // SeqCst on both: see "Wake-ups without lost notifications" in the module docs.
        self.seq.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            futex_wake_all(self.seq);
        }
    }

    /// Wake every sleeper without a change (used when the server closes).
    pub fn wake_all(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        futex_wake_all(self.seq);
    }

    /// Sleep while the sequence still equals `seen`, for at most `timeout`.
    pub fn sleep(&self, seen: u32, timeout: Duration) -> Wake {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let r = futex_wait(self.seq, seen, timeout);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Spin for up to `SPIN` (bounded by `limit`) until `ready()` holds or the sequence moves
    /// away from `seen`. Returns whether it stopped early.
    pub fn spin(&self, seen: u32, limit: Duration, ready: &mut dyn FnMut() -> bool) -> bool {
        let end = Instant::now() + SPIN.min(limit);
        let mut n = 0u32;
        loop {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            if self.seq.load(Ordering::Acquire) != seen || ready() {
                return true;
            }
            n = n.wrapping_add(1);
            if n % 4 == 0 && Instant::now() >= end {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wait_times_out_when_nothing_changes() {
        let w = AtomicU32::new(7);
        let t = Instant::now();
        assert_eq!(futex_wait(&w, 7, Duration::from_millis(20)), Wake::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(15));
        // A stale expected value returns at once.
        assert_eq!(futex_wait(&w, 6, Duration::from_secs(5)), Wake::Woken);
    }

    #[test]
    fn notify_wakes_a_sleeper() {
        let words = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let w2 = Arc::clone(&words);
        let h = std::thread::spawn(move || {
            let ev = Event::new(&w2[0], &w2[1]);
            let seen = ev.current();
            let t = Instant::now();
            while ev.current() == seen {
                assert!(t.elapsed() < Duration::from_secs(5), "never woken");
                ev.sleep(seen, Duration::from_millis(50));
            }
        });
        // Make sure the sleeper is asleep (or about to be), then notify.
        while words[1].load(Ordering::SeqCst) == 0 && !h.is_finished() {
            std::thread::yield_now();
        }
        Event::new(&words[0], &words[1]).notify();
        h.join().unwrap();
        assert_eq!(words[1].load(Ordering::SeqCst), 0);
    }
}
