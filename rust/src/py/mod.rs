//! Python bindings: the extension module `sensai._core`.
//!
//! The only file that knows Python exists. It converts numpy arrays to frame tensors
//! (borrowing their buffers, no copy), releases the GIL around every wait and bulk copy,
//! re-acquires it every few milliseconds during waits to let Ctrl-C through, and turns
//! received frames into numpy arrays that view the received buffer (no copy). Errors
//! become the exception classes of `sensai.errors`.
//!
//! Threads: the endpoint classes are `frozen` (no PyO3 borrow flag, whose violation was a bare
//! `RuntimeError: Already borrowed`); each keeps its endpoint in a [`Shared`], which lets one
//! call at a time use it, makes a second caller wait for a short call or raise `BusyError`
//! during a blocking one, and lets `close()` and the properties through at any time.

use pyo3::prelude::*;

use crate::frame::{self, DType};

mod classes;
mod convert;
mod errors;
mod holder;

use classes::{PyClient, PyMessage, PyReservation, PyServer};

#[pyfunction]
fn dtype_names() -> Vec<&'static str> {
    DType::ALL.iter().map(|d| d.name()).collect()
}

/// The file a shared-memory server at `path` creates: a bare name goes under /dev/shm.
#[pyfunction]
fn shm_path(path: std::ffi::OsString) -> std::ffi::OsString {
    crate::transport::shm::resolve_path(std::path::Path::new(&path)).into_os_string()
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PROTOCOL_VERSION", frame::PROTOCOL_VERSION)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyMessage>()?;
    m.add_class::<PyServer>()?;
    m.add_class::<PyClient>()?;
    m.add_class::<PyReservation>()?;
    m.add_function(wrap_pyfunction!(dtype_names, m)?)?;
    m.add_function(wrap_pyfunction!(shm_path, m)?)?;
    let codes = pyo3::types::PyDict::new(m.py());
    for (name, code) in [
        ("BAD_REQUEST", frame::error_code::BAD_REQUEST),
        ("PROTOCOL", frame::error_code::PROTOCOL),
        ("CAPACITY", frame::error_code::CAPACITY),
        ("INTERNAL", frame::error_code::INTERNAL),
        ("UNAVAILABLE", frame::error_code::UNAVAILABLE),
        ("ROLE", frame::error_code::ROLE),
    ] {
        codes.set_item(name, code)?;
    }
    m.add("ERROR_CODES", codes)?;
    Ok(())
}
