//! TLS on both hops, with rustls: the listener's certificate (a `wss://` gateway) and the bots'
//! (`wss://` upstreams).
//!
//! rustls is Sans-I/O, and that is what lets a TLS session be handed over like a plain one: the
//! control plane drives a [`Tls`] connection over the raw socket while it reads the upgrade
//! request (or dials a bot), then passes the socket *and* the connection object to the engine,
//! whose [`Stream`](crate::stream::Stream) goes on with the same record state. Per-message work
//! stays here, without the GIL.
//!
//! Policy: TLS 1.2 and 1.3 only (rustls has nothing older), ALPN `http/1.1`, the chain sent as
//! given, ECDSA, Ed25519 and RSA keys.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// A certificate, key or peer that cannot be used; `reason` is one line for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn err(reason: impl Into<String>) -> TlsError {
    TlsError(reason.into())
}

const ALPN: &[u8] = b"http/1.1";

/// The listener's TLS settings from a PEM certificate chain and its PEM private key.
///
/// Refused (with the reason): no certificate, an unreadable key, a key that does not match the
/// certificate, a certificate outside its validity period.
pub fn server_config(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("tls_cert is not a PEM certificate chain ({e})")))?;
    let Some(leaf) = chain.first() else {
        return Err(err("tls_cert holds no certificate"));
    };
    check_validity(leaf, now())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| err(format!("tls_key is not a PEM private key ({e})")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| err(format!("tls_key does not go with tls_cert ({e})")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No TLS 1.3 session tickets. A voice session lasts minutes, so resumption saves little,
    // and tickets sent just after the handshake race with clients that write their request
    // while another thread reads (Python's threaded websockets client lost its request about
    // once in 200 handshakes in our tests). TLS 1.2 keeps session-id resumption (the cache).
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// TLS settings for dialling bots: the system's roots, or only those of `ca_pem`.
pub fn client_config(ca_pem: Option<&[u8]>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| err(format!("upstream_ca_file is not PEM ({e})")))?;
                roots
                    .add(cert)
                    .map_err(|e| err(format!("upstream_ca_file: {e}")))?;
            }
            if roots.is_empty() {
                return Err(err("upstream_ca_file holds no certificate"));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One TLS connection, either end, driven by whoever holds the socket.
pub struct Tls(rustls::Connection);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// The server end of a new connection.
    pub fn server(config: &Arc<ServerConfig>) -> Result<Self, TlsError> {
        ServerConnection::new(config.clone())
            .map(|c| Self(c.into()))
            .map_err(|e| err(e.to_string()))
    }

    /// The client end of a new connection to `host` (a DNS name or an IP address).
    pub fn client(config: &Arc<ClientConfig>, host: &str) -> Result<Self, TlsError> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| err(format!("{host:?} is not a host name")))?;
        ClientConnection::new(config.clone(), name)
            .map(|c| Self(c.into()))
            .map_err(|e| err(e.to_string()))
    }

    /// Takes bytes read from the socket, as many as it may now, and returns how many it took:
    /// it stops once decrypted bytes wait to be read (rustls holds a bounded amount of them),
    /// and the caller gives the rest again after reading those. An error is fatal: its alert
    /// (if any) is queued for [`write_tls`](Self::write_tls) and the connection must end.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, TlsError> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.0.read_tls(&mut rest).map_err(|e| err(e.to_string()))?;
            if n == 0 {
                break;
            }
            let state = self
                .0
                .process_new_packets()
                .map_err(|e| err(e.to_string()))?;
            if state.plaintext_bytes_to_read() > 0 {
                break;
            }
        }
        Ok(data.len() - rest.len())
    }

    /// Reads ciphertext from `src` (one read) and processes it. `Ok(0)`: the socket's EOF.
    pub fn read_tls(&mut self, src: &mut impl Read) -> io::Result<usize> {
        let n = self.0.read_tls(src)?;
        if n > 0 {
            self.0
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        Ok(n)
    }

    /// Plaintext already decrypted: `Ok(0)` after the peer's close_notify, `WouldBlock` when
    /// more ciphertext is needed.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.reader().read(buf)
    }

    /// Encrypts `data` into records queued for [`write_tls`](Self::write_tls).
    pub fn write_plain(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.writer().write(data)
    }

    /// Writes queued records to `dst` (one write).
    pub fn write_tls(&mut self, dst: &mut impl Write) -> io::Result<usize> {
        self.0.write_tls(dst)
    }

    /// Whether records wait to be written.
    pub fn wants_write(&self) -> bool {
        self.0.wants_write()
    }

    /// Whether the handshake is still going on.
    pub fn handshaking(&self) -> bool {
        self.0.is_handshaking()
    }

    /// Queues a close_notify alert.
    pub fn close_notify(&mut self) {
        self.0.send_close_notify();
    }
}

