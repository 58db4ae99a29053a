//! The Python binding: `wsgate._core`. Thin wrappers that convert arguments and errors; the
//! work happens in the plain-Rust modules. Its typed surface is `python/wsgate/_core.pyi`.
//!
//! Rust errors become Python exceptions here and only here, one `From` per error type:
//! `body::BodyError` → `BodyError`, `token::TokenError` → `TokenError`, and `io::Error` → pyo3's
//! own, an `OSError`. What a refusal means for an HTTP answer is for Python to say.

use std::os::fd::{FromRawFd, RawFd};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};

use crate::inproc::Delivery;
use crate::py_open::{self, FastRoute};
use crate::py_tls::{self, TlsConnection};
use crate::session_line::{self, Told};
use crate::{body, counters, engine, limits, memory, nonces, session, token};

/// Largest upgrade request line plus headers, in bytes (SPEC §2): exported, so that Python never
/// repeats it.
const MAX_HEADER_BYTES: usize = crate::upgrade::MAX_HEADER_BYTES;

pyo3::create_exception!(
    _core,
    TokenError,
    PyValueError,
    "A session token that is refused: `kind` names the check that refused it; the message never \
     holds the token."
);

pyo3::create_exception!(
    _core,
    BodyError,
    PyValueError,
    "A `?body=` value that cannot be used: `kind` names the check that refused it, `reason` says \
     it in one line."
);

impl From<body::BodyError> for PyErr {
    fn from(e: body::BodyError) -> Self {
        let kind = match e {
            body::BodyError::TooLarge { .. } => "too_large",
            body::BodyError::NotBase64 => "not_base64",
            body::BodyError::NotJson => "not_json",
            body::BodyError::TooDeep { .. } => "too_deep",
        };
        let reason = e.reason();
        Python::attach(|py| {
            let err = BodyError::new_err(reason.clone());
            let value = err.value(py);
            // Setting two attributes on a fresh exception instance cannot fail.
            let _ = value.setattr("kind", kind);
            let _ = value.setattr("reason", reason);
            err
        })
    }
}

impl From<token::TokenError> for PyErr {
    fn from(e: token::TokenError) -> Self {
        let kind = match e {
            token::TokenError::Malformed => "malformed",
            token::TokenError::BadSignature => "bad_signature",
            token::TokenError::WrongServiceHost => "wrong_service_host",
            token::TokenError::Expired => "expired",
            token::TokenError::BodyMissing => "body_missing",
            token::TokenError::BodyNotBound => "body_not_bound",
            token::TokenError::BodyMismatch => "body_mismatch",
        };
        Python::attach(|py| {
            let err = TokenError::new_err(e.reason());
            // Setting an attribute on a fresh exception instance cannot fail.
            let _ = err.value(py).setattr("kind", kind);
            err
        })
    }
}

/// Checks and decodes a `?body=` value: `(json_text, upstream_value)`.
#[pyfunction]
fn decode_body(raw: &str) -> PyResult<(String, String)> {
    let b = body::decode_body(raw)?;
    Ok((b.json, b.upstream_value))
}

/// Checks a body document's bytes (size, UTF-8 JSON, nesting) as `?body=` is checked.
#[pyfunction]
fn check_body_json(document: &[u8]) -> PyResult<()> {
    Ok(body::check_json(document)?)
}

/// A deployment's signing secrets, keyed once: the first signs, all verify.
#[pyclass(module = "wsgate._core", frozen)]
pub(crate) struct TokenKeys {
    /// Shared with the engine's route table (`open.rs`), which checks tokens too.
    pub(crate) keys: std::sync::Arc<token::Keys>,
}

#[pymethods]
impl TokenKeys {
    #[new]
    fn new(secrets: Vec<Vec<u8>>) -> PyResult<Self> {
        token::Keys::new(&secrets)
            .map(|keys| Self {
                keys: std::sync::Arc::new(keys),
            })
            .ok_or_else(|| {
                PyValueError::new_err("secrets must be a non-empty list of non-empty bytes")
            })
    }

