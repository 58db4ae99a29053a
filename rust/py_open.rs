//! The Python side of sessions the engine opens by itself (`open.rs`): the route table's entries
//! as Python builds them, and the news of each session as Python reads it from `Engine.drain`.

use std::net::SocketAddr;
use std::os::fd::IntoRawFd;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::open::{Client, Failure, News, Route, Tokens};
use crate::py::{Nonces, TokenKeys};
use crate::py_tls::TlsConnection;
use crate::session::Limits;

/// One agent the engine opens sessions for by itself (see `Engine.set_routes`).
#[pyclass(module = "wsgate._core", frozen)]
pub struct FastRoute {
    pub(crate) route: std::sync::Mutex<Option<Route>>,
}

#[pymethods]
impl FastRoute {
    #[new]
    #[pyo3(signature = (service_host, max_sessions, bot_ip, bot_port, resource, host_header, max_message_size, time_limit, dial_timeout, *, agent = None, keys = None, nonces = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python signature in `_core.pyi`
    fn new(
        service_host: String,
        max_sessions: usize,
        bot_ip: &str,
        bot_port: u16,
        resource: String,
        host_header: String,
        max_message_size: u64,
        time_limit: Option<f64>,
        dial_timeout: f64,
        agent: Option<usize>,
        keys: Option<&TokenKeys>,
        nonces: Option<&Nonces>,
    ) -> PyResult<Self> {
        let tokens = match (keys, nonces) {
            (None, None) => None,
            (Some(k), Some(n)) => Some(Tokens {
                keys: k.keys.clone(),
                nonces: n.set.clone(),
            }),
            _ => {
                return Err(PyValueError::new_err(
                    "a token agent's route needs both keys and nonces",
                ))
            }
        };
        let ip = bot_ip
            .parse()
            .map_err(|_| PyValueError::new_err("bot_ip must be an IP address"))?;
        if !(dial_timeout.is_finite() && dial_timeout > 0.0) {
            return Err(PyValueError::new_err("dial_timeout must be positive"));
        }
        let limits: Limits = crate::py::check_limits(max_message_size, time_limit)?;
        let route = Route {
            service_host,
            max_sessions,
            bot: SocketAddr::new(ip, bot_port),
            resource,
            host_header,
            limits,
            // Too long to count (over u64 seconds): no time limit on the dial, as in Python.
            dial_timeout: Duration::try_from_secs_f64(dial_timeout).unwrap_or(Duration::MAX),
            agent,
            tokens,
            place: Default::default(),
        };
        Ok(Self {
            route: std::sync::Mutex::new(Some(route)),
        })
    }

    fn __repr__(&self) -> String {
        let route = self
            .route
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match route.as_ref() {
            Some(r) => format!("FastRoute({:?} -> {})", r.service_host, r.bot),
            None => "FastRoute(<given to an engine>)".to_owned(),
        }
    }
}

