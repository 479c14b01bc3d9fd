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

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use numpy::npyffi::{
    self, npy_intp, NPY_ARRAY_ALIGNED, NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_WRITEABLE, PY_ARRAY_API,
};
use numpy::prelude::*;
use numpy::{PyArrayDescr, PyUntypedArray};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::error::Error;
use crate::frame::{self, DType, Kind, Limits, Meta, TensorRef, TensorSpec, FLAG_LIST};
use crate::transport::access::Owner;
use crate::transport::fifo::{FifoClient, FifoServer};
use crate::transport::shm::{Reservation, ShmClient, ShmServer};
use crate::transport::uds::{UdsClient, UdsServer};
use crate::transport::{slot_out_of_range, ClientEndpoint, Message, ServerEndpoint};

/// Turn a crate error into the matching `sensai.errors` exception.
fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
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

/// Run `f` without the GIL. `f` gets an interrupt callback that briefly re-takes the GIL to
/// run Python's signal handlers; if one raises (Ctrl-C), the wait ends with that exception.
fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce(&mut dyn FnMut() -> Result<(), Error>) -> Result<T, Error> + Send,
) -> PyResult<T> {
    detached_until(py, None, f, |py| to_pyerr(py, Error::Closed))
}

/// [`detached`], whose interrupt callback also ends the wait once `closing` is set (after the
/// signal handlers ran: one of them may have set it), with the error `on_closed` makes.
fn detached_until<T: Send>(
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

/// The slot a client asks for: a negative id is out of range (the `ValueError` every transport
/// raises for a slot past the server's last one), not an `OverflowError`.
fn client_slot_arg(py: Python<'_>, slot_id: Option<i64>, path: &str) -> PyResult<Option<usize>> {
    match slot_id {
        None => Ok(None),
        Some(s) => usize::try_from(s)
            .map(Some)
            .map_err(|_| to_pyerr(py, slot_out_of_range(s, None, std::path::Path::new(path)))),
    }
}

fn timeout_arg(t: Option<f64>, name: &str) -> PyResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(PyValueError::new_err(format!(
            "{name} must be None or a finite number of seconds >= 0, got {s}"
        ))),
    }
}

fn limits_arg(max_nbytes: u64, max_tensors: u32, max_dims: u32) -> PyResult<Limits> {
    Limits::new(max_tensors, max_dims, max_nbytes).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The wire dtype of a numpy array (with an optional override, e.g. "bfloat16" for raw
/// 2-byte words).
fn wire_dtype(
    descr: &Bound<'_, PyArrayDescr>,
    index: usize,
    over: Option<&str>,
) -> PyResult<DType> {
    let order = descr.byteorder();
    if order == b'>' {
        return Err(PyValueError::new_err(format!(
            "tensor {index}: big-endian arrays are not supported; convert with arr.astype(arr.dtype.newbyteorder('<'))"
        )));
    }
    let (kind, size) = (descr.kind(), descr.itemsize());
    let natural = match (kind, size) {
        (b'b', 1) => Some(DType::Bool),
        (b'i', 1) => Some(DType::Int8),
        (b'i', 2) => Some(DType::Int16),
        (b'i', 4) => Some(DType::Int32),
        (b'i', 8) => Some(DType::Int64),
        (b'u', 1) => Some(DType::UInt8),
        (b'u', 2) => Some(DType::UInt16),
        (b'u', 4) => Some(DType::UInt32),
        (b'u', 8) => Some(DType::UInt64),
        (b'f', 2) => Some(DType::Float16),
        (b'f', 4) => Some(DType::Float32),
        (b'f', 8) => Some(DType::Float64),
        _ => None,
    };
    match over {
        None => natural.ok_or_else(|| {
            PyTypeError::new_err(format!(
                "tensor {index}: dtype {} is not supported (expected bool, int8-64, uint8-64, float16/32/64 or bfloat16)",
                descr.str().map(|s| s.to_string()).unwrap_or_default()
            ))
        }),
        Some(name) => {
            let d = DType::from_name(name)
                .ok_or_else(|| PyValueError::new_err(format!("tensor {index}: unknown dtype name {name:?}")))?;
            if d.itemsize() != size as u64 || !matches!(kind, b'i' | b'u' | b'f' | b'b') {
                return Err(PyValueError::new_err(format!(
                    "tensor {index}: cannot send an array of {size}-byte items as {name}"
                )));
            }
            Ok(d)
        }
    }
}

/// Borrowed views of a list of numpy arrays, ready to encode.
struct Outgoing {
    dtypes: Vec<DType>,
    shapes: Vec<Vec<u64>>,
    ptrs: Vec<(usize, usize)>,
}

impl Outgoing {
    fn collect(
        arrays: &[Bound<'_, PyAny>],
        dtypes: Option<Vec<Option<String>>>,
    ) -> PyResult<Outgoing> {
        if let Some(d) = &dtypes {
            if d.len() != arrays.len() {
                return Err(PyValueError::new_err(format!(
                    "dtypes has {} entries for {} arrays",
                    d.len(),
                    arrays.len()
                )));
            }
        }
        let mut out = Outgoing {
            dtypes: Vec::with_capacity(arrays.len()),
            shapes: Vec::with_capacity(arrays.len()),
            ptrs: Vec::with_capacity(arrays.len()),
        };
        for (i, a) in arrays.iter().enumerate() {
            let arr = a.cast::<PyUntypedArray>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "tensor {i}: expected a numpy.ndarray, got {}",
                    a.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))
            })?;
            if !arr.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "tensor {i}: array is not C-contiguous (use numpy.ascontiguousarray)"
                )));
            }
            let over = dtypes.as_ref().and_then(|d| d[i].clone());
            let dt = wire_dtype(&arr.dtype(), i, over.as_deref())?;
            let shape: Vec<u64> = arr.shape().iter().map(|&d| d as u64).collect();
            let nbytes = arr.len() * arr.dtype().itemsize();
            // SAFETY: `as_array_ptr` points at a live PyArrayObject (we hold a reference to it
            // for as long as `Outgoing` is used); its `data` field is the array's buffer.
            let data = unsafe { (*arr.as_array_ptr()).fields.data } as usize;
            out.dtypes.push(dt);
            out.shapes.push(shape);
            out.ptrs.push((data, nbytes));
        }
        Ok(out)
    }

    fn refs(&self) -> Vec<TensorRef<'_>> {
        (0..self.dtypes.len())
            .map(|i| {
                let (ptr, n) = self.ptrs[i];
                let data: &[u8] = if n == 0 {
                    &[]
                } else {
                    // SAFETY: (ptr, n) is the C-contiguous buffer of an ndarray that the caller
                    // keeps referenced while these slices live. Another Python thread could
                    // write to it concurrently (as with any numpy C routine that releases the
                    // GIL); that is a data race in the user's program, not a memory-safety hole
                    // here: we only read bytes.
                    unsafe { std::slice::from_raw_parts(ptr as *const u8, n) }
                };
                TensorRef {
                    dtype: self.dtypes[i],
                    shape: &self.shapes[i],
                    data,
                }
            })
            .collect()
    }
}