    #[pyo3(signature = (service_host, exp, nonce, body=None))]
    fn mint(&self, service_host: &str, exp: u64, nonce: &str, body: Option<&[u8]>) -> String {
        self.keys.mint(service_host, exp, nonce, body)
    }

    // About a microsecond of work: releasing the GIL would cost more than it frees.
    fn verify(&self, token: &str, service_host: &str, now: u64) -> PyResult<TokenClaims> {
        let claims = self.keys.verify(token, service_host, now)?;
        Ok(TokenClaims { claims })
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.keys)
    }
}

/// The claims of a verified token; its repr leaves out the nonce.
#[pyclass(module = "wsgate._core", frozen)]
struct TokenClaims {
    claims: token::Claims,
}

#[pymethods]
impl TokenClaims {
    #[getter]
    fn exp(&self) -> u64 {
        self.claims.exp
    }

    #[getter]
    fn nonce(&self) -> &str {
        &self.claims.nonce
    }

    #[getter]
    fn binds_body(&self) -> bool {
        self.claims.body.is_some()
    }

    fn check_body(&self, body: Option<&[u8]>) -> PyResult<()> {
        Ok(self.claims.check_body(body)?)
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.claims)
    }
}

/// Spent token nonces (`nonces.rs`): the memory replay store's set, shared with the engine.
#[pyclass(module = "wsgate._core", frozen)]
pub(crate) struct Nonces {
    pub(crate) set: std::sync::Arc<nonces::Nonces>,
}

#[pymethods]
impl Nonces {
    #[new]
    fn new(max_entries: usize) -> PyResult<Self> {
        if max_entries == 0 {
            return Err(PyValueError::new_err("max_entries must be at least 1"));
        }
        Ok(Self {
            set: std::sync::Arc::new(nonces::Nonces::new(max_entries)),
        })
    }

    fn claim(&self, nonce: &str, exp: u64, now: u64) -> PyResult<bool> {
        self.set
            .claim(nonce, exp, now)
            .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("replay store full"))
    }

    fn release(&self, nonce: &str) {
        self.set.release(nonce);
    }

    fn entries(&self) -> usize {
        self.set.entries()
    }

    fn clear(&self) {
        self.set.clear();
    }

    fn __len__(&self) -> usize {
        self.set.len()
    }

    fn __repr__(&self) -> String {
        format!("Nonces({} claimed)", self.set.len())
    }
}

/// A fresh random nonce from the operating system's CSPRNG (safe after `fork`).
#[pyfunction]
fn new_nonce() -> String {
    token::new_nonce()
}

/// Gives the heap's free memory back to the operating system (see `memory.rs`); true when some
/// was. Without the GIL: it walks every arena's free chunks.
#[pyfunction]
fn release_memory(py: Python<'_>) -> bool {
    py.detach(memory::release)
}

/// How one relayed session ended.
#[pyclass(module = "wsgate._core", frozen, get_all)]
struct Outcome {
    session_id: u64,
    client_close: Option<(u16, String)>,
    bot_close: Option<(u16, String)>,
    ended_by: &'static str,
    detail: String,
    code: u16,
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    ended_at: f64,
    opened: Option<Py<py_open::Opened>>,
}

#[pymethods]
impl Outcome {
    fn __repr__(&self) -> String {
        format!(
            "Outcome(session_id={}, ended_by={:?}, detail={:?}, code={}, client_close={:?}, \
             bot_close={:?})",
            self.session_id,
            self.ended_by,
            self.detail,
            self.code,
            self.client_close,
            self.bot_close
        )
    }
}

impl Outcome {
    fn new(o: session::Outcome, ended_at: f64, opened: Option<Py<py_open::Opened>>) -> Self {
        Self {
            session_id: o.session_id,
            client_close: o.client_close,
            bot_close: o.bot_close,
            ended_by: o.ended_by.as_str(),
            detail: o.detail,
            code: o.code,
            messages_in: o.messages_in,
            messages_out: o.messages_out,
            bytes_in: o.bytes_in,
            bytes_out: o.bytes_out,
            ended_at,
            opened,
        }
    }
}

