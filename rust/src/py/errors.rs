//! Rust errors as the exception classes of `sensai.errors`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::error::Error;

/// Turn a crate error into the matching `sensai.errors` exception.
pub(super) fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    let class = match &e {
        Error::Frame(_) | Error::Protocol(_) => "ProtocolError",
        Error::Timeout { .. } => "TransportTimeout",
        Error::PeerGone(_) => "PeerGoneError",
        Error::Capacity(_) => "CapacityError",
        Error::Role(_) => "RoleError",
        Error::AddressInUse(_) => "AddressInUseError",
        Error::Closed => "ClosedError",
        Error::Forked { .. } => "ForkError",
        Error::Remote { .. } => "RemoteError",
        Error::InvalidArgument(_) => return PyValueError::new_err(msg),
        Error::Interrupted => return pyo3::exceptions::PyKeyboardInterrupt::new_err(msg),
        Error::Io { source, .. } => {
            return match source.raw_os_error() {
                // OSError(errno, text) picks the subclass (FileNotFoundError, PermissionError, ...).
                Some(errno) => pyo3::exceptions::PyOSError::new_err((errno, msg)),
                None => pyo3::exceptions::PyOSError::new_err(msg),
            };
        }
    };
    if let Error::Remote { code, message } = &e {
        let build = || -> PyResult<PyErr> {
            let cls = py.import("sensai.errors")?.getattr(class)?;
            Ok(PyErr::from_value(cls.call1((*code, message.as_str()))?))
        };
        return build().unwrap_or_else(|err| err);
    }
    sensai_error(py, class, &msg)
}

/// The exception `class` of `sensai.errors` with the text `msg`.
pub(super) fn sensai_error(py: Python<'_>, class: &str, msg: &str) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = py.import("sensai.errors")?.getattr(class)?;
        Ok(PyErr::from_value(cls.call1((msg,))?))
    };
    build().unwrap_or_else(|err| err)
}
