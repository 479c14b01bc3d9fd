//! Deadlines and waiting on descriptors: every blocking call of the transports waits in
//! slices of [`INTERRUPT_CHECK`] so that its interrupt callback and peer check run.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::error::{Error, Result};
use crate::transport::{Interrupt, INTERRUPT_CHECK};

/// A point in time after which a blocking call gives up.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: Instant,
    end: Option<Instant>,
}

impl Deadline {
    pub fn after(timeout: Option<Duration>) -> Deadline {
        let start = Instant::now();
        Deadline {
            start,
            end: timeout.map(|t| {
                start
                    .checked_add(t)
                    .unwrap_or(start + Duration::from_secs(1 << 40))
            }),
        }
    }

    pub fn is_none(&self) -> bool {
        self.end.is_none()
    }

    /// Time left, `None` if unbounded.
    pub fn remaining(&self) -> Option<Duration> {
        self.end
            .map(|e| e.saturating_duration_since(Instant::now()))
    }

    pub fn expired(&self) -> bool {
        matches!(self.end, Some(e) if Instant::now() >= e)
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// How long the next wait may last: the time left, at most `INTERRUPT_CHECK`.
    pub fn slice(&self) -> Duration {
        match self.remaining() {
            Some(r) => r.min(INTERRUPT_CHECK),
            None => INTERRUPT_CHECK,
        }
    }

    pub fn timeout_error(&self, what: impl Into<String>) -> Error {
        Error::timeout(what, self.elapsed())
    }
}

/// `poll(2)` on a set of descriptors for at most `wait`. EINTR counts as a wake-up with
/// nothing ready (the caller re-checks its interrupt callback).
pub(crate) fn poll_fds(fds: &mut [PollFd<'_>], wait: Duration) -> Result<usize> {
    let ts = Timespec {
        tv_sec: wait.as_secs() as i64,
        tv_nsec: i64::from(wait.subsec_nanos()),
    };
    match rustix::event::poll(fds, Some(&ts)) {
        Ok(n) => Ok(n),
        Err(rustix::io::Errno::INTR) => Ok(0),
        Err(e) => Err(Error::io("poll", e)),
    }
}

/// Wait until `fd` is ready for `events` (or reports an error/hang-up), the deadline
/// passes, or the interrupt callback fails. `liveness` is called between slices to detect a
/// dead peer that the descriptor alone cannot show.
pub(crate) fn wait_fd(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: &Deadline,
    interrupt: Interrupt<'_>,
    what: &dyn Fn() -> String,
    liveness: &mut dyn FnMut() -> Result<()>,
) -> Result<PollFlags> {
    let mut fds = [PollFd::from_borrowed_fd(fd, events)];
    wait_fds(&mut fds, deadline, interrupt, what, liveness)?;
    Ok(fds[0].revents())
}

/// [`wait_fd`] on several descriptors: returns once any of `fds` reports an event (read
/// each one's `revents`).
pub(crate) fn wait_fds(
    fds: &mut [PollFd<'_>],
    deadline: &Deadline,
    interrupt: Interrupt<'_>,
    what: &dyn Fn() -> String,
    liveness: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    loop {
        if poll_fds(fds, deadline.slice())? > 0 {
            return Ok(());
        }
        interrupt()?;
        liveness()?;
        if deadline.expired() {
            return Err(deadline.timeout_error(what()));
        }
    }
}