/// One agent's live counters (see `Engine.counters`).
#[pyclass(module = "wsgate._core", frozen, get_all)]
struct AgentCounts {
    agent: String,
    opened: u64,
    active_upstream: u64,
    active_inprocess: u64,
    active_builtin: u64,
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    dial_counts: Vec<u64>,
    dial_sum: f64,
    duration_counts: Vec<u64>,
    duration_sum: f64,
    closed: Vec<(&'static str, u16, String, u64)>,
}

#[pymethods]
impl AgentCounts {
    fn __repr__(&self) -> String {
        format!(
            "AgentCounts(agent={:?}, opened={})",
            self.agent, self.opened
        )
    }
}

impl From<counters::Snapshot> for AgentCounts {
    fn from(s: counters::Snapshot) -> Self {
        Self {
            agent: s.name,
            opened: s.opened,
            active_upstream: s.active_upstream,
            active_inprocess: s.active_inprocess,
            active_builtin: s.active_builtin,
            messages_in: s.tally.messages_in,
            messages_out: s.tally.messages_out,
            bytes_in: s.tally.bytes_in,
            bytes_out: s.tally.bytes_out,
            dial_counts: s.dials.counts,
            dial_sum: s.dials.sum,
            duration_counts: s.durations.counts,
            duration_sum: s.durations.sum,
            closed: s
                .closed
                .into_iter()
                .map(|(k, n)| (k.ended_by.as_str(), k.code, k.detail, n))
                .collect(),
        }
    }
}

/// One live session's messages and bytes so far (see `Engine.session_counts`).
#[pyclass(module = "wsgate._core", frozen, get_all)]
struct SessionCounts {
    session_id: u64,
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

#[pymethods]
impl SessionCounts {
    fn __repr__(&self) -> String {
        format!(
            "SessionCounts(session_id={}, messages_in={}, messages_out={})",
            self.session_id, self.messages_in, self.messages_out
        )
    }
}

impl From<(u64, counters::Tally)> for SessionCounts {
    fn from((session_id, t): (u64, counters::Tally)) -> Self {
        Self {
            session_id,
            messages_in: t.messages_in,
            messages_out: t.messages_out,
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
        }
    }
}

/// A whole message from an in-process session's client (`data` is `str` or `bytes`), or
/// `data = None`: the session's outbox drained, sending may go on.
#[pyclass(module = "wsgate._core", frozen, get_all)]
struct Message {
    session_id: u64,
    data: Option<Py<PyAny>>,
}

#[pymethods]
impl Message {
    fn __repr__(&self) -> String {
        // Never the payload: only its kind.
        let kind = if self.data.is_some() {
            "message"
        } else {
            "drained"
        };
        format!("Message(session_id={}, {kind})", self.session_id)
    }
}

/// The ends of sessions the engine opened that Python never adopted, from one `Engine.drain`:
/// their log lines made here (`session_line.rs`), or their outcomes for Python to log.
#[pyclass(module = "wsgate._core", frozen)]
struct ToldEnds {
    told: Vec<Told>,
}

#[pymethods]
impl ToldEnds {
    fn __len__(&self) -> usize {
        self.told.len()
    }

    fn __repr__(&self) -> String {
        format!("ToldEnds({} sessions)", self.told.len())
    }

    /// Each as an `Outcome` whose `opened` is its news.
    fn outcomes(&self, py: Python<'_>) -> PyResult<Vec<Py<Outcome>>> {
        self.told
            .iter()
            .map(|t| {
                let opened = py_open::opened(py, &t.news)?;
                Py::new(
                    py,
                    Outcome::new(t.outcome.clone(), t.ended_at, Some(opened)),
                )
            })
            .collect()
    }

    /// The text lines: `head` (the time and level), the message, `terminator`; in chunks of
    /// whole lines of at most `limit` bytes, each with its count of lines.
    fn text(
        &self,
        py: Python<'_>,
        head: &str,
        terminator: &str,
        limit: usize,
    ) -> Vec<(String, usize)> {
        py.detach(|| {
            session_line::chunks(&self.told, terminator, limit, |t, out| {
                out.push_str(head);
                t.message(out);
            })
        })
    }