/// A numpy array of `dtype` and `shape` viewing `data`, holding `base` alive.
///
/// # Safety
/// `data` must be 64-byte aligned (any address if the array is empty) and valid for reads
/// and writes of the array's size for as long as `base` lives.
unsafe fn view_array<'py>(
    base: &Bound<'py, PyAny>,
    data: *mut u8,
    dtype: DType,
    shape: &[u64],
) -> PyResult<Bound<'py, PyAny>> {
    let py = base.py();
    let descr = match dtype {
        DType::Bool => numpy::dtype::<bool>(py),
        DType::Int8 => numpy::dtype::<i8>(py),
        DType::Int16 => numpy::dtype::<i16>(py),
        DType::Int32 => numpy::dtype::<i32>(py),
        DType::Int64 => numpy::dtype::<i64>(py),
        DType::UInt8 => numpy::dtype::<u8>(py),
        DType::UInt16 | DType::BFloat16 => numpy::dtype::<u16>(py),
        DType::UInt32 => numpy::dtype::<u32>(py),
        DType::UInt64 => numpy::dtype::<u64>(py),
        DType::Float16 => PyArrayDescr::new(py, "float16")?,
        DType::Float32 => numpy::dtype::<f32>(py),
        DType::Float64 => numpy::dtype::<f64>(py),
    };
    let mut dims: Vec<npy_intp> = shape
        .iter()
        .map(|&d| npy_intp::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| PyValueError::new_err("dimension too large for this platform"))?;
    // SAFETY: a valid descriptor (its reference is stolen), dims of length ndim, NULL strides
    // (numpy computes C order) and, by the caller's contract, an aligned data pointer valid
    // for the array's size. The array does not own the data; SetBaseObject makes it hold a
    // reference to `base`, which keeps the memory alive.
    unsafe {
        let ptr = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type),
            descr.into_dtype_ptr(),
            dims.len() as std::os::raw::c_int,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            data as *mut c_void,
            NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_WRITEABLE,
            std::ptr::null_mut(),
        );
        let arr = Bound::from_owned_ptr_or_err(py, ptr)?;
        let owner = base.clone().unbind().into_ptr();
        if PY_ARRAY_API.PyArray_SetBaseObject(py, arr.as_ptr() as *mut npyffi::PyArrayObject, owner)
            < 0
        {
            return Err(PyErr::fetch(py));
        }
        Ok(arr)
    }
}

