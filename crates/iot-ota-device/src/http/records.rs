//! HTTPS with one copy of each byte: rustls makes the connection (the
//! handshake, the certificate checks) and keeps what it needs later (new
//! keys on a TLS 1.3 key update, session tickets); the server's records are
//! then opened in place, in one receive buffer, by the negotiated suite's
//! own AEAD from the configuration's crypto provider (ring by default,
//! aws-lc-rs, a FIPS build: rustls's `MessageDecrypter`), and each byte of
//! plaintext is copied once, into the caller's buffer. This module keeps
//! only the framing: record boundaries, limits, alerts, handshake
//! messages after the handshake. A provider whose suites cannot hand their
//! keys over ([`hands_over`] false) gets rustls's own reader instead.
//!
//! Why: rustls's own reader hands plaintext over through three more copies
//! (from a read buffer into its deframer, from there into a `Vec` per
//! record, from that into the caller's buffer). On a download those copies
//! cost more than the decryption itself, and a device's download thread
//! also hashes every byte. Handing the record layer over is what rustls's
//! kernel-connection API ([`rustls::kernel`]) exists for (kTLS does the
//! same in the kernel).
//!
//! Only the server's direction is ours: the one thing a download sends is
//! its request, and rustls encrypts that before it hands the keys over.
//!
//! ```text
//!   socket ──read──► buf: [record][record][rec…]     (ciphertext)
//!                          │ open in place (AEAD)
//!                          ▼
//!                    [hdr|plaintext|tag]  ──copy──► caller's buffer
//! ```

use std::io;
use std::ops::Range;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, KeyBlockShape, MessageDecrypter, MessageEncrypter,
    OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{
    AlertDescription, ClientConfig, ConnectionTrafficSecrets, ContentType, Error, HandshakeType,
    InvalidMessage, PeerMisbehaved, ProtocolVersion, SupportedCipherSuite,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::HttpError;

/// Whether every cipher suite `config` may negotiate can hand its traffic
/// keys over (rustls's `extract_keys`), so that [`connect`] can open the
/// records itself. Asked before a connection: handing over consumes it, and
/// a suite that cannot would fail only after the request was sent.
pub(super) fn hands_over(config: &ClientConfig) -> bool {
    config
        .crypto_provider()
        .cipher_suites
        .iter()
        .all(|suite| match suite {
            SupportedCipherSuite::Tls13(s) => s
                .aead_alg
                .extract_keys(AeadKey::from([0; 32]), Iv::from([0; 12]))
                .is_ok(),
            SupportedCipherSuite::Tls12(s) => {
                let shape = s.aead_alg.key_block_shape();
                let iv = vec![0u8; shape.fixed_iv_len];
                let explicit = vec![0u8; shape.explicit_nonce_len];
                s.aead_alg
                    .extract_keys(AeadKey::from([0; 32]), &iv, &explicit)
                    .is_ok()
            }
        })
}

/// A record's header: content type, version, payload length.
const HEADER: usize = 5;
/// The AEAD tag after each record's ciphertext.
#[cfg(test)]
const TAG: usize = 16;
/// The most plaintext a record may carry (RFC 8446 5.1, RFC 5246 6.2.1).
const MAX_PLAINTEXT: usize = 1 << 14;
/// The longest record payload: 2^14 plus the expansion TLS 1.2 allows
/// (RFC 5246 6.2.3); TLS 1.3 allows 256 (RFC 8446 5.2), checked per record.
const MAX_PAYLOAD: usize = MAX_PLAINTEXT + 2048;
/// Where the unread bytes must start for a read to go on at the end of the
/// buffer: after this point, they move to the front first. The buffer
/// holds this much and one more record, so a record never waits for room.
const READ_SIZE: usize = 64 * 1024;
/// The receive buffer.
const BUFFER: usize = READ_SIZE + HEADER + MAX_PAYLOAD;
/// The longest handshake message taken after the handshake (a session
/// ticket), as rustls bounds its own.
const MAX_HANDSHAKE_MESSAGE: usize = 0xffff;

/// A TLS connection whose records this module opens; see the module docs.
pub(super) struct TlsStream {
    tcp: TcpStream,
    /// Keeps the connection's secrets for key updates, and takes session
    /// tickets.
    kernel: KernelConnection<ClientConnectionData>,
    version: ProtocolVersion,
    rx: Opener,
    /// Seals the alerts this client sends: bad_record_mac for a record
    /// that does not open, no_renegotiation, close_notify. None when the
    /// server can no longer open them (see [`connect`]): none are sent.
    tx: Option<Sealer>,
    /// Sealed alerts not written yet.
    outgoing: Vec<u8>,
    /// Received bytes: `buf[start..end]` is not opened yet.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Opened plaintext (in `buf`, before `start`) not yet handed out.
    plain: Range<usize>,
    /// A handshake message after the handshake, while its records come in.
    handshake: Vec<u8>,
    /// The server sent close_notify: every byte it sent has been read.
    closed: bool,
    /// The first TLS error: every read after it fails with it too, so a
    /// record that failed is never skipped.
    error: Option<Error>,
    /// What is left of the server's allowances (rustls's own).
    limits: Limits,
}

/// Records that bring no data cost a read nothing but CPU: a server may
/// send only so many of them (rustls's and BoringSSL's limits).
#[derive(Debug)]
struct Limits {
    /// Warning alerts, in all.
    warning_alerts: u8,
    /// TLS 1.2 requests to renegotiate, in all.
    hello_requests: u8,
    /// Key updates since the last data.
    key_updates: u8,
    /// Empty data records in a row.
    empty_records: u8,
}

impl Limits {
    const KEY_UPDATES: u8 = 32;
    const EMPTY_RECORDS: u8 = 32;

    fn new() -> Limits {
        Limits {
            warning_alerts: 4,
            hello_requests: 1,
            key_updates: Self::KEY_UPDATES,
            empty_records: Self::EMPTY_RECORDS,
        }
    }

    /// Takes one of `allowance`, or fails with `error`.
    fn spend(allowance: &mut u8, error: PeerMisbehaved) -> Result<(), Error> {
        *allowance = allowance.checked_sub(1).ok_or(error)?;
        Ok(())
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("version", &self.version)
            .field("seq", &self.rx.seq)
            .finish_non_exhaustive()
    }
}

/// Makes a TLS connection over `tcp`, sends `request` on it, and waits
/// for the first record of the answer.
///
/// rustls runs the handshake over our own buffers (its unbuffered API), so
/// whatever the server sent after the handshake stays in the buffer the
/// records are then read from. rustls also reads everything up to the
/// first record of application data: a handshake message after the
/// handshake (a session ticket, sent by some servers with their first
/// flight) may span records, and only at application data is none left
/// half-read (RFC 8446 5.1: handshake messages are not interleaved with
/// other records). The keys are handed over there.
pub(super) async fn connect(
    mut tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    request: &[u8],
) -> Result<TlsStream, HttpError> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(HttpError::Tls)?;
    let mut buf = vec![0u8; BUFFER].into_boxed_slice();
    let mut end = 0;
    let mut send = Vec::new();
    let mut sent = false;
    // The first application data rustls opened (one record's worth).
    let mut first = Vec::new();
    let closed = |when: &str| {
        HttpError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the server closed the connection {when}"),
        ))
    };
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut buf[..end]);
        let mut read = false;
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                send_alert(&mut conn, &mut tcp).await;
                return Err(HttpError::Tls(e));
            }
        };
        match state {
            ConnectionState::EncodeTlsData(mut data) => {
                encode(&mut send, |out| match data.encode(out) {
                    Ok(n) => Ok(n),
                    Err(EncodeError::InsufficientSize(s)) => Err(Some(s.required_size)),
                    Err(_) => Err(None),
                })?;
            }
            ConnectionState::TransmitTlsData(data) => {
                tcp.write_all(&send).await.map_err(HttpError::Io)?;
                send.clear();
                data.done();
            }
            ConnectionState::BlockedHandshake => read = true,
            ConnectionState::WriteTraffic(mut traffic) if !sent => {
                send.clear();
                encode(&mut send, |out| match traffic.encrypt(request, out) {
                    Ok(n) => Ok(n),
                    Err(EncryptError::InsufficientSize(s)) => Err(Some(s.required_size)),
                    Err(_) => Err(None),
                })?;
                tcp.write_all(&send).await.map_err(HttpError::Io)?;
                send.clear();
                sent = true;
            }
            // Sent: nothing more to read in the buffer yet.
            ConnectionState::WriteTraffic(_) => read = true,
            ConnectionState::ReadTraffic(_) if !sent => {
                return Err(HttpError::BadResponse(
                    "the server sent data before the request".into(),
                ))
            }
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(HttpError::Tls)?;
                    discard += record.discard;
                    first.extend_from_slice(record.payload);
                }
            }
            ConnectionState::PeerClosed | ConnectionState::Closed if sent => {
                return Err(closed("before its answer"))
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(closed("during the TLS handshake"))
            }
            other => {
                return Err(HttpError::Tls(Error::General(format!(
                    "unexpected TLS state {other:?}"
                ))))
            }
        }
        if discard > 0 {
            buf.copy_within(discard..end, 0);
            end -= discard;
        }
        if !first.is_empty() {
            // What rustls encoded and had no turn to ask us to send (its
            // answer to a TLS 1.2 HelloRequest just before the data).
            if !send.is_empty() {
                tcp.write_all(&send).await.map_err(HttpError::Io)?;
            }
            break;
        }
        if read {
            if end == buf.len() {
                return Err(HttpError::Tls(Error::InvalidMessage(
                    InvalidMessage::MessageTooLarge,
                )));
            }
            match tcp.read(&mut buf[end..]).await.map_err(HttpError::Io)? {
                0 if sent => return Err(closed("before its answer")),
                0 => return Err(closed("during the TLS handshake")),
                n => end += n,
            }
        }
    }
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(HttpError::Tls)?;
    let version = kernel.protocol_version();
    let suite = kernel.negotiated_cipher_suite();
    let (seq, rx_secrets) = secrets.rx;
    let rx = Opener::new(suite, rx_secrets, seq).map_err(HttpError::Tls)?;
    let (seq, tx_secrets) = secrets.tx;
    // A TLS 1.3 key update the server asked for before its data made
    // rustls switch its sending keys (the sequence restarts at 0; the
    // request went out before, so it is at least 1 otherwise) and keep the
    // KeyUpdate message it owes, which the hand-over drops: the server
    // could not open what this client sealed from then on. It sends no
    // alerts then (they are a courtesy; the download is unaffected).
    let tx = if version == ProtocolVersion::TLSv1_3 && seq == 0 {
        None
    } else {
        Some(Sealer::new(suite, tx_secrets, seq).map_err(HttpError::Tls)?)
    };
    // The buffer holds the first plaintext, then the records not opened
    // yet. They fit: that plaintext came out of a record no longer there.
    let n = first.len();
    buf.copy_within(..end, n);
    buf[..n].copy_from_slice(&first);
    Ok(TlsStream {
        tcp,
        kernel,
        version,
        rx,
        tx,
        outgoing: Vec::new(),
        buf,
        start: n,
        end: n + end,
        plain: 0..n,
        handshake: Vec::new(),
        closed: false,
        error: None,
        limits: Limits::new(),
    })
}

