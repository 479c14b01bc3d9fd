//! The Python classes: Message, ServerEndpoint, Reservation, ClientEndpoint.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::error::Error;
use crate::frame::{DType, Kind, Limits, TensorSpec, FLAG_LIST};
use crate::transport::fifo::{FifoClient, FifoServer};
use crate::transport::shm::{Reservation, ShmClient, ShmServer};
use crate::transport::uds::{UdsClient, UdsServer};
use crate::transport::{slot_out_of_range, ClientEndpoint, Interrupt, Message, ServerEndpoint};

use super::convert::{
    client_slot_arg, header, kind_arg, limits_arg, timeout_arg, view_array, Outgoing,
};
use super::errors::to_pyerr;
use super::holder::{detached, Close, Shared};

/// A received message. Its arrays are numpy views of the received buffer, which lives as
/// long as any of them (each array's `base` is this object).
#[pyclass(module = "sensai._core", name = "Message", frozen)]
pub struct PyMessage {
    pub(super) msg: Message,
    /// Start of the frame bytes, taken once so numpy may write through its views without
    /// Rust ever holding a reference to the bytes at the same time.
    pub(super) data: SendPtr,
}

pub(super) struct SendPtr(*mut u8);
// SAFETY: the pointer is only dereferenced by numpy through views whose base keeps the
// owning PyMessage alive; the buffer itself is plain heap memory usable from any thread.
unsafe impl Send for SendPtr {}
// SAFETY: as above; Rust code never reads or writes through the pointer.
unsafe impl Sync for SendPtr {}

impl PyMessage {
    pub(super) fn new(mut msg: Message) -> PyMessage {
        let data = SendPtr(msg.bytes_mut_ptr());
        PyMessage { msg, data }
    }
}

