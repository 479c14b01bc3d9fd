//! Conversions between Python arguments (numpy arrays, dtype names, timeouts, slot ids)
//! and the crate's types.

use std::ffi::c_void;
use std::time::Duration;

use numpy::npyffi::{
    self, npy_intp, NPY_ARRAY_ALIGNED, NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_WRITEABLE, PY_ARRAY_API,
};
use numpy::prelude::*;
use numpy::{PyArrayDescr, PyUntypedArray};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::frame::{DType, Kind, Limits, Meta, TensorRef, FLAG_LIST};
use crate::transport::slot_out_of_range;

use super::errors::to_pyerr;

/// The slot a client asks for: a negative id is out of range (the `ValueError` every transport
/// raises for a slot past the server's last one), not an `OverflowError`.
pub(super) fn client_slot_arg(
    py: Python<'_>,
    slot_id: Option<i64>,
    path: &str,
) -> PyResult<Option<usize>> {
    match slot_id {
        None => Ok(None),
        Some(s) => usize::try_from(s)
            .map(Some)
            .map_err(|_| to_pyerr(py, slot_out_of_range(s, None, std::path::Path::new(path)))),
    }
}

pub(super) fn timeout_arg(t: Option<f64>, name: &str) -> PyResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(PyValueError::new_err(format!(
            "{name} must be None or a finite number of seconds >= 0, got {s}"
        ))),
    }
}

pub(super) fn limits_arg(max_nbytes: u64, max_tensors: u32, max_dims: u32) -> PyResult<Limits> {
    Limits::new(max_tensors, max_dims, max_nbytes).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The wire dtype of a numpy array (with an optional override, e.g. "bfloat16" for raw
/// 2-byte words).
pub(super) fn wire_dtype(
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
pub(super) struct Outgoing {
    pub(super) dtypes: Vec<DType>,
    pub(super) shapes: Vec<Vec<u64>>,
    pub(super) ptrs: Vec<(usize, usize)>,
}

impl Outgoing {
    pub(super) fn collect(
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

    pub(super) fn refs(&self) -> Vec<TensorRef<'_>> {
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
pub(super) unsafe fn view_array<'py>(
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

/// The header fields a caller chooses for an outgoing message.
pub(super) fn header(kind: Kind, is_list: bool, tag: u32, value: u64) -> Meta {
    Meta {
        kind,
        flags: if is_list { FLAG_LIST } else { 0 },
        request_id: 0,
        slot: 0,
        app_tag: tag,
        app_value: value,
    }
}

pub(super) fn kind_arg(kind: &str) -> PyResult<Kind> {
    match kind {
        "request" => Ok(Kind::Request),
        "response" => Ok(Kind::Response),
        "control" => Ok(Kind::Control),
        other => Err(PyValueError::new_err(format!(
            "kind must be 'request', 'response' or 'control', got {other:?}"
        ))),
    }
}