    /// The JSON lines, each at `ts`; chunked as `text`.
    fn json(
        &self,
        py: Python<'_>,
        ts: &str,
        terminator: &str,
        limit: usize,
    ) -> Vec<(String, usize)> {
        py.detach(|| session_line::chunks(&self.told, terminator, limit, |t, out| t.json(ts, out)))
    }
}

fn item_to_py(py: Python<'_>, item: engine::Item) -> PyResult<Py<PyAny>> {
    Ok(match item {
        engine::Item::Outcome(o, at, news) => {
            let opened = news.map(|n| py_open::opened(py, &n)).transpose()?;
            Py::new(py, Outcome::new(o, at, opened))?.into_any()
        }
        engine::Item::Message(m) => {
            let data = match m.data {
                Delivery::Text(s) => Some(PyString::new(py, &s).into_any().unbind()),
                Delivery::Binary(b) => Some(PyBytes::new(py, &b).into_any().unbind()),
                Delivery::Drained => None,
            };
            Py::new(
                py,
                Message {
                    session_id: m.session_id,
                    data,
                },
            )?
            .into_any()
        }
        engine::Item::Open(news) => py_open::news_to_py(py, news)?,
        engine::Item::StoreCalls(seconds) => {
            Py::new(py, py_open::StoreCalls::new(seconds))?.into_any()
        }
    })
}

/// The relay engine.
#[pyclass(module = "wsgate._core", frozen)]
struct Engine {
    inner: std::sync::Mutex<engine::Engine>,
}

/// Takes ownership of a descriptor that Python detached from its socket object.
fn tcp_from_fd(fd: RawFd) -> PyResult<std::net::TcpStream> {
    check_fd(fd)?;
    // SAFETY: the caller detached `fd` from its Python socket, so nothing else owns or closes
    // it; from here on the engine does.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(fd) })
}

/// A descriptor that may be one: Rust's `BorrowedFd` and `from_raw_fd` take no negative one.
fn check_fd(fd: RawFd) -> PyResult<RawFd> {
    if fd < 0 {
        return Err(PyValueError::new_err("invalid file descriptor"));
    }
    Ok(fd)
}

/// A session's limits: a positive largest message, and a time limit that is `None` or a
/// positive finite number of seconds.
pub(crate) fn check_limits(
    max_message_size: u64,
    time_limit: Option<f64>,
) -> PyResult<session::Limits> {
    if max_message_size == 0 {
        return Err(PyValueError::new_err("max_message_size must be positive"));
    }
    let time_limit = match time_limit {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 => Some(std::time::Duration::from_secs_f64(s)),
        Some(_) => {
            return Err(PyValueError::new_err(
                "time_limit must be a positive number of seconds",
            ))
        }
    };
    Ok(session::Limits {
        max_message_size,
        time_limit,
    })
}

/// One side of a session as Python hands it over: the detached descriptor, the bytes read past
/// its handshake, and its TLS connection (taken from the Python object).
fn handed(
    fd: RawFd,
    pending: &Bound<'_, PyBytes>,
    tls: Option<&TlsConnection>,
) -> PyResult<engine::Handed> {
    let sock = tcp_from_fd(fd)?;
    let tls =
        match tls {
            None => None,
            Some(conn) => Some(conn.take().ok_or_else(|| {
                PyValueError::new_err("the TLS connection was handed over already")
            })?),
        };
    Ok(engine::Handed {
        sock,
        tls,
        pending: pending.as_bytes().to_vec(),
    })
}

impl Engine {
    fn engine(&self) -> std::sync::MutexGuard<'_, engine::Engine> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `f` on the engine without the GIL: the lock, or `f` itself, may wait on a relay thread
    /// (a session starting or ending, an answer to mail), and Python threads go on meanwhile.
    fn detached<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut engine::Engine) -> R + Send,
    ) -> R {
        py.detach(|| f(&mut self.engine()))
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (threads = 0, dead_peer_timeout = 60.0))]
    fn new(threads: usize, dead_peer_timeout: f64) -> PyResult<Self> {
        if !(dead_peer_timeout.is_finite() && dead_peer_timeout >= 1.0) {
            return Err(PyValueError::new_err(
                "dead_peer_timeout must be at least 1 second",
            ));
        }
        let dpt = std::time::Duration::from_secs_f64(dead_peer_timeout);
        let e = engine::Engine::new(threads, dpt)?;
        Ok(Self {
            inner: std::sync::Mutex::new(e),
        })
    }

    fn doorbell(&self) -> RawFd {
        self.engine().doorbell_fd()
    }

    fn register_agent(&self, name: &str) -> usize {
        self.engine().register_agent(name)
    }

    fn counters(&self) -> Vec<AgentCounts> {
        let snapshot = self.engine().counters();
        snapshot.into_iter().map(AgentCounts::from).collect()
    }

    #[pyo3(signature = (session_ids = None))]
    fn session_counts(&self, py: Python<'_>, session_ids: Option<Vec<u64>>) -> Vec<SessionCounts> {
        // One snapshot without the GIL.
        let tallies = self.detached(py, |e| e.tallies(session_ids.as_deref()));
        tallies.into_iter().map(SessionCounts::from).collect()
    }

    #[pyo3(signature = (session_id, client_fd, bot_fd, client_pending, bot_pending, max_message_size, time_limit = None, client_tls = None, bot_tls = None, *, agent = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python signature in `_core.pyi`
    fn relay(
        &self,
        session_id: u64,
        client_fd: RawFd,
        bot_fd: RawFd,
        client_pending: &Bound<'_, PyBytes>,
        bot_pending: &Bound<'_, PyBytes>,
        max_message_size: u64,
        time_limit: Option<f64>,
        client_tls: Option<&TlsConnection>,
        bot_tls: Option<&TlsConnection>,
        agent: Option<usize>,
    ) -> PyResult<()> {
        let client = handed(client_fd, client_pending, client_tls)?;
        let bot = handed(bot_fd, bot_pending, bot_tls)?;
        let limits = check_limits(max_message_size, time_limit)?;
        self.engine()
            .relay(session_id, client, bot, limits, agent)?;
        Ok(())
    }

    #[pyo3(signature = (session_id, client_fd, client_pending, max_message_size, time_limit = None, client_tls = None, *, agent = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python signature in `_core.pyi`
    fn echo(
        &self,
        session_id: u64,
        client_fd: RawFd,
        client_pending: &Bound<'_, PyBytes>,
        max_message_size: u64,
        time_limit: Option<f64>,
        client_tls: Option<&TlsConnection>,
        agent: Option<usize>,
    ) -> PyResult<()> {
        let client = handed(client_fd, client_pending, client_tls)?;
        let limits = check_limits(max_message_size, time_limit)?;
        self.engine().echo(session_id, client, limits, agent)?;
        Ok(())
    }

    fn next_session_id(&self) -> u64 {
        self.engine().next_id()
    }

    fn take_place(&self, service_host: &str, max_sessions: usize) -> bool {
        self.engine().take_place(service_host, max_sessions)
    }

    fn give_place(&self, service_host: &str) {
        self.engine().give_place(service_host);
    }

    #[pyo3(signature = (session_id, service_host = None))]
    fn adopt(
        &self,
        py: Python<'_>,
        session_id: u64,
        service_host: Option<&str>,
    ) -> PyResult<Option<Py<py_open::Opened>>> {
        let news = self.engine().adopt(session_id, service_host);
        news.map(|n| py_open::opened(py, &n)).transpose()
    }

    fn told_id(&self, session_uuid: &str) -> Option<u64> {
        self.engine().told_id(session_uuid)
    }

    #[pyo3(signature = (service_host = None))]
    fn told(
        &self,
        py: Python<'_>,
        service_host: Option<&str>,
    ) -> PyResult<Vec<Py<py_open::Opened>>> {
        // Copied under the engine's queue lock, made Python objects after it.
        let told = self.engine().told(service_host, py_open::Opened::of);
        told.into_iter().map(|o| Py::new(py, o)).collect()
    }

    fn told_count(&self) -> usize {
        self.engine().told_count()
    }

    fn told_peak(&self) -> usize {
        self.engine().told_peak()
    }

    fn give_back_place(&self, session_id: u64) -> bool {
        self.engine().give_back_place(session_id)
    }

    #[pyo3(signature = (service_host = None))]
    fn places(&self, service_host: Option<&str>) -> usize {
        self.engine().places(service_host)
    }

    fn set_routes(&self, routes: Vec<Bound<'_, FastRoute>>) -> PyResult<()> {
        let mut table = Vec::with_capacity(routes.len());
        for r in &routes {
            let taken = r
                .get()
                .route
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            table.push(taken.ok_or_else(|| {
                PyValueError::new_err("the FastRoute was given to an engine already")
            })?);
        }
        self.engine().set_routes(table)?;
        Ok(())
    }

    /// Sets the relayed sockets' options on listening socket `listener` before it listens, for
    /// the sockets `accept` takes from it to inherit.
    fn prepare_listener(&self, listener: RawFd) -> PyResult<()> {
        Ok(self.engine().prepare_listener(check_fd(listener)?)?)
    }

    /// The listener's TLS for connections accepted from now on (None: plain): their handshake
    /// and request are read on a relay thread.
    #[pyo3(signature = (context))]
    fn set_tls(&self, context: Option<&crate::py_tls::TlsServerContext>) {
        self.engine().set_tls(context.map(|c| c.config.clone()));
    }

    /// Connections accepted before their request arrived are waited for on a relay thread, at
    /// most `most` at once, each for `timeout` seconds from its accept (a `Handed` news tells
    /// how each ended that did not open). `most` 0: none (they come back from `accept` unread).
    fn set_wait(&self, timeout: f64, most: usize) -> PyResult<()> {
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(PyValueError::new_err("timeout must be positive"));
        }
        let timeout =
            std::time::Duration::try_from_secs_f64(timeout).unwrap_or(std::time::Duration::MAX);
        self.engine()
            .set_wait(crate::opener::Wait { timeout, most });
        Ok(())
    }

    /// Connections whose request a relay thread waits for now.
    fn waiting(&self) -> usize {
        self.engine().waiting()
    }

    /// Seconds the connection whose request a relay thread has waited for longest has waited
    /// (`None`: none is).
    fn oldest_wait(&self) -> Option<f64> {
        self.engine().oldest_wait().map(|d| d.as_secs_f64())
    }

    /// Evicts the connection whose request a relay thread has waited for longest; false if none
    /// is waited for.
    fn make_room(&self) -> bool {
        self.engine().make_room()
    }

    /// Evicts every connection whose request a relay thread waits for.
    fn stop_waiting(&self) {
        self.engine().stop_waiting();
    }

    /// Relay thread 0 accepts on `listener` from now on, at most `limit` connections held at
    /// once (see `accepting.rs`).
    fn listen(&self, py: Python<'_>, listener: RawFd, limit: usize) -> PyResult<()> {
        let listener = check_fd(listener)?;
        Ok(self.detached(py, |e| e.listen(listener, limit))?)
    }

    /// Stops accepting on the relay thread; returns once its copy of the listener is closed.
    fn unlisten(&self, py: Python<'_>) {
        self.detached(py, |e| e.unlisten());
    }

    /// Connections accepted on the relay thread and not yet closed.
    fn held(&self) -> usize {
        self.engine().held()
    }

    /// A connection accepted on the relay thread is over: how many are held now.
    fn closed(&self) -> usize {
        self.engine().closed()
    }

    /// Connections accepted on the relay thread that are over, so far.
    fn ends(&self) -> u64 {
        self.engine().ends()
    }

    fn close(&self, session_id: u64, code: u16, reason: &str) -> bool {
        self.engine().close(session_id, code, reason)
    }

    /// Everything queued, in order; the ends of sessions the engine opened and Python never
    /// adopted last, as one `ToldEnds`.
    fn drain(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        let items = self.engine().drain();
        let mut told = Vec::new();
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item {
                engine::Item::Outcome(outcome, ended_at, Some(news)) => told.push(Told {
                    outcome,
                    ended_at,
                    news,
                }),
                item => out.push(item_to_py(py, item)?),
            }
        }
        if !told.is_empty() {
            out.push(Py::new(py, ToldEnds { told })?.into_any());
        }
        Ok(out)
    }

    #[pyo3(signature = (session_id, client_fd, client_pending, max_message_size, inbox_limit, send_buffer_limit, time_limit = None, client_tls = None, *, agent = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python signature in `_core.pyi`
    fn attach(
        &self,
        session_id: u64,
        client_fd: RawFd,
        client_pending: &Bound<'_, PyBytes>,
        max_message_size: u64,
        inbox_limit: usize,
        send_buffer_limit: usize,
        time_limit: Option<f64>,
        client_tls: Option<&TlsConnection>,
        agent: Option<usize>,
    ) -> PyResult<()> {
        let client = handed(client_fd, client_pending, client_tls)?;
        let limits = check_limits(max_message_size, time_limit)?;
        let (inbox, send) = (inbox_limit, send_buffer_limit);
        self.engine()
            .attach(session_id, client, limits, inbox, send, agent)?;
        Ok(())
    }

    fn send(&self, session_id: u64, data: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        let engine = self.engine();
        if let Ok(s) = data.cast::<PyString>() {
            Ok(engine.send(session_id, true, s.to_str()?.as_bytes()))
        } else if let Ok(b) = data.cast::<PyBytes>() {
            Ok(engine.send(session_id, false, b.as_bytes()))
        } else {
            Err(pyo3::exceptions::PyTypeError::new_err(
                "send() takes str or bytes",
            ))
        }
    }

    fn consumed(&self, session_id: u64, nbytes: usize) {
        self.engine().consumed(session_id, nbytes);
    }

    fn shutdown(&self, py: Python<'_>) {
        // Waits for the worker threads.
        self.detached(py, |e| e.shutdown());
    }
}

