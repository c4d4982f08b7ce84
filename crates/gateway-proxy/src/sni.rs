//! Extract the SNI server name from the first bytes of a connection.
//!
//! [`sniff`] is a pure function over the bytes read so far. It reassembles the first handshake
//! message from as many TLS records as needed (each at most the 16 KiB plaintext record limit,
//! the whole message capped at [`MAX_HANDSHAKE`]), checks that it is a ClientHello and returns the
//! first `host_name` entry of its `server_name` extension. It never panics and never allocates
//! more than the input size; a truncated valid ClientHello always yields [`Sniff::Incomplete`].

/// Largest TLS plaintext record payload (RFC 8446 section 5.1).
pub const MAX_RECORD: usize = 16 * 1024;

/// Largest ClientHello handshake message accepted (body plus 4-byte header).
pub const MAX_HANDSHAKE: usize = 64 * 1024;

/// Largest number of input bytes [`sniff`] may need: once a caller has buffered this many bytes,
/// `sniff` no longer answers [`Sniff::Incomplete`].
pub const MAX_SNIFF_BYTES: usize = MAX_HANDSHAKE + 16 * 1024;

const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const NAME_TYPE_HOST_NAME: u8 = 0x00;

/// Outcome of looking at the first bytes of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// The bytes are not a TLS handshake record (e.g. plain HTTP).
    NotTls,
    /// Possibly TLS, but more bytes are needed to decide.
    Incomplete,
    /// A complete, well-formed ClientHello, with its SNI host name if it carries one.
    Tls {
        /// The `host_name` from the `server_name` extension, if any.
        sni: Option<String>,
    },
}

/// Why a byte stream that starts like TLS is not an acceptable ClientHello.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// A record header announces a payload larger than the TLS record limit.
    #[error("TLS record length {0} exceeds the 16 KiB limit")]
    RecordTooLarge(usize),
    /// A handshake record with an empty payload.
    #[error("empty TLS handshake record")]
    EmptyRecord,
    /// A non-handshake record appeared before the ClientHello was complete.
    #[error("unexpected TLS record type {0:#04x} inside the ClientHello")]
    UnexpectedRecord(u8),
    /// The first handshake message is not a ClientHello.
    #[error("first TLS handshake message has type {0}, not ClientHello")]
    NotClientHello(u8),
    /// The ClientHello (or the records carrying it) exceeds the size cap.
    #[error("ClientHello larger than the {MAX_HANDSHAKE} byte cap")]
    TooLarge,
    /// A length field or structure inside the ClientHello is inconsistent.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// Classify the first bytes of a connection and, for TLS, extract the SNI.
///
/// Returns [`Sniff::NotTls`] as soon as the first byte (or the record version major byte) rules
/// TLS out, [`Sniff::Incomplete`] while a well-formed prefix needs more bytes, and an error for
/// input that starts as a TLS handshake record but cannot be a valid ClientHello.
pub fn sniff(buf: &[u8]) -> Result<Sniff, SniError> {
    match buf {
        [] => return Ok(Sniff::Incomplete),
        [first, ..] if *first != CONTENT_HANDSHAKE => return Ok(Sniff::NotTls),
        [_, major, ..] if *major != 0x03 => return Ok(Sniff::NotTls),
        _ => {}
    }

    // Reassemble the handshake message from consecutive handshake records.
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    loop {
        if pos + 5 > MAX_SNIFF_BYTES {
            return Err(SniError::TooLarge);
        }
        let header = match buf.get(pos..pos + 5) {
            Some(h) => h,
            None => {
                // Partial header: validate what we have of it.
                let partial = &buf[pos..];
                if let Some(&t) = partial.first() {
                    if t != CONTENT_HANDSHAKE {
                        return Err(SniError::UnexpectedRecord(t));
                    }
                }
                if let Some(&major) = partial.get(1) {
                    if major != 0x03 {
                        return Err(SniError::Malformed("bad record version"));
                    }
                }
                return Ok(Sniff::Incomplete);
            }
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(SniError::UnexpectedRecord(header[0]));
        }
        if header[1] != 0x03 {
            return Err(SniError::Malformed("bad record version"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return Err(SniError::EmptyRecord);
        }
        if len > MAX_RECORD {
            return Err(SniError::RecordTooLarge(len));
        }
        let start = pos + 5;
        let end = start + len;
        if end > MAX_SNIFF_BYTES {
            return Err(SniError::TooLarge);
        }
        let available = &buf[start..end.min(buf.len())];
        handshake.extend_from_slice(available);

        // Check the handshake header as soon as it is there, even if the record is partial.
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(SniError::NotClientHello(handshake[0]));
            }
            let body_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            let total = body_len + 4;
            if total > MAX_HANDSHAKE {
                return Err(SniError::TooLarge);
            }
            if handshake.len() >= total {
                // Trailing bytes after the ClientHello in the same record belong to later
                // handshake messages (there are none from a client, but tolerate them).
                return parse_client_hello(&handshake[4..total]).map(|sni| Sniff::Tls { sni });
            }
        } else if let Some(&t) = handshake.first() {
            if t != HANDSHAKE_CLIENT_HELLO {
                return Err(SniError::NotClientHello(t));
            }
        }

        if end > buf.len() {
            return Ok(Sniff::Incomplete);
        }
        pos = end;
    }
}

/// Bounds-checked big-endian reader over a byte slice.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if n > self.data.len() {
            return Err(SniError::Malformed(what));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
}

