//! Which process may use an endpoint.
//!
//! After `fork(2)` a child holds copies of its parent's descriptors and mappings, but not a
//! session of its own: a request it sends on an inherited connection gets the answer the
//! parent waits for (both count the same request ids), and on shared memory both write one
//! slot's rings. So an endpoint records the process that opened it; any other process is
//! refused with [`Error::Forked`], and closing or dropping it there only lets go of the
//! copies: it gives back no lease, removes no file and tells no peer anything, since all of
//! that belongs to the parent, which still uses them.

use std::path::Path;

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

/// This process's effective uid: the only user whose servers, clients and files it trusts.
pub(crate) fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Refuse a server whose process runs as another user (a Unix socket's `SO_PEERCRED`).
pub(crate) fn check_peer_uid(uid: u32, path: &Path) -> Result<()> {
    let me = my_uid();
    if uid != me {
        return Err(Error::Role(format!(
            "the server at {} runs as uid {uid}, not as this process's uid {me}; \
             refusing to connect",
            path.display()
        )));
    }
    Ok(())
}

/// Refuse a file or directory (`what`, e.g. "shared-memory file") that another user could
/// have made or could use: it must belong to this process's effective uid, and none of the
/// permission bits in `forbidden` may be set (`0o022`: nobody else may write to it, `0o077`:
/// nobody else may use it at all). `expected` names the mode the server gives it; `action` is
/// what is refused ("attach", "connect", "use it"). One `fstat`/`lstat` result, no syscall.
pub(crate) fn check_private(
    what: &str,
    path: &Path,
    md: &std::fs::Metadata,
    forbidden: u32,
    expected: &str,
    action: &str,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = my_uid();
    if md.uid() != me {
        return Err(Error::Role(format!(
            "{what} {} is owned by uid {}, not by this process's uid {me}; refusing to {action}",
            path.display(),
            md.uid()
        )));
    }
    let mode = md.mode() & 0o7777;
    if mode & forbidden != 0 {
        let access = if forbidden & 0o044 != 0 {
            "use"
        } else {
            "write to"
        };
        return Err(Error::Role(format!(
            "{what} {} has mode {mode:04o}: other users may {access} it (expected {expected}); \
             refusing to {action}",
            path.display()
        )));
    }
    Ok(())
}

/// The context of a failure on `tmp`, the temporary name under which a file is made before
/// it is renamed to `path`: the error names `path`, which is what the user asked for.
pub(crate) fn temp_context(what: &str, path: &Path, tmp: &Path) -> String {
    format!(
        "{what} {} (made at {} first, then renamed into place)",
        path.display(),
        tmp.display()
    )
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
