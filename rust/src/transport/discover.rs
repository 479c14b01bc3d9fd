//! Waiting for a server to appear: inotify watches on the directories that hold its files,
//! and the retry loop of every client's connect.

use std::path::Path;

use rustix::event::{PollFd, PollFlags};

use crate::error::{Error, Result};
use crate::transport::{poll_fds, Deadline, Interrupt};

/// Wakes a client that waits for a server to appear: an inotify watch on the directories
/// that hold (or will hold) the server's files, so that it blocks on the event instead of
/// sleeping. Made only once a first attempt found no server: closing an inotify descriptor
/// that had a watch waits for an RCU grace period in the kernel (milliseconds, 14 ms
/// measured), which a connection to a server that is already up must not pay.
pub(crate) struct DirWatch {
    fd: Option<std::os::fd::OwnedFd>,
    dirs: Vec<std::path::PathBuf>,
}

#[cfg(test)]
thread_local! {
    /// The watches this thread made and its waits on them (see [`testing`]).
    static DIR_WATCH_USE: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

impl DirWatch {
    pub fn new(dirs: &[&Path]) -> DirWatch {
        use rustix::fs::inotify;
        #[cfg(test)]
        DIR_WATCH_USE.with(|n| n.set((n.get().0 + 1, n.get().1)));
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).ok();
        let w = DirWatch {
            fd,
            dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
        };
        w.arm();
        w
    }

    /// (Re)add the watches: one on a directory that did not exist when the last was added,
    /// or that was removed and made again since (a watch dies with its directory), now
    /// covers the directory the path names. Cheap (one path lookup per directory); call it
    /// before each attempt that a later [`DirWatch::wait`] relies on.
    pub fn arm(&self) {
        use rustix::fs::inotify;
        if let Some(fd) = &self.fd {
            let mask = inotify::WatchFlags::CREATE
                | inotify::WatchFlags::MOVED_TO
                | inotify::WatchFlags::OPEN
                | inotify::WatchFlags::CLOSE_WRITE
                | inotify::WatchFlags::ATTRIB
                | inotify::WatchFlags::DELETE;
            for d in &self.dirs {
                // A directory that does not exist yet is covered by the watch on its parent.
                let _ = inotify::add_watch(fd, d, mask);
            }
        }
    }

    /// Block until something changes in the watched directories or one slice of the
    /// deadline passes (the caller then re-checks its interrupt callback and deadline).
    pub fn wait(&self, deadline: &Deadline) -> Result<()> {
        #[cfg(test)]
        DIR_WATCH_USE.with(|n| n.set((n.get().0, n.get().1 + 1)));
        match &self.fd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd, PollFlags::IN)];
                if poll_fds(&mut fds, deadline.slice())? > 0 {
                    let mut buf = [0u8; 4096];
                    while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
                }
            }
            // inotify unavailable (e.g. out of watches): fall back to waiting out the slice.
            None => std::thread::sleep(deadline.slice()),
        }
        Ok(())
    }
}

/// Why one attempt to reach a server did not connect. Private to the connect loops: a
/// caller only ever sees the error inside (after the deadline, for `NotYet`).
#[derive(Debug)]
pub(crate) enum Retry {
    /// No server (yet), or it restarted under us: try again until the deadline, then report
    /// this error.
    NotYet(Error),
    /// A failure no retry can mend (a bad argument, a file of another user, ...).
    Fail(Error),
}

impl From<Error> for Retry {
    fn from(e: Error) -> Retry {
        Retry::Fail(e)
    }
}

/// `Err(Retry::NotYet)` with a [`Error::PeerGone`] saying `what`.
pub(crate) fn not_yet<T>(what: String) -> Result<T, Retry> {
    Err(Retry::NotYet(Error::PeerGone(what)))
}