/// A received message. Its arrays are numpy views of the received buffer, which lives as
/// long as any of them (each array's `base` is this object).
#[pyclass(module = "sensai._core", name = "Message", frozen)]
pub struct PyMessage {
    msg: Message,
    /// Start of the frame bytes, taken once so numpy may write through its views without
    /// Rust ever holding a reference to the bytes at the same time.
    data: SendPtr,
}

struct SendPtr(*mut u8);
// SAFETY: the pointer is only dereferenced by numpy through views whose base keeps the
// owning PyMessage alive; the buffer itself is plain heap memory usable from any thread.
unsafe impl Send for SendPtr {}
// SAFETY: as above; Rust code never reads or writes through the pointer.
unsafe impl Sync for SendPtr {}

impl PyMessage {
    fn new(mut msg: Message) -> PyMessage {
        let data = SendPtr(msg.bytes_mut_ptr());
        PyMessage { msg, data }
    }
}

#[pymethods]
impl PyMessage {
    /// "request", "response", "error" or "control".
    #[getter]
    fn kind(&self) -> &'static str {
        self.msg.meta().kind.name()
    }
    #[getter]
    fn request_id(&self) -> u64 {
        self.msg.meta().request_id
    }
    #[getter]
    fn slot(&self) -> u32 {
        self.msg.meta().slot
    }
    /// The 32-bit application tag of the header.
    #[getter]
    fn tag(&self) -> u32 {
        self.msg.meta().app_tag
    }
    /// The 64-bit application value of the header.
    #[getter]
    fn value(&self) -> u64 {
        self.msg.meta().app_value
    }
    /// Whether the sender passed a list (rather than one array).
    #[getter]
    fn is_list(&self) -> bool {
        self.msg.meta().flags & FLAG_LIST != 0
    }
    /// Wire dtype names, one per tensor ("bfloat16" arrives as uint16 arrays).
    #[getter]
    fn dtypes(&self) -> Vec<&'static str> {
        self.msg
            .decoded()
            .tensors
            .iter()
            .map(|t| t.dtype.name())
            .collect()
    }
    /// Whether any tensor is bfloat16 (delivered as uint16 words).
    #[getter]
    fn has_bfloat16(&self) -> bool {
        self.msg
            .decoded()
            .tensors
            .iter()
            .any(|t| t.dtype == DType::BFloat16)
    }
    /// Total frame size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.msg.bytes().len()
    }
    fn __len__(&self) -> usize {
        self.msg.decoded().tensors.len()
    }
    fn __repr__(&self) -> String {
        let m = self.msg.meta();
        format!(
            "Message(kind={:?}, request_id={}, slot={}, tag={}, value={}, tensors={:?})",
            m.kind.name(),
            m.request_id,
            m.slot,
            m.app_tag,
            m.app_value,
            self.msg
                .decoded()
                .tensors
                .iter()
                .map(|t| format!("{}{:?}", t.dtype.name(), t.shape))
                .collect::<Vec<_>>()
        )
    }

    /// The tensors as numpy arrays viewing the message buffer (no copy).
    fn arrays<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        let this = slf.get();
        let list = PyList::empty(py);
        for t in &this.msg.decoded().tensors {
            // SAFETY: offset + nbytes <= frame length was checked by the decoder, so the
            // pointer stays inside the buffer owned by `this`, which `slf` (the base) keeps
            // alive; the buffer and the offsets are 64-byte aligned.
            let arr = unsafe {
                view_array(
                    slf.as_any(),
                    this.data.0.add(t.offset as usize),
                    t.dtype,
                    &t.shape,
                )?
            };
            list.append(arr)?;
        }
        Ok(list)
    }
}

/// The header fields a caller chooses for an outgoing message.
fn header(kind: Kind, is_list: bool, tag: u32, value: u64) -> Meta {
    Meta {
        kind,
        flags: if is_list { FLAG_LIST } else { 0 },
        request_id: 0,
        slot: 0,
        app_tag: tag,
        app_value: value,
    }
}

fn kind_arg(kind: &str) -> PyResult<Kind> {
    match kind {
        "request" => Ok(Kind::Request),
        "response" => Ok(Kind::Response),
        "control" => Ok(Kind::Control),
        other => Err(PyValueError::new_err(format!(
            "kind must be 'request', 'response' or 'control', got {other:?}"
        ))),
    }
}