/// Sends the alert rustls queued when the handshake failed (best effort:
/// the handshake's error is what counts).
async fn send_alert(conn: &mut UnbufferedClientConnection, tcp: &mut TcpStream) {
    let mut alert = [0u8; 64];
    let n = match conn.process_tls_records(&mut []).state {
        Ok(ConnectionState::EncodeTlsData(mut data)) => data.encode(&mut alert).unwrap_or(0),
        _ => 0,
    };
    if n > 0 {
        let _ = tcp.write_all(&alert[..n]).await;
    }
}

/// Appends what `write` encodes to `send`, growing it as asked.
fn encode(
    send: &mut Vec<u8>,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), HttpError> {
    let at = send.len();
    let mut room = 4096;
    loop {
        send.resize(at + room, 0);
        match write(&mut send[at..]) {
            Ok(n) => {
                send.truncate(at + n);
                return Ok(());
            }
            Err(Some(required)) if required > room => room = required,
            Err(_) => {
                return Err(HttpError::Tls(Error::General(
                    "TLS record encoding failed".into(),
                )))
            }
        }
    }
}

impl TlsStream {
    /// Reads plaintext into `out` (not empty): Ok(0) once the server has
    /// closed the connection with close_notify; an `UnexpectedEof` error
    /// if it closed without (whether that cut the body short is for the
    /// body's framing to say). Cancel-safe: it waits only for the socket,
    /// and only when nothing was copied yet.
    pub(super) async fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        loop {
            n += self.take_plain(&mut out[n..]);
            self.flush_alerts();
            if n == out.len() || self.closed {
                return Ok(n);
            }
            if self.error.is_none() {
                match self.open_record() {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        // RFC 8446 5.2 / 6: a record that does not open
                        // gets bad_record_mac; other errors their alert.
                        self.send_alert(2, fatal_alert(&e));
                        self.flush_alerts();
                        self.error = Some(e);
                    }
                }
            }
            // The bytes before an error are good: they go out first.
            if n > 0 {
                return Ok(n);
            }
            if let Some(e) = &self.error {
                return Err(invalid(e.clone()));
            }
            self.fill().await?;
        }
    }

    /// Seals an alert (level 1 warning, 2 fatal) to go out with the next
    /// [`TlsStream::flush_alerts`].
    fn send_alert(&mut self, level: u8, description: AlertDescription) {
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        match tx.seal(ContentType::Alert, &[level, u8::from(description)]) {
            Ok(record) => self.outgoing.extend_from_slice(&record),
            Err(e) => log::debug!("TLS alert {description:?} not sealed: {e}"),
        }
    }

    /// Writes the sealed alerts, without waiting (a few dozen bytes: the
    /// socket's buffer takes them; if not, they are best effort). Keeps
    /// [`TlsStream::read`] cancel-safe.
    fn flush_alerts(&mut self) {
        while !self.outgoing.is_empty() {
            match self.tcp.try_write(&self.outgoing) {
                Ok(0) | Err(_) => {
                    self.outgoing.clear();
                    return;
                }
                Ok(n) => {
                    self.outgoing.drain(..n);
                }
            }
        }
    }

    /// Copies opened plaintext out.
    fn take_plain(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.plain.len());
        if n > 0 {
            let from = self.plain.start;
            out[..n].copy_from_slice(&self.buf[from..from + n]);
            self.plain.start += n;
        }
        n
    }

    /// One socket read into the buffer (first moving an unread record's
    /// start to the front, if too little room is left after it).
    async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > READ_SIZE {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match self.tcp.read(&mut self.buf[self.end..]).await? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if self.start == self.end {
                    "the server closed the connection without a TLS close_notify"
                } else {
                    "the server closed the connection in the middle of a TLS record"
                },
            )),
            n => {
                self.end += n;
                Ok(())
            }
        }
    }

    /// Opens the next record if the buffer holds all of it: true if it did
    /// (its plaintext, if application data, is then in `plain`).
    fn open_record(&mut self) -> Result<bool, Error> {
        let unread = &self.buf[self.start..self.end];
        let Some(header) = unread.first_chunk::<HEADER>().copied() else {
            return Ok(false);
        };
        let len = payload_len(&header);
        let limit = match self.version {
            ProtocolVersion::TLSv1_3 => MAX_PLAINTEXT + 256,
            _ => MAX_PAYLOAD,
        };
        if len > limit {
            return Err(Error::InvalidMessage(InvalidMessage::MessageTooLarge));
        }
        if unread.len() < HEADER + len {
            return Ok(false);
        }
        let at = self.start + HEADER;
        self.start = at + len;
        let (kind, range) = self
            .rx
            .open(self.version, header, &mut self.buf[at..at + len])?;
        let range = at + range.start..at + range.end;
        if kind != ContentType::Handshake && !self.handshake.is_empty() {
            return Err(PeerMisbehaved::MessageInterleavedWithHandshakeMessage.into());
        }
        match kind {
            ContentType::ApplicationData if range.is_empty() => Limits::spend(
                &mut self.limits.empty_records,
                PeerMisbehaved::TooManyEmptyFragments,
            )?,
            ContentType::ApplicationData => {
                self.limits.empty_records = Limits::EMPTY_RECORDS;
                self.limits.key_updates = Limits::KEY_UPDATES;
                self.plain = range;
            }
            ContentType::Alert => self.alert(range)?,
            ContentType::Handshake => self.handshake_record(range)?,
            other => {
                return Err(Error::InappropriateMessage {
                    expect_types: vec![ContentType::ApplicationData],
                    got_type: other,
                })
            }
        }
        Ok(true)
    }

    /// close_notify ends the stream; a few warnings are let pass (TLS 1.2's,
    /// and user_canceled, which a close_notify follows); anything else is
    /// the server's error.
    fn alert(&mut self, range: Range<usize>) -> Result<(), Error> {
        let (level, description) = match self.buf[range] {
            [level, description] => (level, AlertDescription::from(description)),
            [] | [_] => return Err(Error::InvalidMessage(InvalidMessage::MessageTooShort)),
            _ => return Err(Error::InvalidMessage(InvalidMessage::TrailingData("alert"))),
        };
        let warning = match level {
            1 => true,
            2 => false,
            _ => {
                return Err(Error::InvalidMessage(InvalidMessage::UnexpectedMessage(
                    "alert level",
                )))
            }
        };
        let tolerated = warning
            && (description == AlertDescription::UserCanceled
                || self.version != ProtocolVersion::TLSv1_3);
        match description {
            AlertDescription::CloseNotify => {
                self.closed = true;
                // Answered in kind (RFC 8446 6.1), before the TCP close.
                self.send_alert(1, AlertDescription::CloseNotify);
            }
            _ if tolerated => Limits::spend(
                &mut self.limits.warning_alerts,
                PeerMisbehaved::TooManyWarningAlertsReceived,
            )?,
            other => return Err(Error::AlertReceived(other)),
        }
        Ok(())
    }

    /// Handshake messages after the handshake: TLS 1.3's session tickets
    /// and key updates (rustls takes both), TLS 1.2's request to
    /// renegotiate (answered with a no_renegotiation warning, as rustls does).
    fn handshake_record(&mut self, range: Range<usize>) -> Result<(), Error> {
        // RFC 8446 5.1: handshake records are never empty. (What is kept
        // stays bounded: each message's length is checked as soon as its
        // header is in, and whole messages go at once.)
        if range.is_empty() {
            return Err(Error::InvalidMessage(InvalidMessage::InvalidEmptyPayload));
        }
        self.handshake.extend_from_slice(&self.buf[range]);
        let mut at = 0;
        while let Some(&[kind, a, b, c]) = self.handshake[at..].first_chunk::<4>() {
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            if len > MAX_HANDSHAKE_MESSAGE {
                return Err(Error::InvalidMessage(
                    InvalidMessage::HandshakePayloadTooLarge,
                ));
            }
            let Some(body) = self.handshake.get(at + 4..at + 4 + len) else {
                break; // the rest comes in the next record
            };
            match (self.version, HandshakeType::from(kind)) {
                (ProtocolVersion::TLSv1_3, HandshakeType::NewSessionTicket) => {
                    self.kernel.handle_new_session_ticket(body)?;
                }
                (ProtocolVersion::TLSv1_3, HandshakeType::KeyUpdate) => {
                    // Either request is fine: a download sends nothing more,
                    // so it never owes the server a key update of its own.
                    if !matches!(body, [0] | [1]) {
                        return Err(Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate));
                    }
                    // New keys start at a record boundary (RFC 8446 5.1).
                    if at + 4 + len != self.handshake.len() {
                        return Err(PeerMisbehaved::KeyEpochWithPendingFragment.into());
                    }
                    Limits::spend(
                        &mut self.limits.key_updates,
                        PeerMisbehaved::TooManyKeyUpdateRequests,
                    )?;
                    let (seq, secrets) = self.kernel.update_rx_secret()?;
                    self.rx = Opener::new(self.kernel.negotiated_cipher_suite(), secrets, seq)?;
                }
                (ProtocolVersion::TLSv1_2, HandshakeType::HelloRequest) if len == 0 => {
                    Limits::spend(
                        &mut self.limits.hello_requests,
                        PeerMisbehaved::TooManyRenegotiationRequests,
                    )?;
                    // Said, as rustls does (RFC 5746 4.2): a server that
                    // waits for the renegotiation learns there is none,
                    // instead of stalling the download.
                    self.send_alert(1, AlertDescription::NoRenegotiation);
                }
                (_, other) => {
                    return Err(Error::InappropriateHandshakeMessage {
                        expect_types: vec![HandshakeType::NewSessionTicket],
                        got_type: other,
                    })
                }
            }
            at += 4 + len;
        }
        self.handshake.drain(..at);
        Ok(())
    }
}

