//! Sockets handed over by the control plane, made ready for a relay thread: non-blocking first (a
//! blocking fd would stall the thread), Nagle off (small audio frames must not wait for ACKs), and
//! dead-peer detection by the kernel (TCP keepalive and `TCP_USER_TIMEOUT`), which costs nothing
//! per message, unlike pings of our own.

use std::io;
use std::time::Duration;

use crate::stream::Stream;
use crate::tls::Tls;

/// Makes a handed-over socket ready for a relay thread: non-blocking first (a blocking fd would
/// stall the thread), Nagle off (small audio frames must not wait for ACKs), dead-peer detection
/// on; with the TLS connection the control plane began on it, if any.
pub(crate) fn adopt(
    s: std::net::TcpStream,
    tls: Option<Tls>,
    dead_peer_timeout: Duration,
) -> io::Result<Stream> {
    prepare(&s, dead_peer_timeout)?;
    Ok(match tls {
        Some(tls) => Stream::tls(s, tls),
        None => Stream::plain(s),
    })
}

/// Non-blocking, Nagle off, dead-peer detection on (see [`adopt`]).
pub(crate) fn prepare(s: &std::net::TcpStream, dead_peer_timeout: Duration) -> io::Result<()> {
    s.set_nonblocking(true)?;
    options(&socket2::SockRef::from(s), dead_peer_timeout)
}

/// Nagle off and dead-peer detection on: the options a relayed socket needs besides being
/// non-blocking. Set on a listening socket, every socket it accepts has them already (Linux
/// copies them to the accepted socket), so the engine sets them once per listener, not per
/// session.
pub(crate) fn options(sock: &socket2::SockRef<'_>, dead_peer_timeout: Duration) -> io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    // Half the budget idle, then three probes spread over the other half.
    let probes = 3;
    let interval = (dead_peer_timeout / 2 / probes).max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time((dead_peer_timeout / 2).max(Duration::from_secs(1)))
        .with_interval(interval)
        .with_retries(probes);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(dead_peer_timeout))?;
    Ok(())
}