/// The exception `class` of `sensai.errors` with the text `msg`.
fn sensai_error(py: Python<'_>, class: &str, msg: &str) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = py.import("sensai.errors")?.getattr(class)?;
        Ok(PyErr::from_value(cls.call1((msg,))?))
    };
    build().unwrap_or_else(|err| err)
}

/// Lock a mutex whose holder may have panicked: the data it guards (an endpoint, or who
/// holds it) stays valid to use, a panic inside an endpoint call already became Python's
/// `PanicException`.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The call that holds an endpoint, named in the error a second caller gets.
#[derive(Clone, Copy)]
struct Holder {
    thread: ThreadId,
    method: &'static str,
    /// The call may block for as long as its timeout (`wait_any`, a client's `recv`): a second
    /// caller gets `BusyError` at once rather than wait for it.
    blocking: bool,
}

/// What an endpoint does when it is closed.
trait Close {
    fn close_now(&mut self);
}

/// An endpoint that Python threads share. Calls take turns: one holds the endpoint at a time,
/// a second caller waits (with the GIL released) for a short call to finish and gets
/// `BusyError` while the holder is in a blocking one. `close()` and the properties never
/// wait: `close()` sets `closing`, which ends the holder's wait at its next interrupt check
/// (at most `INTERRUPT_CHECK`), and the endpoint is closed by whichever of the two comes last.
struct Shared<T: Close> {
    core: Mutex<Option<T>>,
    holder: Mutex<Option<Holder>>,
    released: Condvar,
    closing: AtomicBool,
    class: &'static str,
    path: String,
    /// The process that opened the endpoint; any other (a forked child) gets `ForkError`.
    owner: Owner,
}

/// One call's hold on a [`Shared`] endpoint; released (and the endpoint closed, if `close()`
/// was called meanwhile) when dropped.
struct Held<'a, T: Close> {
    shared: &'a Shared<T>,
    core: MutexGuard<'a, Option<T>>,
}