/// The payload length a record's header announces.
fn payload_len(header: &[u8; HEADER]) -> usize {
    usize::from(u16::from_be_bytes([header[3], header[4]]))
}

/// A TLS error as the `io::Error` a read returns (the HTTP client finds the
/// TLS error inside again: `HttpError::Tls`).
fn invalid(e: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The alert a failed record gets.
fn fatal_alert(e: &Error) -> AlertDescription {
    match e {
        Error::DecryptError => AlertDescription::BadRecordMac,
        Error::PeerSentOversizedRecord => AlertDescription::RecordOverflow,
        Error::InvalidMessage(_) => AlertDescription::DecodeError,
        Error::InappropriateMessage { .. } | Error::InappropriateHandshakeMessage { .. } => {
            AlertDescription::UnexpectedMessage
        }
        _ => AlertDescription::InternalError,
    }
}

/// The key and IV of a direction's traffic secrets.
fn traffic_key(secrets: ConnectionTrafficSecrets) -> Result<(AeadKey, Iv), Error> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(Error::General("unsupported TLS cipher suite".into())),
    }
}

/// A TLS 1.2 traffic IV cut as the key block has it: the fixed IV (GCM's
/// 4-byte salt, ChaCha20-Poly1305's 12 bytes), then the explicit nonce's
/// seed (GCM's 8 bytes; the records carry the nonces themselves).
fn tls12_iv(iv: &Iv, shape: KeyBlockShape) -> Result<(&[u8], &[u8]), Error> {
    let all = iv.as_ref();
    let fixed = shape.fixed_iv_len;
    match (
        all.get(..fixed),
        all.get(fixed..fixed + shape.explicit_nonce_len),
    ) {
        (Some(fixed), Some(explicit)) => Ok((fixed, explicit)),
        _ => Err(Error::General("bad TLS traffic IV".into())),
    }
}

