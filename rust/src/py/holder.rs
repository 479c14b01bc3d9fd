//! Thread turn-taking for the endpoint classes ([`Shared`]) and the GIL-released waits that
//! re-check for Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;

use pyo3::prelude::*;

use crate::error::Error;
use crate::transport::access::Owner;

use super::errors::{sensai_error, to_pyerr};

/// Run `f` without the GIL. `f` gets an interrupt callback that briefly re-takes the GIL to
/// run Python's signal handlers; if one raises (Ctrl-C), the wait ends with that exception.
pub(super) fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce(&mut dyn FnMut() -> Result<(), Error>) -> Result<T, Error> + Send,
) -> PyResult<T> {
    detached_until(py, None, f, |py| to_pyerr(py, Error::Closed))
}

/// [`detached`], whose interrupt callback also ends the wait once `closing` is set (after the
/// signal handlers ran: one of them may have set it), with the error `on_closed` makes.
pub(super) fn detached_until<T: Send>(
    py: Python<'_>,
    closing: Option<&AtomicBool>,
    f: impl FnOnce(&mut dyn FnMut() -> Result<(), Error>) -> Result<T, Error> + Send,
    on_closed: impl FnOnce(Python<'_>) -> PyErr,
) -> PyResult<T> {
    let mut stash: Option<PyErr> = None;
    let mut closed = false;
    let result = py.detach(|| {
        let mut check = || {
            Python::attach(|py| py.check_signals()).map_err(|e| {
                stash = Some(e);
                Error::Interrupted
            })?;
            // Acquire: pairs with the Release store of `close()`.
            if closing.is_some_and(|c| c.load(Ordering::Acquire)) {
                closed = true;
                return Err(Error::Closed);
            }
            Ok(())
        };
        f(&mut check)
    });
    result.map_err(|e| match (e, stash.take()) {
        (Error::Interrupted, Some(err)) => err,
        (Error::Closed, _) if closed => on_closed(py),
        (e, _) => to_pyerr(py, e),
    })
}

/// Lock a mutex whose holder may have panicked: the data it guards (an endpoint, or who
/// holds it) stays valid to use, a panic inside an endpoint call already became Python's
/// `PanicException`.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The call that holds an endpoint, named in the error a second caller gets.
#[derive(Clone, Copy)]
pub(super) struct Holder {
    pub(super) thread: ThreadId,
    pub(super) method: &'static str,
    /// The call may block for as long as its timeout (`wait_any`, a client's `recv`): a second
    /// caller gets `BusyError` at once rather than wait for it.
    pub(super) blocking: bool,
}

/// What an endpoint does when it is closed.
pub(super) trait Close {
    fn close_now(&mut self);
}

/// An endpoint that Python threads share. Calls take turns: one holds the endpoint at a time,
/// a second caller waits (with the GIL released) for a short call to finish and gets
/// `BusyError` while the holder is in a blocking one. `close()` and the properties never
/// wait: `close()` sets `closing`, which ends the holder's wait at its next interrupt check
/// (at most `INTERRUPT_CHECK`), and the endpoint is closed by whichever of the two comes last.
pub(super) struct Shared<T: Close> {
    pub(super) core: Mutex<Option<T>>,
    pub(super) holder: Mutex<Option<Holder>>,
    pub(super) released: Condvar,
    pub(super) closing: AtomicBool,
    pub(super) class: &'static str,
    pub(super) path: String,
    /// The process that opened the endpoint; any other (a forked child) gets `ForkError`.
    pub(super) owner: Owner,
}

/// One call's hold on a [`Shared`] endpoint; released (and the endpoint closed, if `close()`
/// was called meanwhile) when dropped.
pub(super) struct Held<'a, T: Close> {
    pub(super) shared: &'a Shared<T>,
    pub(super) core: MutexGuard<'a, Option<T>>,
}

impl<T: Close> Held<'_, T> {
    /// The endpoint, or `ClosedError`.
    pub(super) fn get(&mut self) -> PyResult<&mut T> {
        self.core
            .as_mut()
            .ok_or_else(|| Python::attach(|py| to_pyerr(py, Error::Closed)))
    }
}

impl<T: Close> Drop for Held<'_, T> {
    fn drop(&mut self) {
        // Acquire: see the flag that a `close()` waiting for this call (or one called from a
        // signal handler inside it) set before it waited.
        if self.shared.closing.load(Ordering::Acquire) {
            if let Some(mut c) = self.core.take() {
                c.close_now();
            }
        }
        *lock(&self.shared.holder) = None;
        self.shared.released.notify_all();
    }
}

impl<T: Close + Send> Shared<T> {
    pub(super) fn new(core: T, class: &'static str, path: String) -> Shared<T> {
        Shared {
            core: Mutex::new(Some(core)),
            holder: Mutex::new(None),
            released: Condvar::new(),
            closing: AtomicBool::new(false),
            class,
            path,
            owner: Owner::here(),
        }
    }