/// Parse a ClientHello body (after the 4-byte handshake header) and return its SNI host name.
fn parse_client_hello(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader::new(body);
    r.take(2, "truncated legacy_version")?;
    r.take(32, "truncated random")?;
    let session_id = r.vec8("truncated session_id")?;
    if session_id.len() > 32 {
        return Err(SniError::Malformed("session_id longer than 32 bytes"));
    }
    let suites = r.vec16("truncated cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("bad cipher_suites length"));
    }
    let compression = r.vec8("truncated compression_methods")?;
    if compression.is_empty() {
        return Err(SniError::Malformed("empty compression_methods"));
    }
    if r.is_empty() {
        // No extensions at all (very old clients): no SNI.
        return Ok(None);
    }
    let extensions = r.vec16("truncated extensions")?;
    if !r.is_empty() {
        return Err(SniError::Malformed("trailing bytes after extensions"));
    }

    let mut exts = Reader::new(extensions);
    let mut found = None;
    let mut seen_sni = false;
    while !exts.is_empty() {
        let ext_type = exts.u16("truncated extension type")?;
        let data = exts.vec16("truncated extension data")?;
        if ext_type != EXT_SERVER_NAME {
            continue;
        }
        if seen_sni {
            return Err(SniError::Malformed("duplicate server_name extension"));
        }
        seen_sni = true;
        found = parse_server_name(data)?;
    }
    Ok(found)
}

/// Parse the `server_name` extension data and return the first `host_name` entry.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader::new(data);
    let list = r.vec16("truncated server_name_list")?;
    if !r.is_empty() {
        return Err(SniError::Malformed("trailing bytes after server_name_list"));
    }
    if list.is_empty() {
        return Err(SniError::Malformed("empty server_name_list"));
    }
    let mut entries = Reader::new(list);
    let mut host = None;
    while !entries.is_empty() {
        let name_type = entries.u8("truncated name_type")?;
        let name = entries.vec16("truncated server name")?;
        if name_type == NAME_TYPE_HOST_NAME && host.is_none() {
            if name.is_empty() {
                return Err(SniError::Malformed("empty host_name"));
            }
            if !name.iter().all(|b| b.is_ascii_graphic()) {
                return Err(SniError::Malformed("host_name is not printable ASCII"));
            }
            // Printable ASCII is valid UTF-8.
            host = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a minimal ClientHello handshake message (with header) carrying `sni`.
    fn hello_message(sni: Option<&str>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let name = name.as_bytes();
            let mut list = vec![NAME_TYPE_HOST_NAME];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(&data);
        }
        // An unrelated extension (supported_versions) to exercise skipping.
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    fn record(payload: &[u8]) -> Vec<u8> {
        let mut r = vec![CONTENT_HANDSHAKE, 0x03, 0x01];
        r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    #[test]
    fn synthetic_hello() {
        let rec = record(&hello_message(Some("daskgateway-x")));
        assert_eq!(
            sniff(&rec).unwrap(),
            Sniff::Tls {
                sni: Some("daskgateway-x".into())
            }
        );
        let rec = record(&hello_message(None));
        assert_eq!(sniff(&rec).unwrap(), Sniff::Tls { sni: None });
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let rec = record(&hello_message(Some("daskgateway-x")));
        for n in 0..rec.len() {
            assert_eq!(sniff(&rec[..n]).unwrap(), Sniff::Incomplete, "prefix {n}");
        }
    }

    #[test]
    fn split_in_many_records() {
        let msg = hello_message(Some("daskgateway-split"));
        let mut bytes = Vec::new();
        for chunk in msg.chunks(3) {
            bytes.extend_from_slice(&record(chunk));
        }
        assert_eq!(
            sniff(&bytes).unwrap(),
            Sniff::Tls {
                sni: Some("daskgateway-split".into())
            }
        );
        for n in 0..bytes.len() {
            assert_eq!(sniff(&bytes[..n]).unwrap(), Sniff::Incomplete, "prefix {n}");
        }
    }

    #[test]
    fn not_tls() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n").unwrap(), Sniff::NotTls);
        assert_eq!(sniff(b"\x16GET").unwrap(), Sniff::NotTls);
        assert_eq!(sniff(b"\x16").unwrap(), Sniff::Incomplete);
    }

    #[test]
    fn bad_lengths() {
        assert_eq!(sniff(&[0x16, 3, 1, 0, 0]), Err(SniError::EmptyRecord));
        assert_eq!(
            sniff(&[0x16, 3, 1, 0x40, 0x01]),
            Err(SniError::RecordTooLarge(0x4001))
        );
        assert_eq!(
            sniff(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(SniError::NotClientHello(2))
        );
        assert_eq!(
            sniff(&[0x16, 3, 1, 0, 4, 1, 0xff, 0, 0]),
            Err(SniError::TooLarge)
        );
        // Handshake length says 1 byte of body: that cannot hold a ClientHello.
        assert!(matches!(
            sniff(&[0x16, 3, 1, 0, 5, 1, 0, 0, 1, 0]),
            Err(SniError::Malformed(_))
        ));
        // Alert record where the continuation should be.
        let msg = hello_message(Some("daskgateway-x"));
        let mut bytes = record(&msg[..10]);
        bytes.extend_from_slice(&[0x15, 3, 3, 0, 2, 2, 40]);
        assert_eq!(sniff(&bytes), Err(SniError::UnexpectedRecord(0x15)));
    }
}
