//! Plain data to Python objects: JSON values (a trace's step, a summary) to dicts, lists and
//! numbers, and columns to pyarrow tables and numpy arrays (both imported when first used).

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use serde_json::Value;

/// A JSON value as Python's `json.loads` would give it (every number exactly as serde_json
/// holds it: an f64 is the same float, an integer the same int).
pub fn value<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(a) => {
            let list = PyList::empty(py);
            for x in a {
                list.append(value(py, x)?)?;
            }
            list.into_any()
        }
        Value::Object(o) => {
            let dict = PyDict::new(py);
            for (k, x) in o {
                dict.set_item(k, value(py, x)?)?;
            }
            dict.into_any()
        }
    })
}

/// A serializable value as Python objects: what Python's `json.loads` reads from the JSON the
/// command line writes for it (a value written at f32 precision reads back as that
/// decimal, as from the file).
pub fn serialized<'py>(py: Python<'py>, v: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let json = serde_json::to_string(v).map_err(|e| {
        crate::errors::raise(
            py,
            crate::errors::Kind::Engine,
            format!("cannot convert a value: {e}"),
        )
    })?;
    py.import("json")?.call_method1("loads", (json,))
}

/// A Parquet file held in memory as a `pyarrow.Table` (the Arrow types kept in its footer).
pub fn parquet_table<'py>(py: Python<'py>, file: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let buffer = py
        .import("pyarrow")?
        .call_method1("BufferReader", (PyBytes::new(py, file),))?;
    py.import("pyarrow.parquet")?
        .call_method1("read_table", (buffer,))
}

/// `pyarrow.Table.from_pylist(rows)`: a table of dicts, columns in their order.
pub fn table_from_rows<'py>(
    py: Python<'py>,
    rows: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyAny>> {
    py.import("pyarrow")?
        .getattr("Table")?
        .call_method1("from_pylist", (rows,))
}

/// A `numpy.float64` array of `values` (writable, owned by numpy).
pub fn float_array<'py>(py: Python<'py>, values: &[f64]) -> PyResult<Bound<'py, PyAny>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let buf = pyo3::types::PyByteArray::new(py, &bytes);
    py.import("numpy")?
        .call_method1("frombuffer", (buf, "float64"))
}
