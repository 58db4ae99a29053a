//! Sockets handed over by the control plane, taken into tokio: non-blocking first (a blocking fd
//! would stall a worker thread), Nagle off (small audio frames must not wait for ACKs), and
//! dead-peer detection by the kernel (TCP keepalive and `TCP_USER_TIMEOUT`), which costs nothing
//! per message, unlike pings of our own.

use std::io;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::stream::Stream;
use crate::tls::Tls;

/// Takes a handed-over socket into tokio: non-blocking first (a blocking fd would stall a worker
/// thread), Nagle off (small audio frames must not wait for ACKs), dead-peer detection on; with
/// the TLS connection the control plane began on it, if any.
pub(crate) fn adopt(
    s: std::net::TcpStream,
    tls: Option<Tls>,
    dead_peer_timeout: Duration,
) -> io::Result<Stream> {
    prepare(&s, dead_peer_timeout)?;
    // Raw readiness (not tokio's TcpStream) so a pump can drop readiness after a short read,
    // sparing the read that would only return EAGAIN.
    // SAFETY: the AsyncFd owns `s`, an open socket whose descriptor stays the same and open
    // until the AsyncFd is dropped (nothing else holds it: Python detached it).
    let fd = unsafe { AsyncFd::register(s) }.map_err(|e| e.into_parts().1)?;
    Ok(match tls {
        Some(tls) => Stream::tls(fd, tls),
        None => Stream::plain(fd),
    })
}

fn prepare(s: &std::net::TcpStream, dead_peer_timeout: Duration) -> io::Result<()> {
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    let sock = socket2::SockRef::from(s);
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
