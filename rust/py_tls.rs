//! The Python binding of TLS (`rust/tls.rs`): contexts made from PEM files, and a connection
//! object the control plane drives over its raw socket (Sans-I/O) until it hands the socket and
//! the connection to the engine. `TlsError` (a `ConnectionError`) is the one exception; a bad
//! certificate or key is a `ValueError` with the reason.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use pyo3::exceptions::{PyConnectionError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::tls::{self, Tls};

pyo3::create_exception!(
    _core,
    TlsError,
    PyConnectionError,
    "The peer's TLS failed (a bad record, an alert, no common version or cipher, a certificate \
     that does not verify): the connection is over."
);

impl From<tls::TlsError> for PyErr {
    fn from(e: tls::TlsError) -> Self {
        PyValueError::new_err(e.0)
    }
}

/// The listener's certificate and key.
#[pyclass(module = "wsgate._core", frozen)]
pub struct TlsServerContext {
    pub(crate) config: Arc<rustls::ServerConfig>,
}

#[pymethods]
impl TlsServerContext {
    #[new]
    fn new(chain_pem: &[u8], key_pem: &[u8]) -> PyResult<Self> {
        Ok(Self {
            config: tls::server_config(chain_pem, key_pem)?,
        })
    }

    /// The server end of a new connection.
    fn accept(&self) -> PyResult<TlsConnection> {
        Ok(TlsConnection::new(Tls::server(&self.config)?))
    }
}

/// The roots bots' certificates are checked against.
#[pyclass(module = "wsgate._core", frozen)]
pub struct TlsClientContext {
    config: Arc<rustls::ClientConfig>,
}

#[pymethods]
impl TlsClientContext {
    #[new]
    #[pyo3(signature = (ca_pem = None))]
    fn new(ca_pem: Option<&[u8]>) -> PyResult<Self> {
        Ok(Self {
            config: tls::client_config(ca_pem)?,
        })
    }

    /// The client end of a new connection to `host`, whose certificate must name it.
    fn connect(&self, host: &str) -> PyResult<TlsConnection> {
        Ok(TlsConnection::new(Tls::client(&self.config, host)?))
    }
}

/// One TLS connection, driven from Python until the engine takes it.
#[pyclass(module = "wsgate._core", frozen)]
pub struct TlsConnection {
    inner: Mutex<Option<Tls>>,
}

impl TlsConnection {
    pub(crate) fn new(tls: Tls) -> Self {
        Self {
            inner: Mutex::new(Some(tls)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Tls>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Tls) -> PyResult<T>) -> PyResult<T> {
        match self.lock().as_mut() {
            Some(tls) => f(tls),
            None => Err(PyValueError::new_err(
                "the connection was handed to the engine",
            )),
        }
    }

    /// Takes the connection for the engine; `None` if it was taken already.
    pub fn take(&self) -> Option<Tls> {
        self.lock().take()
    }
}

#[pymethods]
impl TlsConnection {
    /// Takes bytes read from the socket and returns how many it took (it stops once decrypted
    /// bytes wait: read them, then give the rest again); raises `TlsError` when they end the
    /// connection (its alert, if any, is then in `outgoing()`).
    fn feed(&self, data: &[u8]) -> PyResult<usize> {
        self.with(|t| t.feed(data).map_err(|e| TlsError::new_err(e.0)))
    }

    /// Up to `n` bytes of decrypted data: `b""` once the peer closed, `None` when more bytes
    /// must be fed first.
    fn read<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Option<Bound<'py, PyBytes>>> {
        self.with(|t| {
            let mut buf = vec![0; n.min(1 << 20)];
            match t.read_plain(&mut buf) {
                Ok(k) => Ok(Some(PyBytes::new(py, &buf[..k]))),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Ok(Some(PyBytes::new(py, b"")))
                }
                Err(e) => Err(TlsError::new_err(e.to_string())),
            }
        })
    }

    /// Encrypts `data` for the peer (see `outgoing()`).
    fn write(&self, data: &[u8]) -> PyResult<()> {
        self.with(|t| {
            t.write_plain(data)
                .map(|_| ())
                .map_err(|e| TlsError::new_err(e.to_string()))
        })
    }

    /// Every record waiting to be sent, taken.
    fn outgoing<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        self.with(|t| {
            let mut out = Vec::new();
            while t.wants_write() {
                t.write_tls(&mut out)
                    .map_err(|e| TlsError::new_err(e.to_string()))?;
            }
            Ok(PyBytes::new(py, &out))
        })
    }

    /// Queues a close_notify alert.
    fn close_notify(&self) -> PyResult<()> {
        self.with(|t| {
            t.close_notify();
            Ok(())
        })
    }

    /// Whether the handshake is still going on.
    #[getter]
    fn handshaking(&self) -> PyResult<bool> {
        self.with(|t| Ok(t.handshaking()))
    }
}

/// Adds the TLS classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TlsError", m.py().get_type::<TlsError>())?;
    m.add_class::<TlsServerContext>()?;
    m.add_class::<TlsClientContext>()?;
    m.add_class::<TlsConnection>()?;
    Ok(())
}
