//! loadgen: the load generator and upstream echo server of wsgate's relay load bench.
//!
//! A hand-rolled RFC 6455 client and server (no extensions, no compression), kept small and
//! cheap so that neither the generator nor the upstream is what a relay bench measures:
//! every read is drained of all complete frames and answered with one write.
//!
//! Subcommands (see `usage()`):
//!   echo-server  an upstream that echoes every frame on /ws (any path is accepted); wss:// too
//!   saturate     N connections, each keeping K binary messages in flight; round trips/s
//!   telephony    N connections, each sending one message every T ms; round-trip latency
//!   twilio       telephony in Twilio's shape: `connected` and `start`, then JSON media messages
//!   opens        N sessions opened (Twilio's opening, until its echo) and closed; time and CPU
//!                (`--tokens FILE`: open i carries line i as `token=` in its query)
//!   idle         open N sessions, print "ready", hold them until stdin closes
//!
//! Client URLs may be `wss://`: TLS by rustls (ring), trusting only the CA of `--ca-file`, one
//! cipher suite offered (`--tls-suite`), no session resumption, so every open is a full
//! handshake. (telephony and twilio take each stream apart after its upgrade, so that the paced
//! sender encrypts and writes on the reader's descriptor: see `PacedOut`.) The echo server
//! serves `wss://` with `--tls-cert` and `--tls-key` (the same suite, no resumption).

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const OP_CONT: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BIN: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

// ---------------------------------------------------------------------------------------------
// clock: nanoseconds since process start (one base shared by all tasks)

static BASE: OnceLock<Instant> = OnceLock::new();
fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------------------------
// frames

struct Frame {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    hdr: usize,
    len: usize,
}

/// Parse one frame header at the start of `b`; None when the whole frame is not there yet.
fn parse(b: &[u8]) -> Option<Frame> {
    if b.len() < 2 {
        return None;
    }
    let fin = b[0] & 0x80 != 0;
    let opcode = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let mut hdr = 2;
    let len = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return None;
            }
            hdr = 4;
            u16::from_be_bytes([b[2], b[3]]) as usize
        }
        127 => {
            if b.len() < 10 {
                return None;
            }
            hdr = 10;
            u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize
        }
        n => n as usize,
    };
    let mask = if masked {
        if b.len() < hdr + 4 {
            return None;
        }
        let m = [b[hdr], b[hdr + 1], b[hdr + 2], b[hdr + 3]];
        hdr += 4;
        Some(m)
    } else {
        None
    };
    if b.len() < hdr + len {
        return None;
    }
    Some(Frame {
        fin,
        opcode,
        mask,
        hdr,
        len,
    })
}

fn push_header(out: &mut Vec<u8>, fin: bool, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mbit | len as u8);
    } else if len <= 0xffff {
        out.push(mbit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
}

fn xor_mask(data: &mut [u8], m: [u8; 4]) {
    let word = u32::from_ne_bytes(m);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i];
    }
}

/// xorshift64*: a fresh masking key per client frame without a syscall.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn key(&mut self) -> [u8; 4] {
        (self.next() as u32).to_ne_bytes()
    }
}

/// Append one masked client frame carrying `payload`.
fn push_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], rng: &mut Rng) {
    let key = rng.key();
    push_header(out, true, opcode, payload.len(), Some(key));
    let start = out.len();
    out.extend_from_slice(payload);
    xor_mask(&mut out[start..], key);
}

// ---------------------------------------------------------------------------------------------
// handshakes

fn accept_key(key: &str) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.digest().bytes())
}

fn find_crlf2(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

struct Url {
    addr: String,
    host: String,
    path: String,
    /// wss://: the TLS settings and the name the certificate must carry
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

fn parse_url(u: &str) -> Res<Url> {
    let (rest, tls, port) = if let Some(r) = u.strip_prefix("ws://") {
        (r, false, 80)
    } else if let Some(r) = u.strip_prefix("wss://") {
        (r, true, 443)
    } else {
        return Err("only ws:// and wss:// URLs are supported".into());
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (addr, name) = match hostport.rsplit_once(':') {
        Some((h, _)) => (hostport.to_string(), h),
        None => (format!("{hostport}:{port}"), hostport),
    };
    let tls = if tls {
        let cfg = TLS
            .get()
            .cloned()
            .flatten()
            .ok_or("a wss:// URL needs --ca-file")?;
        let name = rustls::pki_types::ServerName::try_from(name.to_string())?;
        Some((tokio_rustls::TlsConnector::from(cfg), name))
    } else {
        None
    };
    Ok(Url {
        addr,
        host: hostport.to_string(),
        path: path.to_string(),
        tls,
    })
}

// ---------------------------------------------------------------------------------------------
// TLS (wss://)

/// The client's TLS settings, from `--ca-file` (None: plain ws:// only).
static TLS: OnceLock<Option<Arc<rustls::ClientConfig>>> = OnceLock::new();
/// What the first TLS connection negotiated ("TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519").
static NEGOTIATED: OnceLock<String> = OnceLock::new();

/// Trust only the CA in `ca_file`; offer one cipher suite (by its rustls name) and every key
/// exchange group of ring; no resumption (no session cache, no tickets): every connection is a
/// full handshake, as for a new caller.
fn tls_config(ca_file: &str, suite: &str) -> Res<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca_file)? {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        return Err(format!("{ca_file}: no certificate").into());
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider(suite)?))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// ring's provider with one cipher suite (by its rustls name) and every key exchange group.
fn provider(suite: &str) -> Res<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let all = std::mem::take(&mut provider.cipher_suites);
    let names: Vec<String> = all.iter().map(|c| format!("{:?}", c.suite())).collect();
    provider.cipher_suites = all
        .into_iter()
        .filter(|c| format!("{:?}", c.suite()) == suite)
        .collect();
    if provider.cipher_suites.is_empty() {
        return Err(format!("--tls-suite {suite}: not one of {}", names.join(", ")).into());
    }
    Ok(provider)
}

/// Session storage that lets the server issue TLS 1.3 tickets but keeps none: a client that
/// offers one back gets a full handshake.
#[derive(Debug)]
struct ForgetfulStore;

