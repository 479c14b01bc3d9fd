//! Which process may use an endpoint.
//!
//! After `fork(2)` a child holds copies of its parent's descriptors and mappings, but not a
//! session of its own: a request it sends on an inherited connection gets the answer the
//! parent waits for (both count the same request ids), and on shared memory both write one
//! slot's rings. So an endpoint records the process that opened it; any other process is
//! refused with [`Error::Forked`], and closing or dropping it there only lets go of the
//! copies: it gives back no lease, removes no file and tells no peer anything, since all of
//! that belongs to the parent, which still uses them.

use crate::error::{Error, Result};

/// The process that opened an endpoint (or mapped a shared-memory file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pid: u32,
}

fn current_pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

impl Owner {
    /// The calling process.
    pub fn here() -> Owner {
        Owner { pid: current_pid() }
    }

    /// Whether the calling process is the owner (false in a forked child).
    pub fn is_here(&self) -> bool {
        current_pid() == self.pid
    }

    /// `Err(Error::Forked)` unless the calling process is the owner; `what` names the
    /// endpoint ("the client on slot 0 of /tmp/s.sock").
    pub fn check(&self, what: impl FnOnce() -> String) -> Result<()> {
        let here = current_pid();
        if here == self.pid {
            return Ok(());
        }
        Err(Error::Forked {
            what: what(),
            owner: self.pid,
            here,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_passes_and_the_error_names_both_processes() {
        let me = Owner::here();
        assert!(me.is_here());
        me.check(|| unreachable!("no text is built for the owner"))
            .unwrap();
        let other = Owner { pid: me.pid ^ 1 };
        assert!(!other.is_here());
        let e = other
            .check(|| "the client on slot 3 of /x".into())
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Forked { .. }), "{e:?}");
        for part in [
            "the client on slot 3 of /x",
            &format!("process {}", me.pid ^ 1),
            "fork",
        ] {
            assert!(text.contains(part), "{text}");
        }
    }
}