/// Run `attempt` until it connects, fails for good, or the deadline passes, blocking between
/// attempts until something changes in `dirs`. The first attempt runs without a watch (the
/// common case: the server is up). After a failed one the watch is made and the server tried
/// once more before the first wait, so one that came up between the failed attempt and the
/// watch is found by that attempt, not missed until the deadline; later attempts re-arm the
/// watch first, for the same reason.
pub(crate) fn retry_until_up<T>(
    dirs: &[&Path],
    deadline: &Deadline,
    interrupt: Interrupt<'_>,
    mut attempt: impl FnMut(Interrupt<'_>) -> Result<T, Retry>,
) -> Result<T> {
    let mut watch: Option<DirWatch> = None;
    loop {
        let why = match attempt(&mut *interrupt) {
            Ok(v) => return Ok(v),
            Err(Retry::Fail(e)) => return Err(e),
            Err(Retry::NotYet(e)) => e,
        };
        if deadline.expired() {
            return Err(why);
        }
        interrupt()?;
        match &watch {
            None => watch = Some(DirWatch::new(dirs)),
            Some(w) => {
                w.wait(deadline)?;
                w.arm();
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// What a client thread did while connecting.
    #[derive(Debug)]
    pub struct Connected<C> {
        pub result: Result<C>,
        /// Inotify watches it made (closing one costs milliseconds: none for a running server).
        pub watches: usize,
        /// Times it blocked on a watch.
        pub waits: usize,
        /// From the end of `bind` to the end of the connect.
        pub after_bind: Duration,
    }

    /// Connect from a new thread while this one binds and pumps a server. With `at_call = 0`
    /// the server is bound first; otherwise the client's interrupt callback, on its
    /// `at_call`-th call (a connect calls it each time it found no server, before it makes
    /// its watch or waits on it), has this thread bind the server and blocks until it is
    /// bound: the server appears at exactly that point of the client's loop.
    pub fn connect_as_server_starts<S, C: Send + 'static>(
        at_call: usize,
        bind: impl FnOnce() -> S,
        mut pump: impl FnMut(&mut S),
        connect: impl FnOnce(Interrupt<'_>) -> Result<C> + Send + 'static,
    ) -> Connected<C> {
        let (to_main, from_client) = mpsc::channel::<()>();
        let (to_client, from_main) = mpsc::channel::<()>();
        let mut bind = Some(bind);
        let mut srv = None;
        let mut bound_at = Instant::now();
        if at_call == 0 {
            srv = bind.take().map(|b| b());
            bound_at = Instant::now();
        }
        let client = std::thread::spawn(move || {
            let mut calls = 0;
            let mut interrupt = || {
                calls += 1;
                if calls == at_call {
                    to_main.send(()).expect("the test thread is gone");
                    from_main.recv().expect("the test thread is gone");
                }
                Ok(())
            };
            DIR_WATCH_USE.with(|n| n.set((0, 0)));
            let result = connect(&mut interrupt);
            let done = Instant::now();
            let (watches, waits) = DIR_WATCH_USE.with(|n| n.get());
            (result, watches, waits, done)
        });
        if let Some(b) = bind.take() {
            from_client
                .recv_timeout(Duration::from_secs(30))
                .expect("the client never found the server missing");
            srv = Some(b());
            bound_at = Instant::now();
            to_client.send(()).expect("the client thread is gone");
        }
        let mut srv = srv.expect("bound above");
        while !client.is_finished() {
            pump(&mut srv);
        }
        let (result, watches, waits, done) = client.join().expect("client thread panicked");
        Connected {
            result,
            watches,
            waits,
            after_bind: done.saturating_duration_since(bound_at),
        }
    }

    /// Connect to a server that is up (`at_call = 0`) or comes up at the client's `at_call`-th
    /// interrupt call, for each `(at_call, watches, waits)` case, and check the client
    /// connected, soon after the server was bound, having made `watches` watches and waited
    /// `waits` times on them.
    pub fn assert_watches_only_while_waiting<S, C, F>(
        bind: impl Fn() -> S,
        pump: impl FnMut(&mut S) + Clone,
        connect: impl Fn() -> F,
        cases: &[(usize, usize, usize)],
    ) where
        C: Send + 'static,
        F: FnOnce(Interrupt<'_>) -> Result<C> + Send + 'static,
    {
        for &(at_call, watches, waits) in cases {
            let c = connect_as_server_starts(at_call, &bind, pump.clone(), connect());
            if let Err(e) = &c.result {
                panic!("server up at interrupt call {at_call}: connect failed: {e}");
            }
            assert_eq!(
                (c.watches, c.waits),
                (watches, waits),
                "server up at interrupt call {at_call}: (watches made, waits) differ"
            );
            // Far below the connect timeout (10 s): the appearance was not missed.
            assert!(
                c.after_bind < Duration::from_secs(2),
                "server up at interrupt call {at_call}: connected {:?} after it was bound",
                c.after_bind
            );
        }
    }
}