/// wsgate's native core.
#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    // Limits, so that Python never repeats a number.
    m.add("DEFAULT_MAX_MESSAGE_SIZE", limits::DEFAULT_MAX_MESSAGE_SIZE)?;
    m.add("MAX_HEADER_BYTES", MAX_HEADER_BYTES)?;
    m.add("MAX_BODY_BYTES", body::MAX_BODY_BYTES)?;
    m.add("MAX_BODY_DEPTH", body::MAX_BODY_DEPTH)?;
    m.add("TOKEN_TTL_SECONDS", token::TOKEN_TTL_SECONDS)?;
    m.add("MAX_TOKEN_BYTES", token::MAX_TOKEN_BYTES)?;
    m.add("TIME_LIMIT_REASON", session::TIME_LIMIT_CLOSE.1)?;
    m.add("DRAIN_REASON", session_line::DRAIN_REASON)?;
    m.add("DIAL_BUCKETS", PyTuple::new(py, counters::DIAL_BUCKETS)?)?;
    m.add(
        "DURATION_BUCKETS",
        PyTuple::new(py, counters::DURATION_BUCKETS)?,
    )?;
    // ?body=
    m.add("BodyError", py.get_type::<BodyError>())?;
    m.add_function(wrap_pyfunction!(decode_body, m)?)?;
    m.add_function(wrap_pyfunction!(check_body_json, m)?)?;
    // Session tokens
    m.add("TokenError", py.get_type::<TokenError>())?;
    m.add_function(wrap_pyfunction!(new_nonce, m)?)?;
    m.add_class::<TokenKeys>()?;
    m.add_class::<TokenClaims>()?;
    m.add_class::<Nonces>()?;
    // The engine
    m.add_function(wrap_pyfunction!(release_memory, m)?)?;
    m.add_class::<Engine>()?;
    m.add_class::<Outcome>()?;
    m.add_class::<ToldEnds>()?;
    m.add_class::<Message>()?;
    m.add_class::<AgentCounts>()?;
    m.add_class::<SessionCounts>()?;
    m.add_class::<FastRoute>()?;
    m.add_class::<py_open::Opened>()?;
    m.add_class::<py_open::StoreCalls>()?;
    m.add_class::<py_open::Unopened>()?;
    m.add_class::<py_open::Handed>()?;
    m.add_class::<py_open::AcceptFailed>()?;
    m.add_class::<py_open::Crowded>()?;
    // TLS
    py_tls::register(m)?;
    Ok(())
}
