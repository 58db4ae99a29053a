//! Sockets handed over by the control plane, made ready for a relay thread: non-blocking first (a
//! blocking fd would stall the thread), Nagle off (small audio frames must not wait for ACKs), and
//! dead-peer detection by the kernel (TCP keepalive and `TCP_USER_TIMEOUT`), which costs nothing
//! per message, unlike pings of our own.

use std::io;
use std::net::{IpAddr, SocketAddr};
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
    dead_peer_detection(sock, dead_peer_timeout)
}

/// The options of a socket the engine dialled to `peer` (see [`options`]), without keepalive
/// for a peer on loopback: probes to our own host are answered by our own kernel, whether the
/// bot process is alive, hung, or a forwarder whose far end is gone, so they detect nothing
/// there. `TCP_USER_TIMEOUT` stays: a peer that stops reading fills the window, and that is
/// detected on loopback too. Four system calls fewer on an open (benches/README.md, "Session
/// opens, round 10"). A loopback address DNAT'ed to another host (`route_localnet`) loses idle
/// detection: name such a bot by its own address.
pub(crate) fn dialled_options(
    sock: &socket2::SockRef<'_>,
    peer: SocketAddr,
    dead_peer_timeout: Duration,
) -> io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    if probes_can_fail(peer) {
        keepalive(sock, dead_peer_timeout)?;
    }
    user_timeout(sock, dead_peer_timeout)
}

/// Whether keepalive probes to `peer` can go unanswered (see [`dialled_options`]).
fn probes_can_fail(peer: SocketAddr) -> bool {
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        ip => ip,
    };
    !ip.is_loopback()
}

/// TCP keepalive while idle and `TCP_USER_TIMEOUT` while data waits for an ACK, both within
/// `dead_peer_timeout`.
fn dead_peer_detection(sock: &socket2::SockRef<'_>, dead_peer_timeout: Duration) -> io::Result<()> {
    keepalive(sock, dead_peer_timeout)?;
    user_timeout(sock, dead_peer_timeout)
}

/// Probes after half of `dead_peer_timeout` idle, three of them over the other half.
fn keepalive(sock: &socket2::SockRef<'_>, dead_peer_timeout: Duration) -> io::Result<()> {
    let probes = 3;
    let interval = (dead_peer_timeout / 2 / probes).max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time((dead_peer_timeout / 2).max(Duration::from_secs(1)))
        .with_interval(interval)
        .with_retries(probes);
    sock.set_tcp_keepalive(&keepalive)
}

/// Unacknowledged data for `dead_peer_timeout` ends the connection (Linux).
fn user_timeout(sock: &socket2::SockRef<'_>, dead_peer_timeout: Duration) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(dead_peer_timeout))?;
    #[cfg(not(target_os = "linux"))]
    let _ = (sock, dead_peer_timeout);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_probes_to_another_host_can_go_unanswered() {
        for (peer, needs) in [
            ("127.0.0.1:80", false),
            ("127.3.2.1:80", false),
            ("[::1]:80", false),
            ("[::ffff:127.0.0.1]:80", false),
            ("10.0.0.2:80", true),
            ("[2001:db8::1]:80", true),
            ("[::ffff:10.0.0.2]:80", true),
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(probes_can_fail(peer), needs, "{peer}");
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_socket_dialled_on_loopback_gets_no_keepalive_but_keeps_its_user_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let sock = socket2::SockRef::from(&sock);
        let dpt = Duration::from_secs(60);
        dialled_options(&sock, listener.local_addr().unwrap(), dpt).unwrap();
        assert!(sock.tcp_nodelay().unwrap());
        assert!(!sock.keepalive().unwrap());
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(dpt));
        // The same socket, as if its peer were another host's.
        dialled_options(&sock, "10.0.0.2:80".parse().unwrap(), dpt).unwrap();
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(dpt));
    }
}