/// Refuses a certificate outside its validity period (a clear error at start rather than every
/// client failing its handshake). Reads only `tbsCertificate.validity` from the DER.
fn check_validity(cert: &CertificateDer<'_>, now: u64) -> Result<(), TlsError> {
    let (not_before, not_after) =
        validity(cert.as_ref()).ok_or_else(|| err("tls_cert: cannot read its validity"))?;
    if now > not_after {
        return Err(err("tls_cert has expired"));
    }
    if now < not_before {
        return Err(err("tls_cert is not valid yet"));
    }
    Ok(())
}

/// `(notBefore, notAfter)` in Unix seconds from a DER certificate (RFC 5280 §4.1).
fn validity(der: &[u8]) -> Option<(u64, u64)> {
    let (cert, _) = der_item(der, 0x30)?;
    let (mut tbs, _) = der_item(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_item(tbs, 0xa0)?.1; // [0] version
    }
    let rest = der_item(tbs, 0x02)?.1; // serialNumber
    let rest = der_item(rest, 0x30)?.1; // signature
    let rest = der_item(rest, 0x30)?.1; // issuer
    let (validity, _) = der_item(rest, 0x30)?;
    let (before, rest) = der_time(validity)?;
    let (after, _) = der_time(rest)?;
    Some((before, after))
}

/// The contents of the DER item with `tag` at the start of `data`, and what follows it.
fn der_item(data: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *data.first()? != tag {
        return None;
    }
    let first = *data.get(1)? as usize;
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let len = data
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some((data.get(start..end)?, data.get(end..)?))
}

/// A UTCTime or GeneralizedTime as Unix seconds, and what follows it.
fn der_time(data: &[u8]) -> Option<(u64, &[u8])> {
    let (text, rest, year) = match data.first()? {
        0x17 => {
            let (t, r) = der_item(data, 0x17)?;
            let yy = digits(t.get(0..2)?)?;
            (t.get(2..)?, r, if yy >= 50 { 1900 + yy } else { 2000 + yy })
        }
        0x18 => {
            let (t, r) = der_item(data, 0x18)?;
            (t.get(4..)?, r, digits(t.get(0..4)?)?)
        }
        _ => return None,
    };
    let field = |i: usize| digits(text.get(i..i + 2)?);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    let days = days_from_civil(year, month, day)?;
    Some((days * 86_400 + hour * 3600 + minute * 60 + second, rest))
}

fn digits(d: &[u8]) -> Option<u64> {
    d.iter().try_fold(0u64, |a, &c| {
        c.is_ascii_digit().then(|| a * 10 + u64::from(c - b'0'))
    })
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> Option<u64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), Some(0));
        assert_eq!(days_from_civil(2000, 3, 1), Some(11_017));
        assert_eq!(days_from_civil(2026, 12, 2), Some(20_789));
    }

    #[test]
    fn utc_and_generalized_times_parse() {
        // UTCTime "260102030405Z"
        let utc = [&[0x17, 13][..], b"260102030405Z"].concat();
        let (t, rest) = der_time(&utc).unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            t,
            days_from_civil(2026, 1, 2).unwrap() * 86_400 + 3 * 3600 + 4 * 60 + 5
        );
        let gen = [&[0x18, 15][..], b"20500101000000Z"].concat();
        assert_eq!(
            der_time(&gen).unwrap().0,
            days_from_civil(2050, 1, 1).unwrap() * 86_400
        );
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(validity(b"\x30\x82\xff\xff"), None);
        assert_eq!(validity(b""), None);
        assert!(server_config(b"not pem", b"not pem").is_err());
    }
}