/// Seals this client's own records after the handover (only alerts: the
/// request went out before it): the negotiated suite's encrypter.
struct Sealer {
    encrypter: Box<dyn MessageEncrypter>,
    seq: u64,
}

impl Sealer {
    fn new(
        suite: SupportedCipherSuite,
        secrets: ConnectionTrafficSecrets,
        seq: u64,
    ) -> Result<Self, Error> {
        let (key, iv) = traffic_key(secrets)?;
        let encrypter = match suite {
            SupportedCipherSuite::Tls13(s) => s.aead_alg.encrypter(key, iv),
            SupportedCipherSuite::Tls12(s) => {
                let (fixed, explicit) = tls12_iv(&iv, s.aead_alg.key_block_shape())?;
                s.aead_alg.encrypter(key, fixed, explicit)
            }
        };
        Ok(Sealer { encrypter, seq })
    }

    /// One record of `typ` holding `payload`, sealed, with its header.
    fn seal(&mut self, typ: ContentType, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(Error::EncryptError)?;
        let message = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        Ok(self.encrypter.encrypt(message, seq)?.encode())
    }
}

/// Opens the server's records: the negotiated suite's decrypter (the
/// provider's AEAD, nonce and additional data) and the next record's
/// sequence number.
struct Opener {
    decrypter: Box<dyn MessageDecrypter>,
    seq: u64,
}

impl Opener {
    fn new(
        suite: SupportedCipherSuite,
        secrets: ConnectionTrafficSecrets,
        seq: u64,
    ) -> Result<Self, Error> {
        let (key, iv) = traffic_key(secrets)?;
        let decrypter = match suite {
            SupportedCipherSuite::Tls13(s) => s.aead_alg.decrypter(key, iv),
            SupportedCipherSuite::Tls12(s) => {
                let (fixed, _) = tls12_iv(&iv, s.aead_alg.key_block_shape())?;
                s.aead_alg.decrypter(key, fixed)
            }
        };
        Ok(Opener { decrypter, seq })
    }

    /// Decrypts and authenticates one record's payload in place. Returns
    /// the content type and where the content is within `payload`.
    fn open(
        &mut self,
        version: ProtocolVersion,
        header: [u8; HEADER],
        payload: &mut [u8],
    ) -> Result<(ContentType, Range<usize>), Error> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(Error::DecryptError)?;
        if version == ProtocolVersion::TLSv1_3 {
            // RFC 8446 5.1, 5.2: the outer type is always application_data
            // and the legacy version 0x0303 (the provider's additional data
            // assumes both: they are checked here, not trusted).
            if header[0] != u8::from(ContentType::ApplicationData) {
                return Err(Error::InappropriateMessage {
                    expect_types: vec![ContentType::ApplicationData],
                    got_type: ContentType::from(header[0]),
                });
            }
            if header[1..3] != [3, 3] {
                return Err(Error::InvalidMessage(
                    InvalidMessage::UnknownProtocolVersion,
                ));
            }
        }
        let base = payload.as_ptr() as usize;
        let message = InboundOpaqueMessage::new(
            ContentType::from(header[0]),
            ProtocolVersion::from(u16::from_be_bytes([header[1], header[2]])),
            payload,
        );
        // TLS 1.3: the padding is stripped and the inner type found (RFC
        // 8446 5.4); both versions: the size limits of the plaintext.
        let plain = self.decrypter.decrypt(message, seq)?;
        // Where the plaintext is depends on the provider (ring moves a TLS
        // 1.2 record's to the front, aws-lc-rs leaves it after the nonce).
        let range = if plain.payload.is_empty() {
            0..0
        } else {
            let start = plain.payload.as_ptr() as usize - base;
            start..start + plain.payload.len()
        };
        Ok((plain.typ, range))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // The crafted server seals its own records (the client opens them
    // through the provider).
    use iot_ota_testkit::TestCa;
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    use rustls::crypto::ring::cipher_suite as suites;
    use rustls::server::ServerConnection;
    use rustls::{ServerConfig, SupportedCipherSuite};
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio_rustls::server::TlsStream as ServerStream;
    use tokio_rustls::TlsAcceptor;

    /// A body whose every byte says where it is.
    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// What the test server does with its connection.
    #[derive(Clone, Copy)]
    enum End {
        /// close_notify, then the TCP close.
        Clean,
        /// A TCP close without close_notify.
        Cut,
    }