impl rustls::server::StoresServerSessions for ForgetfulStore {
    fn put(&self, _id: Vec<u8>, _value: Vec<u8>) -> bool {
        true
    }
    fn get(&self, _id: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn take(&self, _id: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn can_cache(&self) -> bool {
        true
    }
}

/// The echo server's TLS (`--tls-cert`, `--tls-key`): that chain and key, the one suite of
/// `--tls-suite`, and no resumption, so every relay's dial of the bot is a full handshake
/// whatever its own client would resume. No ALPN.
///
/// It still sends rustls's default two TLS 1.3 tickets after each handshake (tickets it cannot
/// honour, see [`ForgetfulStore`]), as bots' TLS stacks do (OpenSSL and rustls both send two).
/// A server that sends none leaves the client's Finished unanswered, so its ACK is delayed
/// (~40 ms on Linux), and a client without TCP_NODELAY at that point (nginx sets it on its
/// upstream socket only at the upgrade) holds its request behind it (Nagle): every open
/// through nginx would wait ~40 ms for nothing a real bot would make it wait for.
fn server_tls_config(cert: &str, key: &str, suite: &str) -> Res<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--tls-cert {cert}: {e}"))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {key}: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider(suite)?))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.session_storage = Arc::new(ForgetfulStore);
    Ok(Arc::new(cfg))
}

/// "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519": what a connection negotiated.
fn describe_tls(c: &rustls::CommonState) -> Res<String> {
    Ok(format!(
        "{:?} {:?} {:?}",
        c.protocol_version().ok_or("no TLS version")?,
        c.negotiated_cipher_suite()
            .ok_or("no cipher suite")?
            .suite(),
        c.negotiated_key_exchange_group()
            .ok_or("no key exchange")?
            .name()
    ))
}

/// A client connection, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Write all of `b` and push it to the socket (a TLS stream may hold records until flushed;
/// flushing a TcpStream does nothing).
async fn send(s: &mut Conn, b: &[u8]) -> std::io::Result<()> {
    s.write_all(b).await?;
    s.flush().await
}

/// Connect and upgrade, asking for `target` (the URL's path and query, or a variant of it);
/// returns the stream and any bytes read past the 101 response.
async fn connect(url: &Url, target: &str, seed: u64) -> Res<(Conn, Vec<u8>)> {
    let tcp = TcpStream::connect(&url.addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = match &url.tls {
        None => Conn::Plain(tcp),
        Some((connector, name)) => {
            let t = connector.connect(name.clone(), tcp).await?;
            if NEGOTIATED.get().is_none() {
                let _ = NEGOTIATED.set(describe_tls(t.get_ref().1)?);
            }
            Conn::Tls(Box::new(t))
        }
    };
    let mut rng = Rng::new(seed.wrapping_add(now_ns()));
    let mut keyb = [0u8; 16];
    keyb[..8].copy_from_slice(&rng.next().to_ne_bytes());
    keyb[8..].copy_from_slice(&rng.next().to_ne_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(keyb);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target, url.host, key
    );
    send(&mut s, req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 1024];
    loop {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = find_crlf2(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head.lines().next().unwrap_or("");
            if !status.contains(" 101") {
                return Err(format!("upgrade refused: {status}").into());
            }
            let want = accept_key(&key);
            let ok = head.lines().any(|l| {
                let mut it = l.splitn(2, ':');
                let name = it.next().unwrap_or("").trim();
                name.eq_ignore_ascii_case("sec-websocket-accept")
                    && it.next().unwrap_or("").trim() == want
            });
            if !ok {
                return Err("bad Sec-WebSocket-Accept".into());
            }
            return Ok((s, buf[end..].to_vec()));
        }
        if buf.len() > 16384 {
            return Err("response headers too long".into());
        }
    }
}

/// Connect and upgrade (asking for `target`), then send call `i`'s Twilio opening (`connected`,
/// `start`) when given.
async fn dial(
    url: &Url,
    target: &str,
    i: usize,
    seed: u64,
    opening: Option<&Twilio>,
) -> Res<(Conn, Vec<u8>)> {
    let (mut s, extra) = connect(url, target, seed).await?;
    if let Some(tw) = opening {
        send(&mut s, &tw.opening(i, &mut Rng::new(seed ^ 0x0be1))).await?;
    }
    Ok((s, extra))
}

/// Open `n` connections, at most `par` handshakes at a time; connection i sends `opening`'s
/// messages for call i right after its upgrade.
async fn connect_many(
    url: Arc<Url>,
    n: usize,
    par: usize,
    opening: Option<Arc<Twilio>>,
) -> Vec<Res<(Conn, Vec<u8>)>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(par.max(1)));
    let mut hs = Vec::with_capacity(n);
    for i in 0..n {
        let url = url.clone();
        let sem = sem.clone();
        let opening = opening.clone();
        hs.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let mut last = None;
            for attempt in 0..3 {
                let seed = i as u64 * 7919 + attempt;
                match dial(&url, &url.path, i, seed, opening.as_deref()).await {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        last = Some(e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            Err(last.unwrap())
        }));
    }
    let mut out = Vec::with_capacity(n);
    for h in hs {
        out.push(h.await.unwrap());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Twilio's media streams: the messages of tests/telephony.py (opening_messages, media_message)

/// 20 ms of 8 kHz μ-law silence: one inbound media message's audio, before base64.
const MULAW_SILENCE: [u8; 160] = [0xff; 160];
const TWILIO_ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
/// How an echoed media message starts, up to its sequence number's digits.
const MEDIA_PREFIX: &[u8] = b"{\"event\":\"media\",\"sequenceNumber\":\"";
const START_PREFIX: &[u8] = b"{\"event\":\"start\"";

/// The calls of a Twilio-shaped run. Twilio's JSON has no room for a nanosecond timestamp, so
/// the sender records when it sent each media message (`sent`, by call and message number) and
/// the reader looks up the `sequenceNumber` of the echo.
struct Twilio {
    service_host: String,
    interval_ms: f64,
    payload: String,      // base64 of MULAW_SILENCE
    streams: Vec<String>, // each call's streamSid
    per_call: usize,      // media messages a call can send in the run
    sent: Vec<AtomicU64>, // send time (now_ns) of message k of call i at i * per_call + k
}

impl Twilio {
    fn new(service_host: &str, calls: usize, per_call: usize, interval_ms: f64) -> Self {
        Twilio {
            service_host: service_host.to_string(),
            interval_ms,
            payload: base64::engine::general_purpose::STANDARD.encode(MULAW_SILENCE),
            streams: (0..calls).map(|i| Self::sid("MZ", i)).collect(),
            per_call,
            sent: (0..calls * per_call).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// An id in Twilio's format: two letters and 32 hex digits, distinct per call.
    fn sid(prefix: &str, i: usize) -> String {
        let mut r = Rng::new(i as u64 + 1);
        format!("{prefix}{:016x}{:016x}", r.next(), r.next())
    }

    /// Call i's `connected` and `start` (the service host as a custom parameter), one masked
    /// text frame each, in one buffer.
    fn opening(&self, i: usize, rng: &mut Rng) -> Vec<u8> {
        let stream = Self::sid("MZ", i);
        let connected = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;
        let start = format!(
            "{{\"event\":\"start\",\"sequenceNumber\":\"1\",\"start\":{{\"accountSid\":\"{}\",\
             \"streamSid\":\"{stream}\",\"callSid\":\"{}\",\"tracks\":[\"inbound\"],\
             \"mediaFormat\":{{\"encoding\":\"audio/x-mulaw\",\"sampleRate\":8000,\"channels\":1}},\
             \"customParameters\":{{\"_pipecatCloudServiceHost\":\"{}\"}}}},\"streamSid\":\"{stream}\"}}",
            TWILIO_ACCOUNT,
            Self::sid("CA", i),
            self.service_host
        );
        let mut out = Vec::with_capacity(connected.len() + start.len() + 16);
        push_client_frame(&mut out, OP_TEXT, connected.as_bytes(), rng);
        push_client_frame(&mut out, OP_TEXT, start.as_bytes(), rng);
        out
    }

    /// Media message k (from 0) of call i: sequenceNumber k + 2 (`start` is 1), chunk k + 1,
    /// timestamp in ms since the stream began.
    fn media(&self, out: &mut Vec<u8>, i: usize, k: u64) {
        let ts = (k as f64 * self.interval_ms) as u64;
        write!(
            out,
            "{{\"event\":\"media\",\"sequenceNumber\":\"{}\",\"media\":{{\"track\":\"inbound\",\
             \"chunk\":\"{}\",\"timestamp\":\"{ts}\",\"payload\":\"{}\"}},\"streamSid\":\"{}\"}}",
            k + 2,
            k + 1,
            self.payload,
            self.streams[i]
        )
        .unwrap();
    }

    fn mark_sent(&self, i: usize, k: u64, ts: u64) {
        if (k as usize) < self.per_call {
            self.sent[i * self.per_call + k as usize].store(ts, Ordering::Release);
        }
    }

    /// When call i sent the media message whose echo begins with `head`; None for anything
    /// else (the echoes of `connected` and `start`).
    fn sent_at(&self, i: usize, head: &[u8]) -> Option<u64> {
        let rest = head.strip_prefix(MEDIA_PREFIX)?;
        let end = rest.iter().position(|b| *b == b'"')?;
        let seq: u64 = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
        let k = seq.checked_sub(2)? as usize;
        (k < self.per_call).then(|| self.sent[i * self.per_call + k].load(Ordering::Acquire))
    }
}

// ---------------------------------------------------------------------------------------------
// echo server

/// One upstream session, in the clear or over TLS (`S` a TcpStream or a server TlsStream: each
/// write is flushed, which pushes a TLS stream's records out and does nothing to a TcpStream).
async fn echo_conn<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Res<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut tmp = vec![0u8; 65536];
    // handshake
    let end = loop {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = find_crlf2(&buf) {
            break end;
        }
        if buf.len() > 16384 {
            return Err("request headers too long".into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let key = head.lines().find_map(|l| {
        let mut it = l.splitn(2, ':');
        let name = it.next()?.trim();
        if name.eq_ignore_ascii_case("sec-websocket-key") {
            Some(it.next()?.trim().to_string())
        } else {
            None
        }
    });
    let Some(key) = key else {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        s.flush().await?;
        return Ok(());
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    );
    s.write_all(resp.as_bytes()).await?;
    s.flush().await?;
    buf.drain(..end);
    let mut out: Vec<u8> = Vec::with_capacity(65536);
    loop {
        // drain every complete frame, answer them with one write
        let mut pos = 0;
        let mut closing = false;
        while let Some(f) = parse(&buf[pos..]) {
            let p0 = pos + f.hdr;
            let p1 = p0 + f.len;
            let op = if f.opcode == OP_PING {
                OP_PONG
            } else {
                f.opcode
            };
            if f.opcode != OP_PONG {
                push_header(&mut out, f.fin, op, f.len, None);
                let st = out.len();
                out.extend_from_slice(&buf[p0..p1]);
                if let Some(m) = f.mask {
                    xor_mask(&mut out[st..], m);
                }
            }
            pos = p1;
            if f.opcode == OP_CLOSE {
                closing = true;
                break;
            }
        }
        if pos > 0 {
            buf.drain(..pos);
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            s.flush().await?;
            out.clear();
        }
        if closing {
            let _ = s.shutdown().await;
            return Ok(());
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// The echo upstream on 127.0.0.1:`port`; with `--tls-cert` and `--tls-key`, wss:// (see
/// [`server_tls_config`]). Over TLS it prints one line `tls <version> <suite> <group>` to
/// stdout for each distinct set of parameters its clients negotiate.
async fn echo_server(a: &Args) -> Res<()> {
    let tls = match (a.tls_cert.is_empty(), a.tls_key.is_empty()) {
        (true, true) => None,
        (false, false) => Some(tokio_rustls::TlsAcceptor::from(server_tls_config(
            &a.tls_cert,
            &a.tls_key,
            &a.tls_suite,
        )?)),
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], a.port))).await?;
    eprintln!(
        "echo-server listening on 127.0.0.1:{}{}",
        l.local_addr()?.port(),
        if tls.is_some() { " (TLS)" } else { "" }
    );
    println!("listening {}", l.local_addr()?.port());
    std::io::stdout().flush().ok();
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    loop {
        let (s, _) = l.accept().await?;
        s.set_nodelay(true)?;
        let (tls, seen) = (tls.clone(), seen.clone());
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                let _ = echo_conn(s).await;
                return;
            };
            let Ok(t) = acceptor.accept(s).await else {
                return;
            };
            if let Ok(d) = describe_tls(t.get_ref().1) {
                if seen.lock().unwrap().insert(d.clone()) {
                    println!("tls {d}");
                    std::io::stdout().flush().ok();
                }
            }
            let _ = echo_conn(t).await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// client side: a frame reader that reports whole messages (first HEAD payload bytes + length)

/// Bytes of each message kept for the caller: a timestamp (binary), or a Twilio media message
/// up to its sequence number.
const HEAD: usize = 48;

struct MsgReader {
    buf: Vec<u8>,
    head: [u8; HEAD],
    head_len: usize,
    in_msg: bool,
}

enum Ev {
    Msg([u8; HEAD], usize),
    Ping(Vec<u8>),
    Close,
}

impl MsgReader {
    /// A reader that grows its buffer only as needed (idle sessions: many, little traffic).
    fn new_small(initial: Vec<u8>) -> Self {
        MsgReader {
            buf: initial,
            head: [0; HEAD],
            head_len: 0,
            in_msg: false,
        }
    }
    fn new(initial: Vec<u8>) -> Self {
        let mut buf = initial;
        buf.reserve(65536);
        MsgReader {
            buf,
            head: [0; HEAD],
            head_len: 0,
            in_msg: false,
        }
    }
    /// Parse all complete frames in the buffer.
    fn drain(&mut self, mut on: impl FnMut(Ev)) -> Res<()> {
        let mut pos = 0;
        while let Some(f) = parse(&self.buf[pos..]) {
            let p0 = pos + f.hdr;
            let p1 = p0 + f.len;
            let mut payload_small = [0u8; HEAD];
            let take = f.len.min(HEAD);
            payload_small[..take].copy_from_slice(&self.buf[p0..p0 + take]);
            if let Some(m) = f.mask {
                // a server must not mask, but tolerate it
                let mut tmp = self.buf[p0..p1].to_vec();
                xor_mask(&mut tmp, m);
                payload_small[..take].copy_from_slice(&tmp[..take]);
            }
            match f.opcode {
                OP_PING => on(Ev::Ping(self.buf[p0..p1].to_vec())),
                OP_PONG => {}
                OP_CLOSE => {
                    on(Ev::Close);
                }
                op => {
                    if op != OP_CONT {
                        if self.in_msg {
                            return Err("new message inside a fragmented one".into());
                        }
                        self.in_msg = true;
                        self.head_len = 0;
                    } else if !self.in_msg {
                        return Err("continuation without a message".into());
                    }
                    let room = HEAD - self.head_len;
                    let t = take.min(room);
                    self.head[self.head_len..self.head_len + t]
                        .copy_from_slice(&payload_small[..t]);
                    self.head_len += t;
                    if f.fin {
                        self.in_msg = false;
                        on(Ev::Msg(self.head, self.head_len));
                    }
                }
            }
            pos = p1;
        }
        if pos > 0 {
            self.buf.drain(..pos);
        }
        Ok(())
    }
}

/// CPU seconds so far of the relay's and upstream's processes, this process, and the machine.
fn cpu_sample(a: &Args) -> (f64, f64, f64, f64) {
    (
        sum_cpu(&a.relay_pids),
        sum_cpu(&a.upstream_pids),
        self_cpu(),
        machine_cpu(),
    )
}

/// The JSON fields every result ends with: CPU spent between two [`cpu_sample`]s (relay and
/// upstream only when their pids were given), the first error if any, and the closing brace.
fn cpu_fields(
    a: &Args,
    (r0, u0, s0, m0): (f64, f64, f64, f64),
    (r1, u1, s1, m1): (f64, f64, f64, f64),
    first_err: Option<String>,
) -> String {
    let mut o = String::new();
    if !a.relay_pids.is_empty() {
        o += &format!(",\"relay_cpu_s\":{:.3}", r1 - r0);
    }
    if !a.upstream_pids.is_empty() {
        o += &format!(",\"upstream_cpu_s\":{:.3}", u1 - u0);
    }
    o += &format!(
        ",\"loadgen_cpu_s\":{:.3},\"machine_cpu_s\":{:.3}",
        s1 - s0,
        m1 - m0
    );
    if let Some(t) = NEGOTIATED.get() {
        o += &format!(",\"tls\":{t:?}");
    }
    if let Some(e) = first_err {
        o += &format!(",\"first_error\":{:?}", e);
    }
    o + "}"
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64
}

// ---------------------------------------------------------------------------------------------
// /proc CPU sampling (so that the window is exactly the measured one)

fn clk_tck() -> f64 {
    100.0 // USER_HZ on Linux
}

/// utime+stime in seconds of one process (all its threads).
fn proc_cpu(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after ")": state(3) ... utime is field 14, stime 15 (1-based) => index 11, 12 here
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck())
}

/// Busy CPU seconds of the whole machine (all CPUs), from /proc/stat.
fn machine_cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = s.lines().next().unwrap_or("");
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 8 {
        return f64::NAN;
    }
    // user nice system idle iowait irq softirq steal: all but idle and iowait
    (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / clk_tck()
}

fn self_cpu() -> f64 {
    proc_cpu(std::process::id()).unwrap_or(f64::NAN)
}

fn sum_cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| proc_cpu(*p)).sum()
}

// ---------------------------------------------------------------------------------------------
// saturate

async fn saturate(a: &Args) -> Res<()> {
    let url = Arc::new(parse_url(&a.url)?);
    let size = a.size.max(16);
    let conns = connect_many(url, a.conns, 64, None).await;
    let mut streams = Vec::new();
    let mut errors = 0usize;
    let mut first_err = None;
    for c in conns {
        match c {
            Ok(v) => streams.push(v),
            Err(e) => {
                errors += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    if streams.is_empty() {
        return Err(format!("no connection opened: {}", first_err.unwrap_or_default()).into());
    }
    // warm-up: a short run that is not counted
    let warm = Duration::from_millis(a.warmup_ms);
    let dur = Duration::from_secs_f64(a.seconds);
    let t_warm = Instant::now();
    let start = t_warm + warm;
    let deadline = start + dur;
    let relay0 = Arc::new(std::sync::Mutex::new((0.0f64, 0.0f64, 0.0f64, 0.0f64)));
    {
        // sample CPU at the exact window start
        let relay0 = relay0.clone();
        let rp = a.relay_pids.clone();
        let up = a.upstream_pids.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            *relay0.lock().unwrap() = (sum_cpu(&rp), sum_cpu(&up), self_cpu(), machine_cpu());
        });
    }
    let mut hs = Vec::new();
    for (i, (s, extra)) in streams.into_iter().enumerate() {
        let inflight = a.inflight;
        let each = a.write_each;
        hs.push(tokio::spawn(async move {
            sat_conn(s, extra, i as u64, inflight, size, start, deadline, each).await
        }));
    }
    let mut total = 0u64;
    let mut lats: Vec<u32> = Vec::new();
    for h in hs {
        match h.await.unwrap() {
            Ok((n, l)) => {
                total += n;
                lats.extend(l);
            }
            Err(e) => {
                errors += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    let (r1, u1, s1, m1) = cpu_sample(a);
    let elapsed = Instant::now().min(deadline + Duration::from_millis(500)) - start;
    let el = elapsed.as_secs_f64().max(dur.as_secs_f64());
    let (r0, u0, s0, m0) = *relay0.lock().unwrap();
    lats.sort_unstable();
    let mut o = format!(
        "{{\"mode\":\"saturate\",\"conns\":{},\"inflight\":{},\"size\":{},\"seconds\":{:.3},\
         \"round_trips\":{},\"write\":\"{}\",\"msgs_per_s\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"errors\":{}",
        a.conns,
        a.inflight,
        size,
        el,
        total,
        if a.write_each { "each" } else { "batch" },
        total as f64 / el,
        percentile(&lats, 0.50) / 1000.0,
        percentile(&lats, 0.99) / 1000.0,
        errors
    );
    o += &cpu_fields(a, (r0, u0, s0, m0), (r1, u1, s1, m1), first_err);
    println!("{o}");
    Ok(())
}

/// One saturating connection: keep `inflight` messages outstanding; each reply sends one more.
/// Counts replies that arrive inside [start, deadline); returns (count, latencies in ns).
#[allow(clippy::too_many_arguments)]
async fn sat_conn(
    mut s: Conn,
    extra: Vec<u8>,
    id: u64,
    inflight: usize,
    size: usize,
    start: Instant,
    deadline: Instant,
    write_each: bool,
) -> Res<(u64, Vec<u32>)> {
    let mut rng = Rng::new(id + 1);
    let mut payload = vec![0u8; size];
    for (i, b) in payload.iter_mut().enumerate().skip(16) {
        *b = (i * 31 + id as usize) as u8;
    }
    let mut out = Vec::with_capacity(inflight * (size + 14));
    let start_ns = start.duration_since(*BASE.get().unwrap()).as_nanos() as u64;
    let end_ns = deadline.duration_since(*BASE.get().unwrap()).as_nanos() as u64;
    let mut seq = 0u64;
    let mut mk = |out: &mut Vec<u8>, rng: &mut Rng, seq: &mut u64| {
        payload[..8].copy_from_slice(&now_ns().to_le_bytes());
        payload[8..16].copy_from_slice(&seq.to_le_bytes());
        *seq += 1;
        push_client_frame(out, OP_BIN, &payload, rng);
    };
    for _ in 0..inflight {
        mk(&mut out, &mut rng, &mut seq);
    }
    send(&mut s, &out).await?;
    out.clear();
    let mut rd = MsgReader::new(extra);
    let mut count = 0u64;
    let mut lats = Vec::with_capacity(1 << 16);
    let mut tmp = vec![0u8; 65536];
    let mut closed = false;
    loop {
        let mut replies = 0usize;
        let mut pongs: Vec<Vec<u8>> = Vec::new();
        rd.drain(|ev| match ev {
            Ev::Msg(h, hl) => {
                replies += 1;
                if hl >= 8 {
                    let t = u64::from_le_bytes(h[..8].try_into().unwrap());
                    let now = now_ns();
                    if now >= start_ns && now < end_ns {
                        // a round trip completed inside the window
                        count += 1;
                        if t >= start_ns {
                            lats.push((now.saturating_sub(t)).min(u32::MAX as u64) as u32);
                        }
                    }
                }
            }
            Ev::Ping(p) => pongs.push(p),
            Ev::Close => closed = true,
        })?;
        if closed {
            return Err("server closed the connection".into());
        }
        for p in pongs {
            push_client_frame(&mut out, OP_PONG, &p, &mut rng);
        }
        if Instant::now() >= deadline {
            break;
        }
        if write_each {
            // one write (one TCP segment, normally) per message, as independent senders do
            if !out.is_empty() {
                send(&mut s, &out).await?;
                out.clear();
            }
            for _ in 0..replies {
                mk(&mut out, &mut rng, &mut seq);
                send(&mut s, &out).await?;
                out.clear();
            }
        } else {
            // every reply of one read answered with one write
            for _ in 0..replies {
                mk(&mut out, &mut rng, &mut seq);
            }
            if !out.is_empty() {
                send(&mut s, &out).await?;
                out.clear();
            }
        }
        let n = match tokio::time::timeout_at(deadline.into(), s.read(&mut tmp)).await {
            Ok(r) => r?,
            Err(_) => break,
        };
        if n == 0 {
            return Err("connection closed by the server".into());
        }
        rd.buf.extend_from_slice(&tmp[..n]);
    }
    // close politely, do not wait long
    out.clear();
    push_client_frame(&mut out, OP_CLOSE, &1000u16.to_be_bytes(), &mut rng);
    let _ = tokio::time::timeout(Duration::from_millis(200), send(&mut s, &out)).await;
    Ok((count, lats))
}

// ---------------------------------------------------------------------------------------------
// telephony (and twilio: the same pacing and measurement, Twilio's messages)

/// What each telephony connection sends: binary messages that carry their send time and
/// sequence number in their first 16 bytes, or a Twilio call's media messages.
#[derive(Clone)]
enum Shape {
    Binary(usize),
    Twilio(Arc<Twilio>),
}

impl Shape {
    /// Append message k of call i, sent at `ts`, as one masked client frame; `scratch` is the
    /// payload's buffer (the binary payload is filled once and keeps its tail).
    fn frame(
        &self,
        out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        i: usize,
        k: u64,
        ts: u64,
        rng: &mut Rng,
    ) {
        match self {
            Shape::Binary(size) => {
                scratch.resize(*size, 0x55);
                scratch[..8].copy_from_slice(&ts.to_le_bytes());
                scratch[8..16].copy_from_slice(&k.to_le_bytes());
                push_client_frame(out, OP_BIN, scratch, rng);
            }
            Shape::Twilio(tw) => {
                scratch.clear();
                tw.media(scratch, i, k);
                tw.mark_sent(i, k, ts);
                push_client_frame(out, OP_TEXT, scratch, rng);
            }
        }
    }

    /// The send time of the message an echo of call i begins with (None: not a measured one).
    fn sent_at(&self, i: usize, head: &[u8]) -> Option<u64> {
        match self {
            Shape::Binary(_) => Some(u64::from_le_bytes(head.get(..8)?.try_into().unwrap())),
            Shape::Twilio(tw) => tw.sent_at(i, head),
        }
    }

    /// Payload bytes of one message (Twilio's: a message from the middle of a 15 s call).
    fn size(&self) -> usize {
        match self {
            Shape::Binary(size) => *size,
            Shape::Twilio(tw) => {
                let mut m = Vec::new();
                tw.media(&mut m, 0, 375);
                m.len()
            }
        }
    }
}

async fn telephony(a: &Args) -> Res<()> {
    let url = Arc::new(parse_url(&a.url)?);
    let shape = if a.cmd == "twilio" {
        // every message a call can send in the run, warm-up included, has its slot
        let per_call = ((a.warmup_ms as f64 + a.seconds * 1000.0) / a.interval_ms) as usize + 64;
        let tw = Twilio::new(&a.service_host, a.conns, per_call, a.interval_ms);
        Shape::Twilio(Arc::new(tw))
    } else {
        Shape::Binary(a.size.max(16))
    };
    let opening = match &shape {
        Shape::Twilio(tw) => Some(tw.clone()),
        Shape::Binary(_) => None,
    };
    let conns = connect_many(url, a.conns, 64, opening).await;
    let mut streams = Vec::new(); // (call, stream, bytes read past the 101)
    let mut errors = 0usize;
    let mut first_err = None;
    for (i, c) in conns.into_iter().enumerate() {
        match c {
            Ok((s, extra)) => streams.push((i, s, extra)),
            Err(e) => {
                errors += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    if streams.is_empty() {
        return Err(format!("no connection opened: {}", first_err.unwrap_or_default()).into());
    }
    let interval = Duration::from_secs_f64(a.interval_ms / 1000.0);
    let warm = Duration::from_millis(a.warmup_ms);
    let t0 = Instant::now() + Duration::from_millis(50);
    let start = t0 + warm; // latencies of messages sent from here on are recorded
    let stop = start + Duration::from_secs_f64(a.seconds); // no send from here on
    let drain = Duration::from_millis(a.drain_ms);
    let n = streams.len();
    let relay0 = Arc::new(std::sync::Mutex::new((0.0f64, 0.0f64, 0.0f64, 0.0f64)));
    {
        let relay0 = relay0.clone();
        let rp = a.relay_pids.clone();
        let up = a.upstream_pids.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            *relay0.lock().unwrap() = (sum_cpu(&rp), sum_cpu(&up), self_cpu(), machine_cpu());
        });
    }
    let stop_sample = Arc::new(std::sync::Mutex::new(None));
    {
        let stop_sample = stop_sample.clone();
        let rp = a.relay_pids.clone();
        let up = a.upstream_pids.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(stop.into()).await;
            *stop_sample.lock().unwrap() =
                Some((sum_cpu(&rp), sum_cpu(&up), self_cpu(), machine_cpu()));
        });
    }
    // Readers run on the runtime; all sends come from one paced OS thread that writes to a
    // dup of each socket at its exact slot: connection i sends at t0 + (i/n + k) * interval.
    // (tokio's timer wheel has 1 ms resolution, so per-connection intervals would fire in
    // clumps of n*1ms/interval messages; pacing keeps the offered load smooth.)
    //
    // The sender writes to the reader's own descriptor (not a dup: one descriptor per
    // connection, so 10,000 connections fit a 20,000 file limit). Each reader task hands its
    // socket back when done, and the sockets are closed only once the sender has stopped, so no
    // descriptor the sender writes to is closed (or reused) under it.
    //
    // Over TLS (wss://) the stream is taken apart after its upgrade: the socket stays with the
    // reader, and the rustls connection is shared by the reader (which decrypts) and the sender
    // (which encrypts each message into one record and writes it on the same descriptor), each
    // holding its lock only for that. TLS 1.3 keys each direction on its own, so neither waits
    // on the other beyond the lock.
    let pace = Duration::from_micros(a.pace_us);
    let mut writers = Vec::with_capacity(n);
    let mut hs = Vec::with_capacity(n);
    for (i, s, extra) in streams {
        let (s, tls) = match s {
            Conn::Plain(s) => (s, None),
            Conn::Tls(t) => {
                let (s, mut c) = t.into_inner();
                // the sender keeps what the socket cannot take now in rustls's buffer, as it
                // keeps it in its own in the clear: no limit, so a message is never refused
                c.set_buffer_limit(None);
                (s, Some(Arc::new(std::sync::Mutex::new(c))))
            }
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
        // SAFETY: `fd` is the reader's open socket; it stays open until every reader's socket
        // is dropped below, after the sender thread has been joined. ManuallyDrop: the writer
        // never closes it.
        let w = std::mem::ManuallyDrop::new(unsafe {
            <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd)
        });
        writers.push((i, PacedOut::new(w, tls.clone())));
        let shape = shape.clone();
        hs.push(tokio::spawn(async move {
            let mut s = TelIo { tcp: s, tls };
            let r = tel_reader(&mut s, extra, i, shape, start, stop, stop + drain).await;
            (s, r)
        }));
    }
    let size = shape.size();
    let sender =
        std::thread::spawn(move || tel_sender(writers, shape, t0, interval, start, stop, pace));
    let mut lats: Vec<u32> = Vec::new();
    let mut recv_counted = 0u64;
    let mut sockets = Vec::with_capacity(n);
    for h in hs {
        let (s, r) = h.await.unwrap();
        sockets.push(s);
        match r {
            Ok((rc, l)) => {
                recv_counted += rc;
                lats.extend(l);
            }
            Err(e) => {
                errors += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    let st = sender.join().unwrap();
    drop(sockets); // the sender is done with their descriptors
    if let Some(e) = st.error {
        errors += 1;
        first_err.get_or_insert(e);
    }
    let (r0, u0, s0, m0) = *relay0.lock().unwrap();
    let at_stop = *stop_sample.lock().unwrap();
    let (r1, u1, s1, m1) = at_stop.unwrap_or_else(|| {
        (
            sum_cpu(&a.relay_pids),
            sum_cpu(&a.upstream_pids),
            self_cpu(),
            machine_cpu(),
        )
    });
    lats.sort_unstable();
    let mut o = format!(
        "{{\"mode\":\"{}\",\"conns\":{},\"size\":{},\"interval_ms\":{},\"seconds\":{:.3},\
         \"sent\":{},\"received\":{},\"lost\":{},\"late_sends\":{},\"blocked_sends\":{},\
         \"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\
         \"errors\":{}",
        a.cmd,
        a.conns,
        size,
        a.interval_ms,
        a.seconds,
        st.counted,
        recv_counted,
        st.counted.saturating_sub(recv_counted),
        st.late,
        st.blocked,
        percentile(&lats, 0.50) / 1000.0,
        percentile(&lats, 0.90) / 1000.0,
        percentile(&lats, 0.99) / 1000.0,
        percentile(&lats, 0.999) / 1000.0,
        lats.last().map(|v| *v as f64).unwrap_or(f64::NAN) / 1000.0,
        errors
    );
    o += &cpu_fields(a, (r0, u0, s0, m0), (r1, u1, s1, m1), first_err);
    println!("{o}");
    Ok(())
}

/// One connection as the paced sender sees it: its descriptor, and its TLS state when it is
/// wss:// (shared with its reader). A frame the socket cannot take now waits for the next slot:
/// in `pending` in the clear, in rustls's outgoing buffer (already encrypted) over TLS.
struct PacedOut {
    w: std::mem::ManuallyDrop<std::net::TcpStream>,
    tls: Option<Arc<std::sync::Mutex<rustls::ClientConnection>>>,
    pending: Vec<u8>,
}

impl PacedOut {
    fn new(
        w: std::mem::ManuallyDrop<std::net::TcpStream>,
        tls: Option<Arc<std::sync::Mutex<rustls::ClientConnection>>>,
    ) -> Self {
        PacedOut {
            w,
            tls,
            pending: Vec::new(),
        }
    }

    /// Queue `frame` and write what the socket takes now (non-blocking). Ok(true) when an
    /// earlier frame was still waiting: the socket had been full.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        use std::io::ErrorKind;
        let w: &mut std::net::TcpStream = &mut self.w;
        let Some(tls) = &self.tls else {
            let blocked = !self.pending.is_empty();
            self.pending.extend_from_slice(frame);
            while !self.pending.is_empty() {
                match w.write(&self.pending) {
                    Ok(k) => {
                        self.pending.drain(..k);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.pending.clear();
                        return Err(e);
                    }
                }
            }
            return Ok(blocked);
        };
        let mut c = tls.lock().unwrap();
        let blocked = c.wants_write();
        // one record (the buffer has no limit, so all of it is taken)
        c.writer().write_all(frame)?;
        while c.wants_write() {
            match c.write_tls(w) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(blocked)
    }
}

/// A telephony reader's connection: the socket, and its TLS state when it is wss:// (shared
/// with the paced sender, which writes).
struct TelIo {
    tcp: TcpStream,
    tls: Option<Arc<std::sync::Mutex<rustls::ClientConnection>>>,
}

/// `Read` on a tokio socket without waiting (rustls's `read_tls` takes a `Read`).
struct TryRead<'a>(&'a TcpStream);
impl std::io::Read for TryRead<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(b)
    }
}

/// `Write` on a tokio socket without waiting.
struct TryWrite<'a>(&'a TcpStream);
impl std::io::Write for TryWrite<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TelIo {
    /// Read what has arrived (decrypted over TLS); Ok(0) when the peer has closed.
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::{ErrorKind, Read as _};
        let Some(tls) = &self.tls else {
            return self.tcp.read(buf).await;
        };
        loop {
            {
                let mut c = tls.lock().unwrap();
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    // closed without close_notify: as a TCP close in the clear
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
            }
            self.tcp.readable().await?;
            let mut c = tls.lock().unwrap();
            match c.read_tls(&mut TryRead(&self.tcp)) {
                Ok(_) => {
                    // on Ok(0) (end of stream) the reader says so next time round
                    c.process_new_packets()
                        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Send `b` (the close frame) if the socket takes it now; the caller does not wait.
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        let Some(tls) = &self.tls else {
            return self.tcp.write_all(b).await;
        };
        let mut c = tls.lock().unwrap();
        c.writer().write_all(b)?;
        while c.wants_write() {
            c.write_tls(&mut TryWrite(&self.tcp))?;
        }
        Ok(())
    }
}

struct SenderStats {
    counted: u64,
    late: u64,
    blocked: u64,
    error: Option<String>,
}

/// The paced sender: one thread, a slot every interval/n, a nanosleep between slots. `ws` holds
/// each connection's call number and socket.
fn tel_sender(
    mut ws: Vec<(usize, PacedOut)>,
    shape: Shape,
    t0: Instant,
    interval: Duration,
    start: Instant,
    stop: Instant,
    pace: Duration,
) -> SenderStats {
    // default timer slack is 50 us; ask for 1 us so the slots keep their spacing
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64, 0u64, 0u64, 0u64);
    }
    let n = ws.len();
    let slot = interval.as_secs_f64() / n as f64;
    let start_ns = start.duration_since(*BASE.get().unwrap()).as_nanos() as u64;
    let stop_ns = stop.duration_since(*BASE.get().unwrap()).as_nanos() as u64;
    let mut rng = Rng::new(0x7e1e);
    let mut payload = Vec::with_capacity(1024);
    let mut seq = vec![0u64; n];
    let mut st = SenderStats {
        counted: 0,
        late: 0,
        blocked: 0,
        error: None,
    };
    let mut frame = Vec::with_capacity(1024);
    let mut j: u64 = 0;
    loop {
        let due = t0 + Duration::from_secs_f64(slot * j as f64);
        if due >= stop {
            break;
        }
        let now = Instant::now();
        if due > now {
            // sleep at least `pace`: slots closer than that go out together (bounded clumps,
            // far fewer wake-ups than one per slot)
            std::thread::sleep((due - now).max(pace));
        } else if now - due > interval / 2 {
            st.late += 1;
        }
        let i = (j % n as u64) as usize;
        j += 1;
        let ts = now_ns();
        frame.clear();
        shape.frame(&mut frame, &mut payload, ws[i].0, seq[i], ts, &mut rng);
        seq[i] += 1;
        if ts >= start_ns && ts < stop_ns {
            st.counted += 1; // the readers count the same window
        }
        // a socket that cannot take the frame now keeps it for its next slot
        match ws[i].1.send(&frame) {
            Ok(blocked) => st.blocked += blocked as u64,
            Err(e) => {
                st.error.get_or_insert(format!("send: {e}"));
            }
        }
    }
    // the readers send the close frames at their own deadline
    st
}

/// Reads one connection's (call i's) echoes: counts those sent in [start, stop) and their
/// latency.
async fn tel_reader(
    r: &mut TelIo,
    extra: Vec<u8>,
    i: usize,
    shape: Shape,
    start: Instant,
    stop: Instant,
    end: Instant,
) -> Res<(u64, Vec<u32>)> {
    let start_ns = start.duration_since(*BASE.get().unwrap()).as_nanos() as u64;
    let stop_ns = stop.duration_since(*BASE.get().unwrap()).as_nanos() as u64;
    let mut rd = MsgReader::new(extra);
    let mut lats = Vec::with_capacity(4096);
    let mut received = 0u64;
    let mut tmp = vec![0u8; 16384];
    let mut closed = false;
    loop {
        rd.drain(|ev| match ev {
            Ev::Msg(h, hl) => {
                if let Some(t) = shape.sent_at(i, &h[..hl]) {
                    if t >= start_ns && t < stop_ns {
                        received += 1;
                        lats.push(now_ns().saturating_sub(t).min(u32::MAX as u64) as u32);
                    }
                }
            }
            Ev::Ping(_) => {} // none of the relays pings; pings are not answered here
            Ev::Close => closed = true,
        })?;
        if closed {
            break;
        }
        let n = match tokio::time::timeout_at(end.into(), r.read(&mut tmp)).await {
            Ok(r) => r?,
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        rd.buf.extend_from_slice(&tmp[..n]);
    }
    if !closed {
        let mut rng = Rng::new(now_ns());
        let mut out = Vec::new();
        push_client_frame(&mut out, OP_CLOSE, &1000u16.to_be_bytes(), &mut rng);
        let _ = tokio::time::timeout(Duration::from_millis(200), r.write_all(&out)).await;
    } else {
        return Err(format!("server closed the connection early ({received} received)").into());
    }
    Ok((received, lats))
}

// ---------------------------------------------------------------------------------------------
// opens

/// `--conns` sessions, `--parallel` at a time, after `--warmup-opens` that are not counted. Each
/// connects, upgrades, sends Twilio's `connected` and `start` and waits for the echo of `start`:
/// its open time, the same bytes and the same wait on every endpoint (through /ws/twilio the
/// bot is dialled after `start`, through /ws/generic before the 101). Then it closes (1000) and
/// waits for the close to come back, so the relay's CPU over the window is what a session
/// costs it from accept to close.
///
/// `--tokens FILE`: one token per line (blank lines skipped), for a token agent; open i (the
/// warm-up's from 0, the measured ones from `--warmup-opens` on) appends `token=<line i>` to its
/// query, as is (no percent-encoding: tokens are base64url and dots). Each token opens one
/// session, so the file must hold at least `--warmup-opens` + `--conns` of them.
async fn opens(a: &Args) -> Res<()> {
    let url = Arc::new(parse_url(&a.url)?);
    let tw = Arc::new(Twilio::new(&a.service_host, 0, 0, a.interval_ms));
    let tokens = if a.tokens.is_empty() {
        None
    } else {
        let text = std::fs::read_to_string(&a.tokens)
            .map_err(|e| format!("--tokens {}: {e}", a.tokens))?;
        let lines: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let need = a.warmup_opens + a.conns;
        if lines.len() < need {
            return Err(format!(
                "--tokens {}: {} tokens, but {} warm-up + {} measured opens need {need} \
                 (one per open)",
                a.tokens,
                lines.len(),
                a.warmup_opens,
                a.conns
            )
            .into());
        }
        Some(Arc::new(lines))
    };
    let tk = &tokens;
    let (_, werr, wfirst) = open_many(&url, &tw, tk, 0, a.warmup_opens, a.parallel).await;
    if werr == a.warmup_opens && werr > 0 {
        return Err(format!("every warm-up open failed: {}", wfirst.unwrap_or_default()).into());
    }
    let (r0, u0, s0, m0) = cpu_sample(a);
    let t0 = Instant::now();
    let (mut lats, errors, first_err) =
        open_many(&url, &tw, tk, a.warmup_opens, a.conns, a.parallel).await;
    let el = t0.elapsed().as_secs_f64();
    let (r1, u1, s1, m1) = cpu_sample(a);
    lats.sort_unstable();
    let mut o = format!(
        "{{\"mode\":\"opens\",\"opens\":{},\"parallel\":{},\"seconds\":{:.3},\"opened\":{},\
         \"opens_per_s\":{:.1},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\
         \"errors\":{}",
        a.conns,
        a.parallel,
        el,
        lats.len(),
        lats.len() as f64 / el,
        percentile(&lats, 0.50) / 1000.0,
        percentile(&lats, 0.90) / 1000.0,
        percentile(&lats, 0.99) / 1000.0,
        lats.last().map(|v| *v as f64).unwrap_or(f64::NAN) / 1000.0,
        errors
    );
    o += &cpu_fields(a, (r0, u0, s0, m0), (r1, u1, s1, m1), first_err);
    println!("{o}");
    Ok(())
}

/// Calls `first..first + n`, opened and closed on `par` workers, call i with token i when
/// `tokens` are given; (open times in ns, errors, the first error).
async fn open_many(
    url: &Arc<Url>,
    tw: &Arc<Twilio>,
    tokens: &Option<Arc<Vec<String>>>,
    first: usize,
    n: usize,
    par: usize,
) -> (Vec<u32>, usize, Option<String>) {
    let next = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::with_capacity(par);
    for _ in 0..par.max(1) {
        let (url, tw, next, tokens) = (url.clone(), tw.clone(), next.clone(), tokens.clone());
        hs.push(tokio::spawn(async move {
            let mut lats = Vec::new();
            let mut errors = 0usize;
            let mut first_err = None;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                if k >= n {
                    break;
                }
                let i = first + k;
                // the request target: the URL's, or with `token=<token i>` appended to its query
                let target = match &tokens {
                    None => std::borrow::Cow::Borrowed(url.path.as_str()),
                    Some(t) => std::borrow::Cow::Owned(with_token(&url.path, &t[i])),
                };
                match open_one(&url, &target, &tw, i).await {
                    Ok(l) => lats.push(l),
                    Err(e) => {
                        errors += 1;
                        first_err.get_or_insert(e.to_string());
                    }
                }
            }
            (lats, errors, first_err)
        }));
    }
    let mut out = (Vec::with_capacity(n), 0, None);
    for h in hs {
        let (l, e, f) = h.await.unwrap();
        out.0.extend(l);
        out.1 += e;
        if out.2.is_none() {
            out.2 = f;
        }
    }
    out
}

/// `path` (a request target) with `token=<token>` added to its query.
fn with_token(path: &str, token: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}token={token}")
}

/// One session (asking for `target`): open time (connect to the echo of `start`, in ns), then
/// a polite close.
async fn open_one(url: &Url, target: &str, tw: &Twilio, i: usize) -> Res<u32> {
    let t = now_ns();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut s, extra) = dial(url, target, i, i as u64 * 7919, Some(tw)).await?;
    let mut rd = MsgReader::new(extra);
    let mut tmp = vec![0u8; 4096];
    let mut open_ns = None;
    let mut closed = false;
    let mut rng = Rng::new(i as u64 + 3);
    let mut out = Vec::new();
    loop {
        rd.drain(|ev| match ev {
            Ev::Msg(h, hl) => {
                if open_ns.is_none() && h[..hl].starts_with(START_PREFIX) {
                    open_ns = Some(now_ns() - t);
                }
            }
            Ev::Ping(_) => {}
            Ev::Close => closed = true,
        })?;
        if closed && open_ns.is_none() {
            return Err("closed before the echo of start".into());
        }
        if closed {
            break; // the server closed first: nothing left to wait for
        }
        if open_ns.is_some() && out.is_empty() {
            push_client_frame(&mut out, OP_CLOSE, &1000u16.to_be_bytes(), &mut rng);
            send(&mut s, &out).await?;
        }
        let n = match tokio::time::timeout_at(deadline.into(), s.read(&mut tmp)).await {
            Ok(r) => r?,
            Err(_) => return Err("timed out".into()),
        };
        if n == 0 {
            if open_ns.is_none() {
                return Err("connection closed before the echo of start".into());
            }
            break;
        }
        rd.buf.extend_from_slice(&tmp[..n]);
    }
    Ok(open_ns.unwrap().min(u32::MAX as u64) as u32)
}

// ---------------------------------------------------------------------------------------------
// idle

async fn idle(a: &Args) -> Res<()> {
    let url = Arc::new(parse_url(&a.url)?);
    let conns = connect_many(url, a.conns, a.parallel, None).await;
    let mut open = 0usize;
    let mut failed = 0usize;
    let mut first_err = None;
    let closed = Arc::new(AtomicU64::new(0));
    // --messages K: each session first sends K binary messages of --size bytes and waits for
    // their echoes ("relay a little"), so buffers have been used before the sessions idle
    let want = a.messages;
    let relayed = Arc::new(AtomicU64::new(0));
    let all_relayed = Arc::new(tokio::sync::Notify::new());
    let mut rng = Rng::new(0x1d1e);
    let payload = vec![0x5au8; a.size];
    let mut writers = Vec::new();
    for c in conns {
        match c {
            Ok((s, extra)) => {
                open += 1;
                let closed = closed.clone();
                let (mut r, mut w) = tokio::io::split(s);
                if want > 0 {
                    let mut out = Vec::with_capacity(want * (a.size + 14));
                    for _ in 0..want {
                        push_client_frame(&mut out, OP_BIN, &payload, &mut rng);
                    }
                    if let Err(e) = async {
                        w.write_all(&out).await?;
                        w.flush().await
                    }
                    .await
                    {
                        first_err.get_or_insert(e.to_string());
                    }
                }
                writers.push(w);
                let (relayed, all_relayed) = (relayed.clone(), all_relayed.clone());
                // read whatever arrives, so pings and closes are seen; count the echoes first
                tokio::spawn(async move {
                    let mut rd = MsgReader::new_small(extra);
                    let mut got = 0usize;
                    let mut tmp = [0u8; 512];
                    loop {
                        if got < want {
                            let mut msgs = 0;
                            if rd
                                .drain(|ev| msgs += matches!(ev, Ev::Msg(..)) as usize)
                                .is_ok()
                            {
                                got += msgs;
                                if got >= want {
                                    relayed.fetch_add(1, Ordering::Relaxed);
                                    all_relayed.notify_one();
                                }
                            }
                        } else {
                            rd.buf.clear();
                        }
                        match r.read(&mut tmp).await {
                            Ok(0) | Err(_) => {
                                closed.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            Ok(n) => rd.buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                });
            }
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    if want > 0 {
        // every open session's echoes, or give up after 60 s (counted in the ready line)
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (relayed.load(Ordering::Relaxed) as usize) < open {
            if tokio::time::timeout_at(deadline, all_relayed.notified())
                .await
                .is_err()
            {
                break;
            }
        }
    }
    if let Some(e) = &first_err {
        eprintln!("idle: {failed} connections failed; first error: {e}");
    }
    let relayed = relayed.load(Ordering::Relaxed);
    println!("ready open={open} failed={failed} relayed={relayed}");
    std::io::stdout().flush().ok();
    // hold until stdin closes
    let mut stdin = tokio::io::stdin();
    let mut b = [0u8; 256];
    loop {
        match stdin.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let lost = closed.load(Ordering::Relaxed);
    let mut rng = Rng::new(99);
    for mut w in writers {
        let mut out = Vec::new();
        push_client_frame(&mut out, OP_CLOSE, &1000u16.to_be_bytes(), &mut rng);
        let close = async {
            w.write_all(&out).await?;
            w.flush().await
        };
        let _ = tokio::time::timeout(Duration::from_millis(20), close).await;
    }
    println!(
        "{{\"mode\":\"idle\",\"open\":{open},\"failed\":{failed},\"relayed\":{relayed},\
         \"closed_while_idle\":{lost}}}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// arguments

#[derive(Clone)]
struct Args {
    cmd: String,
    url: String,
    port: u16,
    conns: usize,
    inflight: usize,
    size: usize,
    seconds: f64,
    interval_ms: f64,
    warmup_ms: u64,
    drain_ms: u64,
    threads: usize,
    parallel: usize,
    pace_us: u64,
    write_each: bool,
    service_host: String,
    warmup_opens: usize,
    messages: usize,
    relay_pids: Vec<u32>,
    upstream_pids: Vec<u32>,
    ca_file: String,
    tls_suite: String,
    /// opens: a file of tokens, one per open (empty: none)
    tokens: String,
    /// echo-server: serve wss:// with this PEM chain and key (empty: plain ws://)
    tls_cert: String,
    tls_key: String,
}

fn usage() -> ! {
    eprintln!(
        "usage:
  loadgen echo-server --port P [--threads N] [--tls-cert CHAIN.pem --tls-key KEY.pem]
                    (--tls-*: wss://, the one suite of --tls-suite, no resumption; prints
                    \"tls <version> <suite> <group>\" once per distinct negotiation)
  loadgen saturate  --url U [--conns 32] [--inflight 8] [--size 256] [--seconds 10] [--warmup-ms 1000]
                    [--write batch|each] (batch: the replies of one read answered with one write)
  loadgen telephony --url U [--conns 500] [--size 320] [--interval-ms 20] [--seconds 10] [--warmup-ms 1000] [--drain-ms 1000] [--pace-us 100]
  loadgen twilio    --url U [--service-host echo.bench] [telephony's options but --size]
                    (each call sends Twilio's connected and start, then 160 B of μ-law per interval
                    as JSON media messages)
  loadgen opens     --url U [--conns 2000] [--parallel 64] [--warmup-opens 100] [--service-host echo.bench]
                    [--tokens FILE]
                    (each session: upgrade, Twilio's connected and start, their echo, close;
                    --tokens: one token per line, open i (warm-up's first) adds token=<line i>
                    to the URL's query; at least --warmup-opens + --conns lines)
  loadgen idle      --url U [--conns 2000] [--parallel 64] [--messages 0] [--size 256]
                    (--messages K: each session sends K binary messages of --size bytes and
                    waits for their echoes before \"ready\"; the line counts them: relayed=N)
common: [--threads N] (runtime worker threads, default 1)
        [--ca-file CA.pem] (wss:// URLs: trust only this CA) [--tls-suite TLS13_AES_128_GCM_SHA256]
        (the one cipher suite offered, by its rustls name; no resumption: full handshakes)
        [--relay-pids P,P..] [--upstream-pids P,..] (all but idle: CPU seconds of these
        processes over the measured window, from /proc/PID/stat)"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        usage();
    }
    let mut a = Args {
        cmd: argv[0].clone(),
        url: String::new(),
        port: 0,
        conns: 0,
        inflight: 8,
        size: 0,
        seconds: 10.0,
        interval_ms: 20.0,
        warmup_ms: 1000,
        drain_ms: 1000,
        threads: 1,
        parallel: 64,
        pace_us: 100,
        write_each: false,
        service_host: "echo.bench".to_string(),
        warmup_opens: 100,
        messages: 0,
        relay_pids: vec![],
        upstream_pids: vec![],
        ca_file: String::new(),
        tls_suite: "TLS13_AES_128_GCM_SHA256".to_string(),
        tokens: String::new(),
        tls_cert: String::new(),
        tls_key: String::new(),
    };
    let mut kv: HashMap<String, String> = HashMap::new();
    let mut i = 1;
    while i < argv.len() {
        let k = argv[i].trim_start_matches("--").to_string();
        let v = argv.get(i + 1).cloned().unwrap_or_else(|| usage());
        kv.insert(k, v);
        i += 2;
    }
    let pids = |s: &str| -> Vec<u32> {
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().unwrap_or_else(|_| usage()))
            .collect()
    };
    for (k, v) in kv {
        match k.as_str() {
            "url" => a.url = v,
            "port" => a.port = v.parse().unwrap_or_else(|_| usage()),
            "conns" => a.conns = v.parse().unwrap_or_else(|_| usage()),
            "inflight" => a.inflight = v.parse().unwrap_or_else(|_| usage()),
            "size" => a.size = v.parse().unwrap_or_else(|_| usage()),
            "seconds" => a.seconds = v.parse().unwrap_or_else(|_| usage()),
            "interval-ms" => a.interval_ms = v.parse().unwrap_or_else(|_| usage()),
            "warmup-ms" => a.warmup_ms = v.parse().unwrap_or_else(|_| usage()),
            "drain-ms" => a.drain_ms = v.parse().unwrap_or_else(|_| usage()),
            "threads" => a.threads = v.parse().unwrap_or_else(|_| usage()),
            "write" => {
                a.write_each = match v.as_str() {
                    "each" => true,
                    "batch" => false,
                    _ => usage(),
                }
            }
            "pace-us" => a.pace_us = v.parse().unwrap_or_else(|_| usage()),
            "parallel" => a.parallel = v.parse().unwrap_or_else(|_| usage()),
            "service-host" => a.service_host = v,
            "warmup-opens" => a.warmup_opens = v.parse().unwrap_or_else(|_| usage()),
            "messages" => a.messages = v.parse().unwrap_or_else(|_| usage()),
            "relay-pids" => a.relay_pids = pids(&v),
            "upstream-pids" => a.upstream_pids = pids(&v),
            "ca-file" => a.ca_file = v,
            "tls-suite" => a.tls_suite = v,
            "tokens" => a.tokens = v,
            "tls-cert" => a.tls_cert = v,
            "tls-key" => a.tls_key = v,
            _ => {
                eprintln!("unknown option --{k}");
                usage()
            }
        }
    }
    match a.cmd.as_str() {
        "saturate" => {
            a.conns = if a.conns == 0 { 32 } else { a.conns };
            a.size = if a.size == 0 { 256 } else { a.size };
        }
        "telephony" | "twilio" => {
            a.conns = if a.conns == 0 { 500 } else { a.conns };
            a.size = if a.size == 0 { 320 } else { a.size };
        }
        "idle" | "opens" => {
            a.conns = if a.conns == 0 { 2000 } else { a.conns };
            a.size = if a.size == 0 { 256 } else { a.size };
        }
        "echo-server" => {}
        _ => usage(),
    }
    if (!a.tls_cert.is_empty() || !a.tls_key.is_empty()) && a.cmd != "echo-server" {
        eprintln!("--tls-cert and --tls-key are options of echo-server only");
        usage();
    }
    if a.cmd != "echo-server" && a.url.is_empty() {
        usage();
    }
    if !a.tokens.is_empty() && a.cmd != "opens" {
        eprintln!("--tokens is an option of opens only");
        usage();
    }
    a
}

fn main() {
    let a = parse_args();
    BASE.get_or_init(Instant::now);
    let tls = if a.ca_file.is_empty() {
        None
    } else {
        match tls_config(&a.ca_file, &a.tls_suite) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("loadgen: {e}");
                std::process::exit(2)
            }
        }
    };
    let _ = TLS.set(tls);
    let rt = if a.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let r = rt.block_on(async {
        match a.cmd.as_str() {
            "echo-server" => echo_server(&a).await,
            "saturate" => saturate(&a).await,
            "telephony" | "twilio" => telephony(&a).await,
            "opens" => opens(&a).await,
            "idle" => idle(&a).await,
            _ => unreachable!(),
        }
    });
    if let Err(e) = r {
        eprintln!("loadgen {}: {e}", a.cmd);
        std::process::exit(1);
    }
    // do not wait for lingering tasks
    std::process::exit(0);
}