/// A session the engine opened: answered 101 and relaying.
#[pyclass(module = "wsgate._core", frozen, get_all)]
pub struct Opened {
    session_id: u64,
    session_uuid: String,
    service_host: String,
    dial_seconds: f64,
    opened_at: f64,
    /// A provider's `(provider, call id, stream id)` from its `start` (either id `None` if it
    /// had none; `None`: a generic session, or a provider's whose opening was not read).
    call: Option<(&'static str, Option<String>, Option<String>)>,
}

#[pymethods]
impl Opened {
    fn __repr__(&self) -> String {
        format!(
            "Opened(session_id={}, service_host={:?})",
            self.session_id, self.service_host
        )
    }
}

/// How long the replay store's calls for a session the engine opened took (a token agent's
/// claim), in seconds: told as they are made, the session itself only as it ends.
#[pyclass(module = "wsgate._core", frozen, get_all)]
pub struct StoreCalls {
    seconds: Vec<f64>,
}

#[pymethods]
impl StoreCalls {
    fn __repr__(&self) -> String {
        format!("StoreCalls({:?})", self.seconds)
    }
}

impl StoreCalls {
    pub fn new(seconds: Vec<f64>) -> Self {
        Self { seconds }
    }
}

/// A copy of the news of a session the engine opened (a [`News::Opened`]), for Python.
pub fn opened(py: Python<'_>, news: &News) -> PyResult<Py<Opened>> {
    Py::new(py, Opened::of(news))
}

impl Opened {
    /// A copy of `news` (a [`News::Opened`]), made without the GIL.
    pub fn of(news: &News) -> Self {
        let News::Opened {
            session_id,
            session_uuid,
            service_host,
            dial_seconds,
            opened_at,
            call,
            ..
        } = news
        else {
            unreachable!("only opened sessions are kept");
        };
        Self {
            session_id: *session_id,
            session_uuid: session_uuid.clone(),
            service_host: service_host.clone(),
            dial_seconds: *dial_seconds,
            opened_at: *opened_at,
            call: call
                .as_ref()
                .map(|c| (c.provider.name(), c.call_id.clone(), c.stream_id.clone())),
        }
    }
}

/// A session the engine could not open: its bot's dial failed (its place is given back). `fd`
/// is the client's socket, now the caller's to answer and close (-1: the client went away).
#[pyclass(module = "wsgate._core", frozen, get_all)]
pub struct Unopened {
    session_id: u64,
    service_host: String,
    fd: i32,
    /// The client's TLS, to answer through (`None`: a plain connection).
    tls: Option<Py<TlsConnection>>,
    /// `timed_out`, `os` (`errno`), `closed`, `too_large`, `answer` (`head`, `key`),
    /// `client_gone`.
    failure: &'static str,
    errno: i32,
    head: Py<PyBytes>,
    key: String,
    store_seconds: Vec<f64>,
    /// Answered 101 already (`/ws/twilio`): to be closed with a close frame, not answered.
    answered: bool,
}

#[pymethods]
impl Unopened {
    fn __repr__(&self) -> String {
        format!(
            "Unopened(session_id={}, service_host={:?}, failure={:?})",
            self.session_id, self.service_host, self.failure
        )
    }
}

/// A connection the engine accepted and did not open (at its accept, or once a relay thread
/// read its request: see `Engine.set_wait`): the caller's to serve on `fd` from the bytes
/// `read`, `waited` seconds after its accept (-1: the client went away or was too slow,
/// nothing to answer).
#[pyclass(module = "wsgate._core", frozen, get_all)]
pub struct Handed {
    fd: i32,
    /// The client's TLS, its handshake done (`None`: a plain connection).
    tls: Option<Py<TlsConnection>>,
    address: Py<PyAny>,
    read: Py<PyBytes>,
    waited: f64,
    /// Gone because too many connections were waited for at once (`max_pending_upgrades`).
    evicted: bool,
    /// Gone because its TLS failed: why.
    tls_error: Option<String>,
    /// A `/ws/twilio` stream answered 101 by the engine: the id the 101 named (`""`: none, a
    /// token names it; `read` is then its head and the frames after it, `waited` the seconds
    /// since the 101).
    answered: Option<String>,
}

#[pymethods]
impl Handed {
    fn __repr__(&self) -> String {
        format!("Handed(fd={}, waited={:.3})", self.fd, self.waited)
    }
}

/// Accepting on a relay thread failed (see `Engine.listen`): with `errno`, again in 100 ms if
/// `paused`, else never.
#[pyclass(module = "wsgate._core", frozen, get_all)]
pub struct AcceptFailed {
    errno: i32,
    paused: bool,
}

#[pymethods]
impl AcceptFailed {
    fn __repr__(&self) -> String {
        format!("AcceptFailed(errno={}, paused={})", self.errno, self.paused)
    }
}

/// The gateway is full and a connection waits in the backlog (see `Engine.listen`): the
/// oldest connection still sending its request gives way once it has been at it a second, the
/// engine's or one Python reads; moot once `Engine.ends()` is past `ends`.
#[pyclass(module = "wsgate._core", frozen, get_all)]
pub struct Crowded {
    ends: u64,
}

#[pymethods]
impl Crowded {
    fn __repr__(&self) -> String {
        format!("Crowded(ends={})", self.ends)
    }
}

/// News as Python reads it.
pub fn news_to_py(py: Python<'_>, news: News) -> PyResult<Py<PyAny>> {
    Ok(match news {
        News::Crowded { ends } => Py::new(py, Crowded { ends })?.into_any(),
        News::AcceptFailed { errno, paused } => {
            Py::new(py, AcceptFailed { errno, paused })?.into_any()
        }
        News::Opened { .. } => opened(py, &news)?.into_any(),
        News::Unopened {
            session_id,
            service_host,
            client,
            failure,
            store_seconds,
            answered,
        } => {
            let (kind, errno, head, key) = match failure {
                Failure::TimedOut => ("timed_out", 0, Vec::new(), String::new()),
                Failure::Os(n) => ("os", n, Vec::new(), String::new()),
                Failure::Closed => ("closed", 0, Vec::new(), String::new()),
                Failure::TooLarge => ("too_large", 0, Vec::new(), String::new()),
                Failure::Answer { head, key } => ("answer", 0, head, key),
                Failure::ClientGone => ("client_gone", 0, Vec::new(), String::new()),
            };
            let (fd, tls) = client_to_py(py, client)?;
            Py::new(
                py,
                Unopened {
                    session_id,
                    service_host,
                    fd,
                    tls,
                    failure: kind,
                    errno,
                    head: PyBytes::new(py, &head).unbind(),
                    key,
                    store_seconds,
                    answered,
                },
            )?
            .into_any()
        }
        News::Handed {
            client,
            peer,
            read,
            waited,
            evicted,
            tls_error,
            answered,
        } => {
            let (fd, tls) = client_to_py(py, client)?;
            Py::new(
                py,
                Handed {
                    fd,
                    tls,
                    address: address(py, peer)?,
                    read: PyBytes::new(py, &read).unbind(),
                    waited,
                    evicted,
                    tls_error,
                    answered,
                },
            )?
            .into_any()
        }
    })
}

/// A client for Python: its descriptor (-1: none) and its TLS.
fn client_to_py(
    py: Python<'_>,
    client: Option<Client>,
) -> PyResult<(i32, Option<Py<TlsConnection>>)> {
    let Some((sock, tls)) = client else {
        return Ok((-1, None));
    };
    let tls = match tls {
        Some(t) => Some(Py::new(py, TlsConnection::new(*t))?),
        None => None,
    };
    Ok((sock.into_raw_fd(), tls))
}

/// A peer address as Python's `socket` module writes it: `(host, port)` for IPv4, `(host, port,
/// flowinfo, scope_id)` for IPv6.
pub fn address(py: Python<'_>, peer: Option<SocketAddr>) -> PyResult<Py<PyAny>> {
    Ok(match peer {
        None => py.None(),
        Some(SocketAddr::V4(a)) => (a.ip().to_string(), a.port())
            .into_pyobject(py)?
            .into_any()
            .unbind(),
        Some(SocketAddr::V6(a)) => (a.ip().to_string(), a.port(), a.flowinfo(), a.scope_id())
            .into_pyobject(py)?
            .into_any()
            .unbind(),
    })
}