#[pymethods]
impl PyMessage {
    /// "request", "response", "error" or "control".
    #[getter]
    pub(super) fn kind(&self) -> &'static str {
        self.msg.meta().kind.name()
    }
    #[getter]
    pub(super) fn request_id(&self) -> u64 {
        self.msg.meta().request_id
    }
    #[getter]
    pub(super) fn slot(&self) -> u32 {
        self.msg.meta().slot
    }
    /// The 32-bit application tag of the header.
    #[getter]
    pub(super) fn tag(&self) -> u32 {
        self.msg.meta().app_tag
    }
    /// The 64-bit application value of the header.
    #[getter]
    pub(super) fn value(&self) -> u64 {
        self.msg.meta().app_value
    }
    /// Whether the sender passed a list (rather than one array).
    #[getter]
    pub(super) fn is_list(&self) -> bool {
        self.msg.meta().flags & FLAG_LIST != 0
    }
    /// Wire dtype names, one per tensor ("bfloat16" arrives as uint16 arrays).
    #[getter]
    pub(super) fn dtypes(&self) -> Vec<&'static str> {
        self.msg
            .decoded()
            .tensors
            .iter()
            .map(|t| t.dtype.name())
            .collect()
    }
    /// Whether any tensor is bfloat16 (delivered as uint16 words).
    #[getter]
    pub(super) fn has_bfloat16(&self) -> bool {
        self.msg
            .decoded()
            .tensors
            .iter()
            .any(|t| t.dtype == DType::BFloat16)
    }
    /// Total frame size in bytes.
    #[getter]
    pub(super) fn nbytes(&self) -> usize {
        self.msg.bytes().len()
    }
    pub(super) fn __len__(&self) -> usize {
        self.msg.decoded().tensors.len()
    }
    pub(super) fn __repr__(&self) -> String {
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
    pub(super) fn arrays<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyList>> {
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

pub(super) enum ServerImpl {
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
    pub(super) fn endpoint(&mut self) -> &mut dyn ServerEndpoint {
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
    pub(super) shared: Shared<ServerImpl>,
    pub(super) kind: &'static str,
    pub(super) num_slots: usize,
    pub(super) limits: Limits,
}

impl PyServer {
    pub(super) fn new(s: ServerImpl, kind: &'static str, path: String) -> PyServer {
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
    pub(super) fn slot_arg(&self, py: Python<'_>, slot_id: i64) -> PyResult<usize> {
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

pub(super) fn shm_of<'a>(kind: &str, s: &'a mut ServerImpl) -> PyResult<&'a mut ShmServer> {
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
    pub(super) inner: std::sync::Mutex<Option<Reservation>>,
    /// Keeps the mapping alive for views that outlive the reservation.
    pub(super) _guard: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    pub(super) ptrs: Vec<SendPtr>,
    pub(super) dtypes: Vec<DType>,
    pub(super) shapes: Vec<Vec<u64>>,
    pub(super) slot: usize,
}

#[pymethods]
impl PyReservation {
    #[getter]
    pub(super) fn slot(&self) -> usize {
        self.slot
    }

    /// Whether it was published or cancelled.
    #[getter]
    pub(super) fn done(&self) -> bool {
        self.inner.lock().map(|g| g.is_none()).unwrap_or(true)
    }

    /// Writable numpy views of the reserved tensors (bfloat16 ones as uint16).
    pub(super) fn arrays<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyList>> {
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
    pub(super) fn cancel(&self) {
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
    pub(super) fn unix_socket(
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
    pub(super) fn named_pipe(
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
    pub(super) fn shared_memory(
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
    pub(super) fn reserve(
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
    pub(super) fn publish(
        &self,
        py: Python<'_>,
        reservation: &Bound<'_, PyReservation>,
    ) -> PyResult<()> {
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
    pub(super) fn kind(&self) -> &'static str {
        self.kind
    }
    #[getter]
    pub(super) fn path(&self) -> String {
        self.shared.path.clone()
    }
    #[getter]
    pub(super) fn num_slots(&self, py: Python<'_>) -> PyResult<usize> {
        self.shared.check_open(py)?;
        Ok(self.num_slots)
    }
    /// `(max_tensors, max_dims, max_nbytes)`.
    #[getter]
    pub(super) fn limits(&self, py: Python<'_>) -> PyResult<(u32, u32, u64)> {
        self.shared.check_open(py)?;
        let l = self.limits;
        Ok((l.max_tensors, l.max_dims, l.max_payload_bytes))
    }
    #[getter]
    pub(super) fn closed(&self) -> bool {
        self.shared.closed()
    }

    /// Block until requests are pending; returns their slots. `timeout=0` polls.
    #[pyo3(signature = (timeout = None))]
    pub(super) fn wait_any(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<usize>> {
        let t = timeout_arg(timeout, "timeout")?;
        let mut held = self.shared.hold(py, "wait_any", true)?;
        let inner = held.get()?.endpoint();
        self.shared
            .detached(py, "wait_any", |check| inner.wait_any(t, check))
    }

    pub(super) fn is_ready_slot(&self, py: Python<'_>, slot_id: i64) -> PyResult<bool> {
        let slot_id = self.slot_arg(py, slot_id)?;
        let mut held = self.shared.hold(py, "is_ready_slot", false)?;
        let inner = held.get()?.endpoint();
        py.detach(|| inner.is_ready_slot(slot_id))
            .map_err(|e| to_pyerr(py, e))
    }

    pub(super) fn is_connected(&self, py: Python<'_>, slot_id: i64) -> PyResult<bool> {
        let slot_id = self.slot_arg(py, slot_id)?;
        let mut held = self.shared.hold(py, "is_connected", false)?;
        Ok(held.get()?.endpoint().is_connected(slot_id))
    }

    /// Reports of faults the server found and repaired on its own since the last call (a
    /// corrupt shared-memory slot reset), oldest first; the Python endpoint logs them.
    pub(super) fn notices(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let mut held = self.shared.hold(py, "notices", false)?;
        Ok(held.get()?.endpoint().take_notices())
    }

    /// The next request on `slot_id`, or None.
    pub(super) fn recv(&self, py: Python<'_>, slot_id: i64) -> PyResult<Option<PyMessage>> {
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
    pub(super) fn send(
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
    pub(super) fn send_error(
        &self,
        py: Python<'_>,
        slot_id: i64,
        code: u32,
        message: &str,
    ) -> PyResult<()> {
        let slot_id = self.slot_arg(py, slot_id)?;
        let mut held = self.shared.hold(py, "send_error", false)?;
        let inner = held.get()?.endpoint();
        py.detach(|| inner.send_error(slot_id, code, message))
            .map_err(|e| to_pyerr(py, e))
    }

    /// Stop serving and remove the transport's files. Idempotent; callable from any thread.
    pub(super) fn close(&self, py: Python<'_>) {
        self.shared.close(py);
    }

    pub(super) fn __repr__(&self) -> String {
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
    pub(super) shared: Shared<Box<dyn ClientEndpoint>>,
    pub(super) kind: &'static str,
    pub(super) slot: usize,
    pub(super) limits: Limits,
}

impl PyClient {
    pub(super) fn new(c: Box<dyn ClientEndpoint>, kind: &'static str, path: String) -> PyClient {
        let (slot, limits) = (c.slot(), *c.limits());
        PyClient {
            shared: Shared::new(c, "ClientEndpoint", path),
            kind,
            slot,
            limits,
        }
    }
}

/// Connect a client with the arguments of the Python constructors (checked here), waiting
/// without the GIL.
fn connect_client<C: Send>(
    py: Python<'_>,
    path: &str,
    slot_id: Option<i64>,
    connect_timeout: Option<f64>,
    connect: impl FnOnce(&str, Option<usize>, Option<Duration>, Interrupt<'_>) -> Result<C, Error>
        + Send,
) -> PyResult<C> {
    let t = timeout_arg(connect_timeout, "connect_timeout")?;
    let slot_id = client_slot_arg(py, slot_id, path)?;
    detached(py, |check| connect(path, slot_id, t, check))
}

#[pymethods]
impl PyClient {
    /// Connect to a Unix-socket server and claim `slot_id` (None: any free slot).
    #[staticmethod]
    #[pyo3(signature = (path, slot_id = None, connect_timeout = Some(30.0)))]
    pub(super) fn unix_socket(
        py: Python<'_>,
        path: String,
        slot_id: Option<i64>,
        connect_timeout: Option<f64>,
    ) -> PyResult<PyClient> {
        let c = connect_client(py, &path, slot_id, connect_timeout, |p, s, t, i| {
            UdsClient::connect(p, s, t, i)
        })?;
        Ok(PyClient::new(Box::new(c), "unix_socket", path))
    }

    /// Lease `slot_id` (None: any free slot) of a named-pipe server.
    #[staticmethod]
    #[pyo3(signature = (path, slot_id = None, connect_timeout = Some(30.0)))]
    pub(super) fn named_pipe(
        py: Python<'_>,
        path: String,
        slot_id: Option<i64>,
        connect_timeout: Option<f64>,
    ) -> PyResult<PyClient> {
        let c = connect_client(py, &path, slot_id, connect_timeout, |p, s, t, i| {
            FifoClient::connect(p, s, t, i)
        })?;
        Ok(PyClient::new(Box::new(c), "named_pipe", path))
    }

    /// Attach to a shared-memory server and lease `slot_id` (None: any free slot).
    #[staticmethod]
    #[pyo3(signature = (path, slot_id = None, connect_timeout = Some(30.0)))]
    pub(super) fn shared_memory(
        py: Python<'_>,
        path: String,
        slot_id: Option<i64>,
        connect_timeout: Option<f64>,
    ) -> PyResult<PyClient> {
        let c = connect_client(py, &path, slot_id, connect_timeout, |p, s, t, i| {
            ShmClient::attach(p, s, t, i)
        })?;
        let path = crate::transport::shm::resolve_path(std::path::Path::new(&path))
            .display()
            .to_string();
        Ok(PyClient::new(Box::new(c), "shared_memory", path))
    }

    #[getter]
    pub(super) fn kind(&self) -> &'static str {
        self.kind
    }
    #[getter]
    pub(super) fn path(&self) -> String {
        self.shared.path.clone()
    }
    #[getter]
    pub(super) fn slot_id(&self) -> usize {
        self.slot
    }
    /// The server's `(max_tensors, max_dims, max_nbytes)`.
    #[getter]
    pub(super) fn limits(&self, py: Python<'_>) -> PyResult<(u32, u32, u64)> {
        self.shared.check_open(py)?;
        let l = self.limits;
        Ok((l.max_tensors, l.max_dims, l.max_payload_bytes))
    }
    #[getter]
    pub(super) fn closed(&self) -> bool {
        self.shared.closed()
    }

    /// Send a request; returns its request id.
    #[pyo3(signature = (arrays, dtypes = None, is_list = false, tag = 0, value = 0, kind = "request", timeout = None))]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send(
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

    pub(super) fn is_ready(&self, py: Python<'_>) -> PyResult<bool> {
        let mut held = self.shared.hold(py, "is_ready", false)?;
        let inner = held.get()?;
        py.detach(|| inner.is_ready()).map_err(|e| to_pyerr(py, e))
    }

    /// Receive the response to the oldest outstanding request.
    #[pyo3(signature = (timeout = None))]
    pub(super) fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyMessage> {
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
    pub(super) fn request(
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
    pub(super) fn server_alive(&self, py: Python<'_>) -> PyResult<bool> {
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
    pub(super) fn close(&self, py: Python<'_>) {
        self.shared.close(py);
    }

    pub(super) fn __repr__(&self) -> String {
        format!(
            "ClientEndpoint(kind={:?}, path={:?}, slot_id={}, closed={})",
            self.kind,
            self.shared.path,
            self.slot,
            self.shared.closed()
        )
    }
}