impl<T: Close> Held<'_, T> {
    /// The endpoint, or `ClosedError`.
    fn get(&mut self) -> PyResult<&mut T> {
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
    fn new(core: T, class: &'static str, path: String) -> Shared<T> {
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

    fn closed(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// `ClosedError` once `close()` was called.
    fn check_open(&self, py: Python<'_>) -> PyResult<()> {
        if self.closed() {
            return Err(to_pyerr(py, Error::Closed));
        }
        Ok(())
    }

    /// Wait (call it without the GIL) until no call holds the endpoint, and return the lock on
    /// its holder, or return at once the holder for which `give_up` is true.
    fn wait_for_holder(
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
    fn hold(&self, py: Python<'_>, method: &'static str, blocking: bool) -> PyResult<Held<'_, T>> {
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
    fn close(&self, py: Python<'_>) {
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
    fn detached<R: Send>(
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

enum ServerImpl {
    Stream(Box<dyn ServerEndpoint>),
    Shm(ShmServer),
}

impl Close for ServerImpl {
    fn close_now(&mut self) {
        match self {
            ServerImpl::Stream(s) => s.close(),
            ServerImpl::Shm(s) => s.close(),
        }
    }
}

impl ServerImpl {
    fn endpoint(&mut self) -> &mut dyn ServerEndpoint {
        match self {
            ServerImpl::Stream(s) => s.as_mut(),
            ServerImpl::Shm(s) => s,
        }
    }
}

/// The server side of a transport (Unix socket, named pipes or shared memory). Shared by
/// threads as [`Shared`] says.
#[pyclass(module = "sensai._core", name = "ServerEndpoint", frozen)]
pub struct PyServer {
    shared: Shared<ServerImpl>,
    kind: &'static str,
    num_slots: usize,
    limits: Limits,
}

impl PyServer {
    fn new(s: ServerImpl, kind: &'static str, path: String) -> PyServer {
        let mut s = s;
        let (num_slots, limits) = {
            let e = s.endpoint();
            (e.num_slots(), *e.limits())
        };
        PyServer {
            shared: Shared::new(s, "ServerEndpoint", path),
            kind,
            num_slots,
            limits,
        }
    }

    /// A slot id from Python, checked against this server's slots: a negative one is out of
    /// range like one past the last slot (the same `ValueError`), not an `OverflowError`.
    fn slot_arg(&self, py: Python<'_>, slot_id: i64) -> PyResult<usize> {
        self.shared.check_open(py)?;
        let n = self.num_slots;
        match usize::try_from(slot_id) {
            Ok(s) if s < n => Ok(s),
            _ => Err(to_pyerr(
                py,
                slot_out_of_range(slot_id, Some(n), std::path::Path::new(&self.shared.path)),
            )),
        }
    }
}

fn shm_of<'a>(kind: &str, s: &'a mut ServerImpl) -> PyResult<&'a mut ShmServer> {
    match s {
        ServerImpl::Shm(s) => Ok(s),
        ServerImpl::Stream(_) => Err(Python::attach(|py| {
            to_pyerr(
                py,
                Error::Role(format!(
                    "reserve/publish writes in place into shared memory; this is a {kind} server"
                )),
            )
        })),
    }
}

/// A response buffer reserved in shared memory: fill its arrays in place, then publish it
/// with `ServerEndpoint.publish`.
#[pyclass(module = "sensai._core", name = "Reservation", frozen)]
pub struct PyReservation {
    inner: std::sync::Mutex<Option<Reservation>>,
    /// Keeps the mapping alive for views that outlive the reservation.
    _guard: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    ptrs: Vec<SendPtr>,
    dtypes: Vec<DType>,
    shapes: Vec<Vec<u64>>,
    slot: usize,
}

#[pymethods]
impl PyReservation {
    #[getter]
    fn slot(&self) -> usize {
        self.slot
    }

    /// Whether it was published or cancelled.
    #[getter]
    fn done(&self) -> bool {
        self.inner.lock().map(|g| g.is_none()).unwrap_or(true)
    }

    /// Writable numpy views of the reserved tensors (bfloat16 ones as uint16).
    fn arrays<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        let this = slf.get();
        let list = PyList::empty(py);
        for i in 0..this.dtypes.len() {
            // SAFETY: the pointer and shape come from the reservation's layout (64-byte
            // aligned, inside the mapping); `_guard` keeps the mapping alive as long as `slf`,
            // the views' base, lives.
            let arr = unsafe {
                view_array(
                    slf.as_any(),
                    this.ptrs[i].0,
                    this.dtypes[i],
                    &this.shapes[i],
                )?
            };
            list.append(arr)?;
        }
        Ok(list)
    }

    /// Drop the reservation without sending anything.
    fn cancel(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.take();
        }
    }
}

#[pymethods]
impl PyServer {
    /// Listen on a Unix socket at `path`.
    #[staticmethod]
    #[pyo3(signature = (path, num_slots, max_nbytes = 268435456, max_tensors = 8, max_dims = 8))]
    fn unix_socket(
        py: Python<'_>,
        path: String,
        num_slots: usize,
        max_nbytes: u64,
        max_tensors: u32,
        max_dims: u32,
    ) -> PyResult<PyServer> {
        let limits = limits_arg(max_nbytes, max_tensors, max_dims)?;
        let p = path.clone();
        let s = py
            .detach(|| UdsServer::bind(&p, num_slots, limits))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(PyServer::new(
            ServerImpl::Stream(Box::new(s)),
            "unix_socket",
            path,
        ))
    }

    /// Serve through named pipes in the directory `path`.
    #[staticmethod]
    #[pyo3(signature = (path, num_slots, max_nbytes = 268435456, max_tensors = 8, max_dims = 8))]
    fn named_pipe(
        py: Python<'_>,
        path: String,
        num_slots: usize,
        max_nbytes: u64,
        max_tensors: u32,
        max_dims: u32,
    ) -> PyResult<PyServer> {
        let limits = limits_arg(max_nbytes, max_tensors, max_dims)?;
        let p = path.clone();
        let s = py
            .detach(|| FifoServer::bind(&p, num_slots, limits))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(PyServer::new(
            ServerImpl::Stream(Box::new(s)),
            "named_pipe",
            path,
        ))
    }

    /// Serve through a shared-memory file at `path` (a bare name goes under /dev/shm),
    /// with a ring of `ring_depth` buffers per slot and direction.
    #[staticmethod]
    #[pyo3(signature = (path, num_slots, max_nbytes = 268435456, max_tensors = 8, max_dims = 8, ring_depth = 2))]
    fn shared_memory(
        py: Python<'_>,
        path: String,
        num_slots: usize,
        max_nbytes: u64,
        max_tensors: u32,
        max_dims: u32,
        ring_depth: usize,
    ) -> PyResult<PyServer> {
        let limits = limits_arg(max_nbytes, max_tensors, max_dims)?;
        let p = path.clone();
        let s = py
            .detach(|| ShmServer::create(&p, num_slots, limits, ring_depth))
            .map_err(|e| to_pyerr(py, e))?;
        let path = crate::transport::shm::resolve_path(std::path::Path::new(&path))
            .display()
            .to_string();
        Ok(PyServer::new(ServerImpl::Shm(s), "shared_memory", path))
    }

    /// Reserve a response buffer on `slot_id` for tensors of the given `(dtype, shape)`
    /// (shared memory only). Fill `Reservation.arrays()` in place, then `publish` it.
    #[pyo3(signature = (slot_id, specs, is_list = false, tag = 0, value = 0))]
    fn reserve(
        &self,
        py: Python<'_>,
        slot_id: i64,
        specs: Vec<(String, Vec<u64>)>,
        is_list: bool,
        tag: u32,
        value: u64,
    ) -> PyResult<PyReservation> {
        let mut dtypes = Vec::with_capacity(specs.len());
        for (i, (name, _)) in specs.iter().enumerate() {
            dtypes.push(DType::from_name(name).ok_or_else(|| {
                PyValueError::new_err(format!("tensor {i}: unknown dtype name {name:?}"))
            })?);
        }
        let shapes: Vec<Vec<u64>> = specs.into_iter().map(|(_, s)| s).collect();
        let tspecs: Vec<TensorSpec<'_>> = dtypes
            .iter()
            .zip(&shapes)
            .map(|(d, s)| TensorSpec {
                dtype: *d,
                shape: s,
            })
            .collect();
        let meta = header(Kind::Response, is_list, tag, value);
        let slot_id = self.slot_arg(py, slot_id)?;
        let mut held = self.shared.hold(py, "reserve", false)?;
        let shm = shm_of(self.kind, held.get()?)?;
        let r = py
            .detach(|| shm.reserve(slot_id, meta, &tspecs))
            .map_err(|e| to_pyerr(py, e))?;
        drop(held);
        let ptrs = (0..r.num_tensors())
            .map(|i| {
                SendPtr(
                    r.tensor_raw(i)
                        .map(|(p, _)| p)
                        .unwrap_or(std::ptr::null_mut()),
                )
            })
            .collect();
        let guard = r.mapping_guard();
        Ok(PyReservation {
            inner: std::sync::Mutex::new(Some(r)),
            _guard: guard,
            ptrs,
            dtypes,
            shapes,
            slot: slot_id,
        })
    }

    /// Send a filled reservation to its client.
    fn publish(&self, py: Python<'_>, reservation: &Bound<'_, PyReservation>) -> PyResult<()> {
        let mut held = self.shared.hold(py, "publish", false)?;
        let shm = shm_of(self.kind, held.get()?)?;
        let r = reservation
            .get()
            .inner
            .lock()
            .map_err(|_| PyValueError::new_err("reservation lock poisoned"))?
            .take()
            .ok_or_else(|| {
                PyValueError::new_err("this reservation was already published or cancelled")
            })?;
        py.detach(|| shm.publish(r)).map_err(|e| to_pyerr(py, e))
    }

    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }
    #[getter]
    fn path(&self) -> String {
        self.shared.path.clone()
    }
    #[getter]
    fn num_slots(&self, py: Python<'_>) -> PyResult<usize> {
        self.shared.check_open(py)?;
        Ok(self.num_slots)
    }
    /// `(max_tensors, max_dims, max_nbytes)`.
    #[getter]
    fn limits(&self, py: Python<'_>) -> PyResult<(u32, u32, u64)> {
        self.shared.check_open(py)?;
        let l = self.limits;
        Ok((l.max_tensors, l.max_dims, l.max_payload_bytes))
    }
    #[getter]
    fn closed(&self) -> bool {
        self.shared.closed()
    }

    /// Block until requests are pending; returns their slots. `timeout=0` polls.
    #[pyo3(signature = (timeout = None))]
    fn wait_any(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<usize>> {
        let t = timeout_arg(timeout, "timeout")?;
        let mut held = self.shared.hold(py, "wait_any", true)?;
        let inner = held.get()?.endpoint();
        self.shared
            .detached(py, "wait_any", |check| inner.wait_any(t, check))
    }

    fn is_ready_slot(&self, py: Python<'_>, slot_id: i64) -> PyResult<bool> {
        let slot_id = self.slot_arg(py, slot_id)?;
        let mut held = self.shared.hold(py, "is_ready_slot", false)?;
        let inner = held.get()?.endpoint();
        py.detach(|| inner.is_ready_slot(slot_id))
            .map_err(|e| to_pyerr(py, e))
    }

    fn is_connected(&self, py: Python<'_>, slot_id: i64) -> PyResult<bool> {
        let slot_id = self.slot_arg(py, slot_id)?;
        let mut held = self.shared.hold(py, "is_connected", false)?;
        Ok(held.get()?.endpoint().is_connected(slot_id))
    }

    /// Reports of faults the server found and repaired on its own since the last call (a
    /// corrupt shared-memory slot reset), oldest first; the Python endpoint logs them.
    fn notices(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let mut held = self.shared.hold(py, "notices", false)?;
        Ok(held.get()?.endpoint().take_notices())
    }

    /// The next request on `slot_id`, or None.
    fn recv(&self, py: Python<'_>, slot_id: i64) -> PyResult<Option<PyMessage>> {
        let slot_id = self.slot_arg(py, slot_id)?;
        let mut held = self.shared.hold(py, "recv", false)?;
        let inner = held.get()?.endpoint();
        let m = py
            .detach(|| inner.recv(slot_id))
            .map_err(|e| to_pyerr(py, e))?;
        Ok(m.map(PyMessage::new))
    }

    /// Answer the oldest unanswered request of `slot_id`.
    #[pyo3(signature = (slot_id, arrays, dtypes = None, is_list = false, tag = 0, value = 0, kind = "response"))]
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        py: Python<'_>,
        slot_id: i64,
        arrays: Vec<Bound<'_, PyAny>>,
        dtypes: Option<Vec<Option<String>>>,
        is_list: bool,
        tag: u32,
        value: u64,
        kind: &str,
    ) -> PyResult<()> {
        let kind = kind_arg(kind)?;
        let out = Outgoing::collect(&arrays, dtypes)?;
        let meta = header(kind, is_list, tag, value);
        let slot_id = self.slot_arg(py, slot_id)?;
        let mut held = self.shared.hold(py, "send", false)?;
        let inner = held.get()?.endpoint();
        py.detach(|| inner.send(slot_id, meta, &out.refs()))
            .map_err(|e| to_pyerr(py, e))
    }

    /// Answer the oldest unanswered request of `slot_id` with an error frame.
    fn send_error(&self, py: Python<'_>, slot_id: i64, code: u32, message: &str) -> PyResult<()> {
        let slot_id = self.slot_arg(py, slot_id)?;
        let mut held = self.shared.hold(py, "send_error", false)?;
        let inner = held.get()?.endpoint();
        py.detach(|| inner.send_error(slot_id, code, message))
            .map_err(|e| to_pyerr(py, e))
    }

    /// Stop serving and remove the transport's files. Idempotent; callable from any thread.
    fn close(&self, py: Python<'_>) {
        self.shared.close(py);
    }

    fn __repr__(&self) -> String {
        format!(
            "ServerEndpoint(kind={:?}, path={:?}, closed={})",
            self.kind,
            self.shared.path,
            self.shared.closed()
        )
    }
}

impl Close for Box<dyn ClientEndpoint> {
    fn close_now(&mut self) {
        self.close();
    }
}

/// The client side of a transport, bound to one slot. Shared by threads as [`Shared`] says.
#[pyclass(module = "sensai._core", name = "ClientEndpoint", frozen)]
pub struct PyClient {
    shared: Shared<Box<dyn ClientEndpoint>>,
    kind: &'static str,
    slot: usize,
    limits: Limits,
}

impl PyClient {
    fn new(c: Box<dyn ClientEndpoint>, kind: &'static str, path: String) -> PyClient {
        let (slot, limits) = (c.slot(), *c.limits());
        PyClient {
            shared: Shared::new(c, "ClientEndpoint", path),
            kind,
            slot,
            limits,
        }
    }
}

#[pymethods]
impl PyClient {
    /// Connect to a Unix-socket server and claim `slot_id` (None: any free slot).
    #[staticmethod]
    #[pyo3(signature = (path, slot_id = None, connect_timeout = Some(30.0)))]
    fn unix_socket(
        py: Python<'_>,
        path: String,
        slot_id: Option<i64>,
        connect_timeout: Option<f64>,
    ) -> PyResult<PyClient> {
        let t = timeout_arg(connect_timeout, "connect_timeout")?;
        let slot_id = client_slot_arg(py, slot_id, &path)?;
        let p = path.clone();
        let c = detached(py, |check| UdsClient::connect(&p, slot_id, t, check))?;
        Ok(PyClient::new(Box::new(c), "unix_socket", path))
    }

    /// Lease `slot_id` (None: any free slot) of a named-pipe server.
    #[staticmethod]
    #[pyo3(signature = (path, slot_id = None, connect_timeout = Some(30.0)))]
    fn named_pipe(
        py: Python<'_>,
        path: String,
        slot_id: Option<i64>,
        connect_timeout: Option<f64>,
    ) -> PyResult<PyClient> {
        let t = timeout_arg(connect_timeout, "connect_timeout")?;
        let slot_id = client_slot_arg(py, slot_id, &path)?;
        let p = path.clone();
        let c = detached(py, |check| FifoClient::connect(&p, slot_id, t, check))?;
        Ok(PyClient::new(Box::new(c), "named_pipe", path))
    }

    /// Attach to a shared-memory server and lease `slot_id` (None: any free slot).
    #[staticmethod]
    #[pyo3(signature = (path, slot_id = None, connect_timeout = Some(30.0)))]
    fn shared_memory(
        py: Python<'_>,
        path: String,
        slot_id: Option<i64>,
        connect_timeout: Option<f64>,
    ) -> PyResult<PyClient> {
        let t = timeout_arg(connect_timeout, "connect_timeout")?;
        let slot_id = client_slot_arg(py, slot_id, &path)?;
        let p = path.clone();
        let c = detached(py, |check| ShmClient::attach(&p, slot_id, t, check))?;
        let path = crate::transport::shm::resolve_path(std::path::Path::new(&path))
            .display()
            .to_string();
        Ok(PyClient::new(Box::new(c), "shared_memory", path))
    }

    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }
    #[getter]
    fn path(&self) -> String {
        self.shared.path.clone()
    }
    #[getter]
    fn slot_id(&self) -> usize {
        self.slot
    }
    /// The server's `(max_tensors, max_dims, max_nbytes)`.
    #[getter]
    fn limits(&self, py: Python<'_>) -> PyResult<(u32, u32, u64)> {
        self.shared.check_open(py)?;
        let l = self.limits;
        Ok((l.max_tensors, l.max_dims, l.max_payload_bytes))
    }
    #[getter]
    fn closed(&self) -> bool {
        self.shared.closed()
    }

    /// Send a request; returns its request id.
    #[pyo3(signature = (arrays, dtypes = None, is_list = false, tag = 0, value = 0, kind = "request", timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        py: Python<'_>,
        arrays: Vec<Bound<'_, PyAny>>,
        dtypes: Option<Vec<Option<String>>>,
        is_list: bool,
        tag: u32,
        value: u64,
        kind: &str,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        let kind = kind_arg(kind)?;
        let t = timeout_arg(timeout, "timeout")?;
        let out = Outgoing::collect(&arrays, dtypes)?;
        let meta = header(kind, is_list, tag, value);
        let mut held = self.shared.hold(py, "send", true)?;
        let inner = held.get()?;
        self.shared
            .detached(py, "send", |check| inner.send(meta, &out.refs(), t, check))
    }

    fn is_ready(&self, py: Python<'_>) -> PyResult<bool> {
        let mut held = self.shared.hold(py, "is_ready", false)?;
        let inner = held.get()?;
        py.detach(|| inner.is_ready()).map_err(|e| to_pyerr(py, e))
    }

    /// Receive the response to the oldest outstanding request.
    #[pyo3(signature = (timeout = None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyMessage> {
        let t = timeout_arg(timeout, "timeout")?;
        let mut held = self.shared.hold(py, "recv", true)?;
        let inner = held.get()?;
        self.shared
            .detached(py, "recv", |check| inner.recv(t, check))
            .map(PyMessage::new)
    }

    /// Send a request and wait for its response (the timeout covers both).
    #[pyo3(signature = (arrays, dtypes = None, is_list = false, tag = 0, value = 0, kind = "request", timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        py: Python<'_>,
        arrays: Vec<Bound<'_, PyAny>>,
        dtypes: Option<Vec<Option<String>>>,
        is_list: bool,
        tag: u32,
        value: u64,
        kind: &str,
        timeout: Option<f64>,
    ) -> PyResult<PyMessage> {
        let kind = kind_arg(kind)?;
        let t = timeout_arg(timeout, "timeout")?;
        let out = Outgoing::collect(&arrays, dtypes)?;
        let meta = header(kind, is_list, tag, value);
        let mut held = self.shared.hold(py, "request", true)?;
        let inner = held.get()?;
        self.shared
            .detached(py, "request", |check| {
                let deadline = crate::transport::Deadline::after(t);
                let id = inner.send(meta, &out.refs(), deadline.remaining(), check)?;
                inner.recv_for(id, deadline.remaining(), check)
            })
            .map(PyMessage::new)
    }

    /// Whether the server is still there, as far as can be told without blocking (False
    /// once closed). A client whose server is gone must be replaced by a new connection.
    fn server_alive(&self, py: Python<'_>) -> PyResult<bool> {
        if self.shared.closed() {
            return Ok(false);
        }
        let mut held = self.shared.hold(py, "server_alive", false)?;
        Ok(match held.core.as_mut() {
            Some(c) => py.detach(|| c.server_alive()),
            None => false,
        })
    }

    /// Release the slot and the connection. Idempotent; callable from any thread.
    fn close(&self, py: Python<'_>) {
        self.shared.close(py);
    }

    fn __repr__(&self) -> String {
        format!(
            "ClientEndpoint(kind={:?}, path={:?}, slot_id={}, closed={})",
            self.kind,
            self.shared.path,
            self.slot,
            self.shared.closed()
        )
    }
}

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