    pub(super) fn closed(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// `ClosedError` once `close()` was called.
    pub(super) fn check_open(&self, py: Python<'_>) -> PyResult<()> {
        if self.closed() {
            return Err(to_pyerr(py, Error::Closed));
        }
        Ok(())
    }

    /// Wait (call it without the GIL) until no call holds the endpoint, and return the lock on
    /// its holder, or return at once the holder for which `give_up` is true.
    pub(super) fn wait_for_holder(
        &self,
        give_up: impl Fn(&Holder) -> bool,
    ) -> Result<MutexGuard<'_, Option<Holder>>, Holder> {
        let mut h = lock(&self.holder);
        while let Some(other) = *h {
            if give_up(&other) {
                return Err(other);
            }
            h = self
                .released
                .wait(h)
                .unwrap_or_else(PoisonError::into_inner);
        }
        Ok(h)
    }

    /// Take the endpoint for `method`: wait for a short call of another thread to end, refuse
    /// (`BusyError`) while another thread is in a blocking call or while this thread is (a
    /// signal handler running inside that call).
    pub(super) fn hold(
        &self,
        py: Python<'_>,
        method: &'static str,
        blocking: bool,
    ) -> PyResult<Held<'_, T>> {
        // Before waiting for a holder: in a forked child, a thread that held the endpoint at
        // the fork never lets go.
        self.owner
            .check(|| format!("{}.{method} on {}", self.class, self.path))
            .map_err(|e| to_pyerr(py, e))?;
        let me = std::thread::current().id();
        let waited: Result<(), Holder> = py.detach(|| {
            let mut h = self.wait_for_holder(|other| other.thread == me || other.blocking)?;
            *h = Some(Holder {
                thread: me,
                method,
                blocking,
            });
            Ok(())
        });
        if let Err(other) = waited {
            let (c, p) = (self.class, &self.path);
            let msg = if other.thread == me {
                format!(
                    "{c}.{method} was called while this thread is inside {c}.{} on {p} (from a \
                     signal handler?); only close() and the properties kind, path, num_slots, \
                     limits and closed may be called there",
                    other.method
                )
            } else {
                format!(
                    "{c}.{method}: the endpoint at {p} is busy in another thread, inside \
                     {c}.{}, which blocks until its timeout; an endpoint serves one thread at a \
                     time: call it from the thread that waits, or close() it from this one \
                     (close() and the properties kind, path, num_slots, limits and closed work \
                     from any thread)",
                    other.method
                )
            };
            return Err(sensai_error(py, "BusyError", &msg));
        }
        Ok(Held {
            shared: self,
            core: lock(&self.core),
        })
    }

    /// Close now, or, from a signal handler inside this thread's own call on the endpoint,
    /// once that call returns. A blocking call of another thread ends at its next interrupt
    /// check (`ClosedError`), and this returns once the endpoint is closed.
    pub(super) fn close(&self, py: Python<'_>) {
        // Release: a holder that sees the flag (in its interrupt check or when it lets go)
        // closes the endpoint itself.
        self.closing.store(true, Ordering::Release);
        if !self.owner.is_here() {
            // A forked child's copy: drop it without waiting (a thread that held it at the
            // fork does not exist here; if it held the lock, the copy stays until exit).
            // Dropping lets go of the descriptors and mappings only (see transport::access).
            if let Ok(mut core) = self.core.try_lock() {
                drop(core.take());
            }
            return;
        }
        let me = std::thread::current().id();
        let core = py.detach(|| {
            // This thread's own call (a signal handler runs inside it) closes it when it returns.
            let h = self.wait_for_holder(|other| other.thread == me).ok()?;
            // Nobody holds the endpoint, and nobody can take it while we hold `holder`.
            let core = lock(&self.core).take();
            drop(h);
            core
        });
        if let Some(mut c) = core {
            py.detach(|| c.close_now());
        }
    }

    /// Run `f` without the GIL, as [`detached`] does, and end its wait (`ClosedError`
    /// naming `method`) when `close()` is called from another thread or a signal handler.
    pub(super) fn detached<R: Send>(
        &self,
        py: Python<'_>,
        method: &str,
        f: impl FnOnce(&mut dyn FnMut() -> Result<(), Error>) -> Result<R, Error> + Send,
    ) -> PyResult<R> {
        detached_until(py, Some(&self.closing), f, |py| {
            let msg = format!(
                "{}.{method} on {}: the endpoint was closed (close() from another thread or a \
                 signal handler) while the call waited",
                self.class, self.path
            );
            sensai_error(py, "ClosedError", &msg)
        })
    }
}