    /// Serves one TLS connection: reads the request, writes `body` in
    /// writes of `pieces` bytes (cycled), calling `between` after each and
    /// pausing as long as it says.
    async fn serve(
        config: Arc<ServerConfig>,
        body: Vec<u8>,
        pieces: &'static [usize],
        between: fn(usize, &mut ServerConnection) -> Duration,
        end: End,
    ) -> (SocketAddr, tokio::task::JoinHandle<ServerStream<TcpStream>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, head) = accept(listener, config).await;
            assert_eq!(head, b"GET / HTTP/1.1\r\n\r\n");
            let (mut at, mut i) = (0, 0);
            while at < body.len() {
                let n = pieces[i % pieces.len()].min(body.len() - at);
                s.write_all(&body[at..at + n]).await.unwrap();
                s.flush().await.unwrap();
                let pause = between(i, s.get_mut().1);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                at += n;
                i += 1;
            }
            if let End::Clean = end {
                s.shutdown().await.unwrap();
            } else {
                s.get_mut().0.shutdown().await.unwrap();
            }
            s
        });
        (addr, task)
    }

    /// Accepts one TLS connection and reads its request head.
    async fn accept(
        listener: TcpListener,
        config: Arc<ServerConfig>,
    ) -> (ServerStream<TcpStream>, Vec<u8>) {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = TlsAcceptor::from(config).accept(tcp).await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 512];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "no request");
            head.extend_from_slice(&b[..n]);
        }
        (s, head)
    }

    /// For `serve`: no pause, nothing done between writes.
    fn no_pause(_: usize, _: &mut ServerConnection) -> Duration {
        Duration::ZERO
    }

    /// A server for `suite` (see `serve`) and a client connected to it.
    async fn session(
        ca: &TestCa,
        suite: SupportedCipherSuite,
        body: Vec<u8>,
        pieces: &'static [usize],
        between: fn(usize, &mut ServerConnection) -> Duration,
        end: End,
    ) -> (TlsStream, tokio::task::JoinHandle<ServerStream<TcpStream>>) {
        let (addr, server) = serve(ca.server_config_for(suite), body, pieces, between, end).await;
        (open(addr, client_config(ca)).await, server)
    }

    fn client_config(ca: &TestCa) -> Arc<ClientConfig> {
        let mut config = (*ca.client_config()).clone();
        config.enable_secret_extraction = true;
        Arc::new(config)
    }

    async fn open(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsStream {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        connect(tcp, config, name, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap()
    }

    /// Reads until the end or an error, with reads of `sizes` bytes (cycled).
    async fn read_all(s: &mut TlsStream, sizes: &[usize]) -> (Vec<u8>, io::Result<()>) {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 17];
        for i in 0.. {
            match s.read(&mut buf[..sizes[i % sizes.len()]]).await {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
        }
        unreachable!()
    }

    fn tls_error(e: &io::Error) -> Option<&Error> {
        e.get_ref()?.downcast_ref::<Error>()
    }

    const SUITES: [SupportedCipherSuite; 6] = [
        suites::TLS13_AES_128_GCM_SHA256,
        suites::TLS13_AES_256_GCM_SHA384,
        suites::TLS13_CHACHA20_POLY1305_SHA256,
        suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];

    #[tokio::test]
    async fn every_cipher_suite_of_both_versions_reads_the_same_bytes() {
        let ca = TestCa::new();
        let expected = body(300_000);
        for suite in SUITES {
            // Records of every size, from 1 byte to full; reads of every
            // size too, smaller and larger than a record.
            let pieces = &[1, 16_384, 5, 40_000, 0x3fff, 777, 70_000];
            let (mut s, server) =
                session(&ca, suite, expected.clone(), pieces, no_pause, End::Clean).await;
            let (got, end) = read_all(&mut s, &[3, 5000, 1 << 17, 16_384, 1]).await;
            end.unwrap_or_else(|e| panic!("{suite:?}: {e}"));
            assert!(got == expected, "{suite:?}: the bytes differ");
            // The end stays the end.
            assert_eq!(s.read(&mut [0u8; 10]).await.unwrap(), 0);
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn key_updates_mid_stream_switch_the_keys() {
        let ca = TestCa::new();
        let expected = body(200_000);
        let (mut s, server) = session(
            &ca,
            suites::TLS13_AES_128_GCM_SHA256,
            expected.clone(),
            &[10_000],
            |i, conn| {
                if i % 4 == 1 {
                    conn.refresh_traffic_keys().unwrap();
                }
                Duration::ZERO
            },
            End::Clean,
        )
        .await;
        let (got, end) = read_all(&mut s, &[4096]).await;
        end.unwrap();
        assert!(got == expected);
        // The key updates came: the record counter restarted.
        assert!(s.rx.seq < 20, "seq {}", s.rx.seq);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn session_tickets_are_kept_and_resume_the_next_connection() {
        let ca = TestCa::new();
        let config = client_config(&ca);
        let server_config = ca.server_config_for(suites::TLS13_AES_128_GCM_SHA256);
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (addr, server) = serve(
                server_config.clone(),
                body(1000),
                &[1000],
                no_pause,
                End::Clean,
            )
            .await;
            let mut s = open(addr, config.clone()).await;
            let (got, end) = read_all(&mut s, &[4096]).await;
            end.unwrap();
            assert_eq!(got, body(1000));
            kinds.push(server.await.unwrap().get_ref().1.handshake_kind());
        }
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ]
        );
    }

    #[tokio::test]
    async fn a_close_without_close_notify_is_an_unexpected_eof() {
        let ca = TestCa::new();
        for suite in [SUITES[0], SUITES[3]] {
            let (mut s, server) =
                session(&ca, suite, body(50_000), &[16_384], no_pause, End::Cut).await;
            let (got, end) = read_all(&mut s, &[5000]).await;
            assert_eq!(got, body(50_000), "{suite:?}");
            let e = end.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{suite:?}: {e}");
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_read_dropped_while_it_waits_loses_nothing() {
        let ca = TestCa::new();
        let expected = body(100_000);
        // The server pauses after its first 30,000 bytes.
        let (mut s, server) = session(
            &ca,
            suites::TLS13_AES_128_GCM_SHA256,
            expected.clone(),
            &[30_000, 70_000],
            |i, _| match i {
                0 => Duration::from_millis(400),
                _ => Duration::ZERO,
            },
            End::Clean,
        )
        .await;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        while got.len() < 30_000 {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        // Reads that time out while the server is silent are dropped
        // mid-wait, as the HTTP layer's timeouts drop them.
        let mut dropped = 0;
        let n = loop {
            match tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
                Ok(n) => break n.unwrap(),
                Err(_elapsed) => dropped += 1,
            }
            assert!(dropped < 100, "the server never went on");
        };
        assert!(dropped > 0, "no read was dropped while waiting");
        got.extend_from_slice(&buf[..n]);
        // Nothing was lost to the dropped reads.
        let (rest, end) = read_all(&mut s, &[4096]).await;
        end.unwrap();
        got.extend_from_slice(&rest);
        assert!(got == expected, "{} bytes of {}", got.len(), expected.len());
        server.await.unwrap();
    }

    /// What the man in the middle does to the server's n-th record of type
    /// application data (counting from 0; in TLS 1.3 that type is every
    /// encrypted record's, handshake records included).
    #[derive(Clone, Copy, Debug)]
    enum Tamper {
        /// Flips one bit of its payload.
        Flip,
        /// Claims a length no record may have.
        Oversize,
        /// Sends half of it, then closes the connection.
        CutInside,
        /// Sends its header and the payload of a record encrypted under a
        /// different sequence number: the one before it, again.
        Replay,
        /// Sends a record of random bytes (from this seed) instead: any
        /// type, version and length, then goes on as before.
        Garbage(u64),
    }

    /// A TCP proxy for one connection, passing the client's bytes as they
    /// are and the server's record by record, tampering with record `nth`.
    async fn proxy(
        upstream: SocketAddr,
        nth: usize,
        tamper: Tamper,
    ) -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // What the client sent, as sent.
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = sent.clone();
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(upstream).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let mut chunk = [0u8; 4096];
                loop {
                    match cr.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            log.lock().unwrap().extend_from_slice(&chunk[..n]);
                            if sw.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            let (mut count, mut previous) = (0, Vec::new());
            loop {
                let mut header = [0u8; HEADER];
                if sr.read_exact(&mut header).await.is_err() {
                    return;
                }
                let len = payload_len(&header);
                let mut payload = vec![0u8; len];
                sr.read_exact(&mut payload).await.unwrap();
                if header[0] == 23 && count == nth {
                    match tamper {
                        Tamper::Flip => payload[len / 2] ^= 0x10,
                        Tamper::Oversize => header[3..].copy_from_slice(&0xffffu16.to_be_bytes()),
                        Tamper::CutInside => {
                            let _ = cw.write_all(&header).await;
                            let _ = cw.write_all(&payload[..len / 2]).await;
                            return;
                        }
                        Tamper::Replay => payload = previous.clone(),
                        Tamper::Garbage(seed) => {
                            let mut x = seed | 1;
                            let mut next = move || {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                x
                            };
                            header = next().to_be_bytes()[..HEADER].try_into().unwrap();
                            // Mostly a well-formed header, so that the
                            // record gets as far as its decryption.
                            if seed % 4 != 0 {
                                header[..3].copy_from_slice(&[23, 3, 3]);
                            }
                            let len = next() as usize % 20_000;
                            header[3..].copy_from_slice(&(len as u16).to_be_bytes());
                            payload = (0..len).map(|_| next() as u8).collect();
                        }
                    }
                    if let Tamper::Flip | Tamper::Replay = tamper {
                        header[3..].copy_from_slice(&(payload.len() as u16).to_be_bytes());
                    }
                }
                if header[0] == 23 {
                    count += 1;
                    previous = payload.clone();
                }
                if cw.write_all(&header).await.is_err() || cw.write_all(&payload).await.is_err() {
                    return;
                }
            }
        });
        (addr, sent)
    }

    /// The records in `bytes` (a TLS stream from its start): (type, length).
    fn records_in(bytes: &[u8]) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(h) = bytes.get(at..at + HEADER) {
            let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
            out.push((h[0], len));
            at += HEADER + len;
        }
        out
    }

    /// Reads `body` from a server for `suite` through `proxy`, tampering
    /// with record `nth`: what came before the end, and how it ended.
    async fn through_proxy(
        ca: &TestCa,
        suite: SupportedCipherSuite,
        body: &[u8],
        nth: usize,
        tamper: Tamper,
    ) -> (Vec<u8>, io::Result<()>) {
        let config = ca.server_config_for(suite);
        let (upstream, server) =
            serve(config, body.to_vec(), &[16_384], no_pause, End::Clean).await;
        let (addr, _) = proxy(upstream, nth, tamper).await;
        let mut s = open(addr, client_config(ca)).await;
        let read = read_all(&mut s, &[5000]).await;
        server.abort();
        read
    }

    /// The server's close_notify is answered with the client's own (RFC
    /// 8446 6.1; on main: a TCP close only).
    #[tokio::test]
    async fn a_close_notify_is_answered_in_kind() {
        let ca = TestCa::new();
        let expected = body(50_000);
        let config = ca.server_config_for(suites::TLS13_AES_128_GCM_SHA256);
        let (upstream, server) =
            serve(config, expected.clone(), &[16_384], no_pause, End::Clean).await;
        let (addr, sent) = proxy(upstream, usize::MAX, Tamper::Flip).await;
        let mut s = open(addr, client_config(&ca)).await;
        let (got, end) = read_all(&mut s, &[5000]).await;
        assert!(end.is_ok() && got == expected);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(s);
        server.abort();
        let records = records_in(&sent.lock().unwrap());
        assert_eq!(*records.last().unwrap(), (23, 2 + 1 + TAG), "{records:?}");
    }

    /// A record that does not open gets a bad_record_mac alert before the
    /// connection closes (RFC 8446 5.2; on main: a TCP close, no alert).
    #[tokio::test]
    async fn a_record_that_does_not_open_is_answered_with_bad_record_mac() {
        let ca = TestCa::new();
        let expected = body(200_000);
        for suite in SUITES {
            let config = ca.server_config_for(suite);
            let (upstream, server) =
                serve(config, expected.clone(), &[16_384], no_pause, End::Clean).await;
            let (addr, sent) = proxy(upstream, 6, Tamper::Flip).await;
            let mut s = open(addr, client_config(&ca)).await;
            let (_, end) = read_all(&mut s, &[5000]).await;
            assert_eq!(
                end.as_ref().map_err(tls_error).err().flatten(),
                Some(&Error::DecryptError)
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            drop(s);
            server.abort();
            let records = records_in(&sent.lock().unwrap());
            let last = *records.last().unwrap();
            // Sealed: TLS 1.2 shows the alert type outside (and GCM's 8-byte
            // nonce); TLS 1.3 hides it in application data (type byte).
            let want = match suite {
                SupportedCipherSuite::Tls13(_) => (23, 2 + 1 + TAG),
                SupportedCipherSuite::Tls12(s) => (
                    21,
                    s.aead_alg.key_block_shape().explicit_nonce_len + 2 + TAG,
                ),
            };
            assert_eq!(last, want, "{suite:?}: the client's last record");
        }
    }

    #[tokio::test]
    async fn tampered_records_fail_and_only_true_bytes_come_before() {
        let ca = TestCa::new();
        let expected = body(400_000);
        for suite in SUITES {
            for tamper in [
                Tamper::Flip,
                Tamper::Oversize,
                Tamper::CutInside,
                Tamper::Replay,
            ] {
                let (got, end) = through_proxy(&ca, suite, &expected, 12, tamper).await;
                let e = end.expect_err("a tampered stream must fail");
                let what = format!("{suite:?} {tamper:?}: {e}");
                assert!(
                    got.len() < expected.len() && expected.starts_with(&got),
                    "{what}"
                );
                match tamper {
                    Tamper::Flip | Tamper::Replay => {
                        assert_eq!(tls_error(&e), Some(&Error::DecryptError), "{what}")
                    }
                    Tamper::Oversize => assert_eq!(
                        tls_error(&e),
                        Some(&Error::InvalidMessage(InvalidMessage::MessageTooLarge)),
                        "{what}"
                    ),
                    Tamper::CutInside => {
                        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{what}");
                        assert!(e.to_string().contains("middle of a TLS record"), "{what}");
                    }
                    Tamper::Garbage(_) => unreachable!(),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_record_of_random_bytes_is_an_error_never_a_panic_or_data() {
        let ca = TestCa::new();
        let expected = body(200_000);
        for (i, suite) in SUITES.into_iter().cycle().take(60).enumerate() {
            let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1);
            let (got, end) = through_proxy(&ca, suite, &expected, 6, Tamper::Garbage(seed)).await;
            let what = format!("{suite:?} seed {seed:#x}");
            let e = end.expect_err(&what);
            assert!(tls_error(&e).is_some(), "{what}: {e}");
            assert!(
                got.len() < expected.len() && expected.starts_with(&got),
                "{what}"
            );
        }
    }

    /// One record the crafted server seals itself: its inner type, content
    /// and zero padding; `corrupt` flips a bit of its ciphertext; after a
    /// record with `rotate` (a KeyUpdate), the server seals with its next
    /// traffic secret's keys.
    struct Rec {
        rotate: bool,
        kind: ContentType,
        content: Vec<u8>,
        padding: usize,
        corrupt: bool,
    }

    fn data(content: &[u8]) -> Rec {
        Rec {
            kind: ContentType::ApplicationData,
            content: content.to_vec(),
            padding: 0,
            corrupt: false,
            rotate: false,
        }
    }

    /// A KeyUpdate (RFC 8446 4.6.3), `requested` or not; the server's
    /// records after it use its next keys.
    fn key_update(requested: bool) -> Rec {
        Rec {
            rotate: true,
            ..handshake(&[24, 0, 0, 1, u8::from(requested)])
        }
    }

    /// The server's traffic secret, as rustls logs it.
    #[derive(Debug, Default)]
    struct ServerSecret(std::sync::Mutex<Vec<u8>>);

    impl rustls::KeyLog for ServerSecret {
        fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
            if label == "SERVER_TRAFFIC_SECRET_0" {
                *self.0.lock().unwrap() = secret.to_vec();
            }
        }
    }

    /// HKDF-Expand-Label of TLS 1.3 (RFC 8446 7.1), SHA-256, empty context.
    fn expand_label(secret: &[u8], label: &str, len: usize) -> Vec<u8> {
        struct Len(usize);
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let full = format!("tls13 {label}");
        let info = [
            &(len as u16).to_be_bytes()[..],
            &[full.len() as u8],
            full.as_bytes(),
            &[0],
        ];
        let prk = ring::hkdf::Prk::new_less_safe(ring::hkdf::HKDF_SHA256, secret);
        let mut out = vec![0; len];
        prk.expand(&info, Len(len)).unwrap().fill(&mut out).unwrap();
        out
    }

    fn handshake(content: &[u8]) -> Rec {
        Rec {
            kind: ContentType::Handshake,
            ..data(content)
        }
    }

    fn alert(level: u8, description: u8) -> Rec {
        Rec {
            kind: ContentType::Alert,
            ..data(&[level, description])
        }
    }

    /// A TLS 1.3 server whose handshake is rustls's, and whose records
    /// after the request it seals itself, to send what a rustls server
    /// never would. Ends with a TCP close.
    async fn crafted(ca: &TestCa, records: Vec<Rec>) -> SocketAddr {
        crafted_flights(ca, Vec::new(), records).await
    }

    /// The server's records, sealed with the keys of its traffic secret
    /// (as rustls logs it), and after a KeyUpdate with the next secret's.
    struct Keys {
        secret: Vec<u8>,
        key: LessSafeKey,
        iv: Iv,
        seq: u64,
    }

    impl Keys {
        fn new(secret: Vec<u8>) -> Keys {
            let key = expand_label(&secret, "key", 16);
            let iv = Iv::copy(&expand_label(&secret, "iv", 12));
            Keys {
                key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).unwrap()),
                iv,
                secret,
                seq: 0,
            }
        }

        /// `rec` as a record on the wire.
        fn seal(&mut self, rec: Rec) -> Vec<u8> {
            let mut inner = rec.content;
            inner.push(u8::from(rec.kind));
            inner.resize(inner.len() + rec.padding, 0);
            let len = (inner.len() + TAG) as u16;
            let [hi, lo] = len.to_be_bytes();
            let header = [23, 3, 3, hi, lo];
            let nonce = rustls::crypto::cipher::Nonce::new(&self.iv, self.seq).0;
            self.key
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(header),
                    &mut inner,
                )
                .unwrap();
            if rec.corrupt {
                inner[0] ^= 1;
            }
            self.seq += 1;
            if rec.rotate {
                *self = Keys::new(expand_label(&self.secret, "traffic upd", self.secret.len()));
            }
            [&header[..], &inner].concat()
        }
    }

    /// [`crafted`], with `first` sent right behind the server's first
    /// flight (its Finished), before the client's Finished is in: what Go's
    /// crypto/tls does with its session tickets.
    async fn crafted_flights(ca: &TestCa, first: Vec<Rec>, records: Vec<Rec>) -> SocketAddr {
        use std::io::Read;
        let mut config = (*ca.server_config_for(suites::TLS13_AES_128_GCM_SHA256)).clone();
        config.send_tls13_tickets = 0;
        let logged = Arc::new(ServerSecret::default());
        config.key_log = logged.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut conn = ServerConnection::new(Arc::new(config)).unwrap();
            let mut inbuf = vec![0u8; 1 << 16];
            // rustls's handshake, up to its Finished (its traffic secret
            // is logged then).
            while logged.0.lock().unwrap().is_empty() || conn.wants_write() {
                if conn.wants_write() {
                    let mut out = Vec::new();
                    while conn.wants_write() {
                        conn.write_tls(&mut out).unwrap();
                    }
                    tcp.write_all(&out).await.unwrap();
                    continue;
                }
                let n = tcp.read(&mut inbuf).await.unwrap();
                assert!(n > 0, "the client left during the handshake");
                conn.read_tls(&mut &inbuf[..n]).unwrap();
                conn.process_new_packets().unwrap();
            }
            let mut keys = Keys::new(logged.0.lock().unwrap().clone());
            for rec in first {
                tcp.write_all(&keys.seal(rec)).await.unwrap();
            }
            // The client's Finished and its request.
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let n = tcp.read(&mut inbuf).await.unwrap();
                if n == 0 {
                    return;
                }
                conn.read_tls(&mut &inbuf[..n]).unwrap();
                conn.process_new_packets().unwrap();
                let mut b = [0u8; 512];
                while let Ok(n @ 1..) = conn.reader().read(&mut b) {
                    head.extend_from_slice(&b[..n]);
                }
            }
            for rec in records {
                if tcp.write_all(&keys.seal(rec)).await.is_err() {
                    return;
                }
            }
        });
        addr
    }

    /// A valid NewSessionTicket message (RFC 8446 4.6.1), header included.
    fn ticket() -> Vec<u8> {
        let body = [0, 0, 0x0e, 0x10, 1, 2, 3, 4, 1, 9, 0, 4, 1, 2, 3, 4, 0, 0];
        let mut m = vec![4, 0, 0, body.len() as u8];
        m.extend_from_slice(&body);
        m
    }

    #[tokio::test]
    async fn what_rustls_never_sends_is_read_as_rfc_8446_says() {
        let ca = TestCa::new();
        let full = vec![b'x'; MAX_PLAINTEXT];
        let t = ticket();
        let mut records = vec![
            Rec {
                padding: 100,
                ..data(b"hello")
            },
            // Both kinds of key update (rustls itself sends only
            // update_requested): the client's keys follow the server's.
            key_update(false),
            key_update(true),
            // A ticket split across two records, then one coalesced with
            // a second ticket.
            handshake(&t[..3]),
            handshake(&t[3..]),
            handshake(&[t.clone(), t.clone()].concat()),
            data(b" world"),
            alert(1, 90), // user_canceled, a warning
            data(&full),  // the largest record: 2^14 + 1 inner bytes
        ];
        // As many empty records in a row as allowed, then data.
        records.extend((0..32).map(|_| data(b"")));
        records.push(data(b"!"));
        records.push(alert(1, 0)); // close_notify
        records.push(data(b"after the end: never read"));
        let addr = crafted(&ca, records).await;
        let mut s = open(addr, client_config(&ca)).await;
        let (got, end) = read_all(&mut s, &[7, 5000]).await;
        end.unwrap();
        assert!(got == [&b"hello world"[..], &full, b"!"].concat());
    }

    /// A session ticket sent with the server's first flight, split across
    /// two records of which the second comes only after the request, is
    /// read as rustls reads it (on main: rustls held the first half when
    /// it handed the keys over, and the second half was an error).
    #[tokio::test]
    async fn a_first_flight_ticket_split_across_records_is_taken() {
        let ca = TestCa::new();
        let t = ticket();
        for cut in [1, 4, 10] {
            let addr = crafted_flights(
                &ca,
                vec![handshake(&t[..cut])],
                vec![handshake(&t[cut..]), data(b"hello"), alert(1, 0)],
            )
            .await;
            let mut s = open(addr, client_config(&ca)).await;
            let (got, end) = read_all(&mut s, &[4096]).await;
            end.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(got, b"hello", "cut at {cut}");
        }
        // And a whole ticket there, then one split after the request.
        let addr = crafted_flights(
            &ca,
            vec![handshake(&t)],
            vec![
                handshake(&t[..7]),
                handshake(&t[7..]),
                data(b"hi"),
                alert(1, 0),
            ],
        )
        .await;
        let mut s = open(addr, client_config(&ca)).await;
        let (got, end) = read_all(&mut s, &[4096]).await;
        end.unwrap();
        assert_eq!(got, b"hi");
    }

    /// A key update the server asks for before its first data: rustls
    /// takes it before the hand-over and switches its own sending keys, so
    /// this client sends no alert the server could not open; the data is
    /// read all the same.
    #[tokio::test]
    async fn a_key_update_before_the_data_is_read_and_silences_the_alerts() {
        let ca = TestCa::new();
        let addr = crafted(&ca, vec![key_update(true), data(b"hi"), alert(1, 0)]).await;
        let mut s = open(addr, client_config(&ca)).await;
        assert!(s.tx.is_none(), "no sealer for keys the server lacks");
        let (got, end) = read_all(&mut s, &[4096]).await;
        end.unwrap();
        assert_eq!(got, b"hi");
        // A key update that was not requested leaves the sending keys.
        let addr = crafted(&ca, vec![key_update(false), data(b"hi"), alert(1, 0)]).await;
        let s = open(addr, client_config(&ca)).await;
        assert!(s.tx.is_some());
    }

    /// A TLS 1.2 server that asks to renegotiate (HelloRequest) before or
    /// in the middle of its answer, and sends the rest only once it hears
    /// back (or after 5 s): returns the client's answer, opened.
    async fn renegotiating(
        ca: &TestCa,
        hello_first: bool,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<Option<(ContentType, Vec<u8>)>>,
    ) {
        let suite = suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256;
        let mut config = (*ca.server_config_for(suite)).clone();
        config.enable_secret_extraction = true;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = accept(listener, Arc::new(config)).await;
            let (mut tcp, conn) = s.into_inner();
            let secrets = conn.dangerous_extract_secrets().unwrap();
            let (seq, tx) = secrets.tx;
            let mut sealer = Sealer::new(suite, tx, seq).unwrap();
            let (seq, rx) = secrets.rx;
            let mut opener = Opener::new(suite, rx, seq).unwrap();
            let mut flight = Vec::new();
            for at in 0..2 {
                let record = if (at == 0) == hello_first {
                    sealer.seal(ContentType::Handshake, &[0, 0, 0, 0])
                } else {
                    sealer.seal(ContentType::ApplicationData, b"first ")
                };
                flight.extend(record.unwrap());
            }
            tcp.write_all(&flight).await.unwrap();
            // The client's answer, or none within 5 s.
            let mut header = [0u8; HEADER];
            let heard = tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut header))
                .await
                .is_ok_and(|r| r.is_ok());
            let answer = if heard {
                let mut payload = vec![0u8; payload_len(&header)];
                tcp.read_exact(&mut payload).await.unwrap();
                let (kind, range) = opener
                    .open(ProtocolVersion::TLSv1_2, header, &mut payload)
                    .unwrap();
                Some((kind, payload[range].to_vec()))
            } else {
                None
            };
            let rest = [
                sealer
                    .seal(ContentType::ApplicationData, b"second")
                    .unwrap(),
                sealer.seal(ContentType::Alert, &[1, 0]).unwrap(),
            ];
            let _ = tcp.write_all(&rest.concat()).await;
            answer
        });
        (addr, server)
    }

    /// A TLS 1.2 HelloRequest gets a no_renegotiation warning (RFC 5746
    /// 4.2), before the answer (rustls's own reply) and in the middle of
    /// it (this layer's); on main the second was ignored, and a server
    /// waiting for the renegotiation stalled the download until the idle
    /// timeout.
    #[tokio::test]
    async fn a_tls12_hello_request_is_answered_with_no_renegotiation() {
        let ca = TestCa::new();
        for hello_first in [false, true] {
            let (addr, server) = renegotiating(&ca, hello_first).await;
            let mut s = open(addr, client_config(&ca)).await;
            let (got, end) = read_all(&mut s, &[4096]).await;
            end.unwrap_or_else(|e| panic!("hello first {hello_first}: {e}"));
            assert_eq!(got, b"first second", "hello first {hello_first}");
            let answer = server.await.unwrap();
            assert_eq!(
                answer,
                Some((
                    ContentType::Alert,
                    vec![1, u8::from(AlertDescription::NoRenegotiation)]
                )),
                "hello first {hello_first}"
            );
        }
    }

    #[tokio::test]
    async fn what_rfc_8446_forbids_is_an_error_after_the_good_bytes() {
        let ca = TestCa::new();
        let oversized = vec![b'x'; MAX_PLAINTEXT + 1];
        let cases: Vec<(Vec<Rec>, Error)> = vec![
            (
                // A key update with more of a message after it.
                vec![handshake(&[24, 0, 0, 1, 0, 4, 0])],
                PeerMisbehaved::KeyEpochWithPendingFragment.into(),
            ),
            (
                vec![alert(2, 40)],
                Error::AlertReceived(AlertDescription::HandshakeFailure),
            ),
            (
                vec![alert(3, 0)],
                Error::InvalidMessage(InvalidMessage::UnexpectedMessage("alert level")),
            ),
            (
                vec![alert(1, 40)], // TLS 1.3 has no warnings but user_canceled
                Error::AlertReceived(AlertDescription::HandshakeFailure),
            ),
            (
                (0..5).map(|_| alert(1, 90)).collect(),
                PeerMisbehaved::TooManyWarningAlertsReceived.into(),
            ),
            (
                (0..33).map(|_| data(b"")).collect(),
                PeerMisbehaved::TooManyEmptyFragments.into(),
            ),
            (vec![data(&oversized)], Error::PeerSentOversizedRecord),
            (
                vec![handshake(b"")],
                Error::InvalidMessage(InvalidMessage::InvalidEmptyPayload),
            ),
            (
                vec![Rec {
                    padding: 3,
                    ..data(b"")
                }
                .with_kind_zero()],
                PeerMisbehaved::IllegalTlsInnerPlaintext.into(),
            ),
            (
                vec![Rec {
                    corrupt: true,
                    ..data(b"forged")
                }],
                Error::DecryptError,
            ),
        ];
        for (i, (bad, expected)) in cases.into_iter().enumerate() {
            let mut records = vec![data(b"good ")];
            records.extend(bad);
            records.push(data(b"never"));
            let addr = crafted(&ca, records).await;
            let mut s = open(addr, client_config(&ca)).await;
            let (got, end) = read_all(&mut s, &[5000]).await;
            let e = end.expect_err("must fail");
            assert_eq!(got, b"good ", "case {i}");
            assert_eq!(tls_error(&e), Some(&expected), "case {i}: {e}");
            // The error stays: the record after it is never read.
            let again = s.read(&mut [0u8; 100]).await.unwrap_err();
            assert_eq!(tls_error(&again), Some(&expected), "case {i}: {again}");
        }
    }

    impl Rec {
        /// All zeros inside: no content type at all.
        fn with_kind_zero(self) -> Rec {
            Rec {
                kind: ContentType::from(0),
                ..self
            }
        }
    }
}
