//! Just enough of Dask's comm protocol to ask a scheduler who it is and whether it is idle:
//! the framing of `distributed.comm.tcp`, the connection handshake, and the `identity` and
//! `check_idle` requests.
//!
//! A message is msgpack in the first of its frames. On the wire: a little-endian `u64` with the
//! length of what follows up to the "split" frames, then the prelude (`u64` frame count, one
//! `u64` length per frame), then the frames.

use crate::CommError;
use rmpv::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest message accepted (a scheduler with very many workers stays far below it).
const MAX_MESSAGE: u64 = 256 * 1024 * 1024;
/// Largest answer to a question whose answer is a few fields (the handshake, `check_idle`):
/// the gateway asks these of schedulers that run their users' code, and must not hold a
/// quarter of a gigabyte per question because one of them says so.
const MAX_SHORT_ANSWER: u64 = 64 * 1024;

/// What a scheduler says about itself.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SchedulerIdentity {
    /// The scheduler's id.
    pub id: String,
    /// Its own address (inside the cluster).
    pub address: String,
    /// Connected workers.
    pub workers: Vec<WorkerIdentity>,
}

impl SchedulerIdentity {
    /// Threads of all workers.
    pub fn threads(&self) -> u64 {
        self.workers.iter().map(|w| w.nthreads).sum()
    }

    /// Memory limit of all workers, in bytes.
    pub fn memory(&self) -> u64 {
        self.workers.iter().map(|w| w.memory_limit).sum()
    }
}

/// One worker as the scheduler reports it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WorkerIdentity {
    /// Its address.
    pub address: String,
    /// Its name (the gateway's worker name).
    pub name: String,
    /// Threads.
    pub nthreads: u64,
    /// Memory limit in bytes (0 when unlimited).
    pub memory_limit: u64,
}

/// Writes one message.
pub async fn write_message<S: AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &Value,
) -> Result<(), CommError> {
    let mut frame = Vec::new();
    rmpv::encode::write_value(&mut frame, msg)
        .map_err(|e| CommError::Protocol(format!("encoding a message: {e}")))?;
    let mut out = Vec::with_capacity(frame.len() + 24);
    let prelude_len = 16u64;
    out.extend_from_slice(&(prelude_len + frame.len() as u64).to_le_bytes());
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(&(frame.len() as u64).to_le_bytes());
    out.extend_from_slice(&frame);
    stream.write_all(&out).await.map_err(io)?;
    stream.flush().await.map_err(io)
}

/// Reads one message (its first frame, decoded).
pub async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Value, CommError> {
    read_message_of_at_most(stream, MAX_MESSAGE).await
}

/// Reads one message of at most `limit` bytes, frames and prelude included.
async fn read_message_of_at_most<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: u64,
) -> Result<Value, CommError> {
    let first = read_u64(stream).await?;
    if !(8..=limit).contains(&first) {
        return Err(CommError::Protocol(format!("bad message length {first}")));
    }
    let mut head = vec![0u8; first as usize];
    stream.read_exact(&mut head).await.map_err(io)?;
    let n_frames = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if n_frames == 0 || n_frames > 1 << 20 || 8 * (1 + n_frames) > first {
        return Err(CommError::Protocol(format!("bad frame count {n_frames}")));
    }
    let prelude = 8 * (1 + n_frames);
    let lengths: Vec<u64> = (0..n_frames as usize)
        .map(|i| u64::from_le_bytes(head[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes")))
        .collect();
    let total = lengths
        .iter()
        .try_fold(0u64, |sum, l| sum.checked_add(*l))
        .unwrap_or(u64::MAX);
    if total.saturating_add(prelude) > limit {
        return Err(CommError::Protocol("message too large".into()));
    }
    // Frames not covered by the first length follow on their own.
    let mut rest = vec![0u8; (total + prelude).saturating_sub(first) as usize];
    stream.read_exact(&mut rest).await.map_err(io)?;
    head.extend_from_slice(&rest);
    let start = prelude as usize;
    let end = start + lengths[0] as usize;
    let mut frame = head
        .get(start..end)
        .ok_or_else(|| CommError::Protocol("truncated frame".into()))?;
    rmpv::decode::read_value(&mut frame)
        .map_err(|e| CommError::Protocol(format!("decoding a message: {e}")))
}

async fn read_u64<S: AsyncRead + Unpin>(stream: &mut S) -> Result<u64, CommError> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b).await.map_err(io)?;
    Ok(u64::from_le_bytes(b))
}

fn io(e: std::io::Error) -> CommError {
    CommError::Connection(e.to_string())
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.as_str().unwrap_or_default().to_string(),
        Some(Value::Nil) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn number(v: Option<&Value>) -> u64 {
    match v {
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .unwrap_or(0),
        None => 0,
    }
}

/// The handshake both ends of a new Dask comm send first: no compression.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<(), CommError> {
    let info = map(vec![
        ("compression", Value::Nil),
        (
            "python",
            Value::Array(vec![Value::from(3), Value::from(11), Value::from(0)]),
        ),
        ("pickle-protocol", Value::from(5)),
    ]);
    write_message(stream, &info).await?;
    let remote = read_message_of_at_most(stream, MAX_SHORT_ANSWER).await?;
    if get(&remote, "compression").is_none() && get(&remote, "pickle-protocol").is_none() {
        return Err(CommError::Protocol(
            "the peer did not answer the Dask handshake".into(),
        ));
    }
    Ok(())
}

/// Asks the scheduler on `stream` (already handshaken) for its identity, all workers included.
pub async fn identity<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<SchedulerIdentity, CommError> {
    let request = map(vec![
        ("op", Value::from("identity")),
        ("reply", Value::Boolean(true)),
        ("n_workers", Value::from(-1)),
    ]);
    write_message(stream, &request).await?;
    let reply = read_message(stream).await?;
    if let Some(status) = get(&reply, "status").and_then(Value::as_str) {
        if status != "OK" {
            return Err(CommError::Protocol(format!(
                "identity failed: {}",
                text(get(&reply, "exception_text").or(get(&reply, "text")))
            )));
        }
    }
    let workers = match get(&reply, "workers") {
        Some(Value::Map(entries)) => entries
            .iter()
            .map(|(addr, w)| WorkerIdentity {
                address: text(Some(addr)),
                name: text(get(w, "name")),
                nthreads: number(get(w, "nthreads")),
                memory_limit: number(get(w, "memory_limit")),
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(SchedulerIdentity {
        id: text(get(&reply, "id")),
        address: text(get(&reply, "address")),
        workers,
    })
}

/// Asks the scheduler on `stream` (already handshaken) whether it is idle, by its own measure
/// (`Scheduler.check_idle`): the time since which it has made no task transitions and had
/// nothing queued, unrunnable or processing (seconds since the Unix epoch on the scheduler's
/// clock), or `None` while it is busy.
///
/// The check has a memory: it compares the scheduler's transition count with the one the
/// previous check saw, so a scheduler answers `None` on the first check after any work and
/// the time of that second check afterwards.
pub async fn check_idle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<Option<f64>, CommError> {
    let request = map(vec![
        ("op", Value::from("check_idle")),
        ("reply", Value::Boolean(true)),
    ]);
    write_message(stream, &request).await?;
    match read_message_of_at_most(stream, MAX_SHORT_ANSWER).await? {
        Value::Nil => Ok(None),
        Value::F64(t) if t.is_finite() => Ok(Some(t)),
        Value::F32(t) if t.is_finite() => Ok(Some(f64::from(t))),
        Value::Integer(t) => Ok(t.as_f64()),
        other => Err(CommError::Protocol(format!(
            "check_idle failed: {}",
            match get(&other, "status") {
                Some(_) => text(get(&other, "exception_text").or(get(&other, "text"))),
                None => format!("unexpected answer {other}"),
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_split_frames_are_read() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msg = map(vec![("op", Value::from("identity")), ("n", Value::from(3))]);
        write_message(&mut a, &msg).await.unwrap();
        assert_eq!(read_message(&mut b).await.unwrap(), msg);

        // Two frames, the second sent after the first length (as Dask does with buffers).
        let mut frame = Vec::new();
        rmpv::encode::write_value(&mut frame, &msg).unwrap();
        let extra = b"0123456789";
        let mut wire = Vec::new();
        wire.extend_from_slice(&(24 + frame.len() as u64).to_le_bytes());
        wire.extend_from_slice(&2u64.to_le_bytes());
        wire.extend_from_slice(&(frame.len() as u64).to_le_bytes());
        wire.extend_from_slice(&(extra.len() as u64).to_le_bytes());
        wire.extend_from_slice(&frame);
        wire.extend_from_slice(extra);
        a.write_all(&wire).await.unwrap();
        write_message(&mut a, &Value::from("next")).await.unwrap();
        assert_eq!(read_message(&mut b).await.unwrap(), msg);
        assert_eq!(read_message(&mut b).await.unwrap(), Value::from("next"));
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        for wire in [
            vec![0u8; 8],
            [u64::MAX.to_le_bytes()].concat(),
            [16u64.to_le_bytes(), 0u64.to_le_bytes(), 0u64.to_le_bytes()].concat(),
            [16u64.to_le_bytes(), 1u64.to_le_bytes(), 99u64.to_le_bytes()].concat(),
            [
                16u64.to_le_bytes(),
                u64::MAX.to_le_bytes(),
                1u64.to_le_bytes(),
            ]
            .concat(),
            [
                24u64.to_le_bytes(),
                2u64.to_le_bytes(),
                u64::MAX.to_le_bytes(),
                2u64.to_le_bytes(),
            ]
            .concat(),
        ] {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            a.write_all(&wire).await.unwrap();
            drop(a);
            assert!(read_message(&mut b).await.is_err());
        }
    }

    /// A scheduler stand-in: answers the first request on `b` with `reply`, hands back the request.
    async fn answer(mut b: tokio::io::DuplexStream, reply: Value) -> Value {
        let request = read_message(&mut b).await.unwrap();
        write_message(&mut b, &reply).await.unwrap();
        request
    }

    #[tokio::test]
    async fn check_idle_reads_a_time_a_nil_or_a_refusal() {
        for (reply, want) in [
            (Value::F64(1_796_641_009.5), Ok(Some(1_796_641_009.5))),
            (Value::Nil, Ok(None)),
            (Value::from(1_796_641_009u64), Ok(Some(1_796_641_009.0))),
            (
                map(vec![
                    ("status", Value::from("uncaught-error")),
                    ("text", Value::from("No handler check_idle found")),
                ]),
                Err("check_idle failed: No handler check_idle found".to_string()),
            ),
            (
                Value::from("busy"),
                Err("check_idle failed: unexpected answer \"busy\"".to_string()),
            ),
        ] {
            let (mut a, b) = tokio::io::duplex(1 << 16);
            let peer = tokio::spawn(answer(b, reply));
            let got = check_idle(&mut a).await.map_err(|e| e.to_string());
            assert_eq!(got, want);
            let request = peer.await.unwrap();
            assert_eq!(
                get(&request, "op").and_then(Value::as_str),
                Some("check_idle")
            );
        }
    }

    #[tokio::test]
    async fn short_questions_refuse_long_answers_before_reading_them() {
        // A scheduler announcing a 200 MiB answer to `check_idle` or the handshake gets an
        // error at once: nothing that size is read or allocated.
        for long in [200u64 << 20, MAX_SHORT_ANSWER + 1] {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            let peer = tokio::spawn(async move {
                let _ = read_message(&mut b).await;
                b.write_all(&long.to_le_bytes()).await.unwrap();
                b
            });
            let err = check_idle(&mut a).await.unwrap_err().to_string();
            assert!(err.contains("bad message length"), "{err}");
            drop(peer.await.unwrap());
        }
        // Frames that add up past the limit after a small first length.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let peer = tokio::spawn(async move {
            let _ = read_message(&mut b).await;
            let mut wire = Vec::new();
            wire.extend_from_slice(&24u64.to_le_bytes());
            wire.extend_from_slice(&2u64.to_le_bytes());
            wire.extend_from_slice(&8u64.to_le_bytes());
            wire.extend_from_slice(&(100u64 << 20).to_le_bytes());
            b.write_all(&wire).await.unwrap();
            b
        });
        let err = handshake(&mut a).await.unwrap_err().to_string();
        assert!(err.contains("too large"), "{err}");
        drop(peer.await.unwrap());
        // A message of the same size is fine where no limit is asked for.
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let big = Value::Binary(vec![7; (MAX_SHORT_ANSWER + 10) as usize]);
        let sent = big.clone();
        tokio::spawn(async move { write_message(&mut a, &sent).await.unwrap() });
        assert_eq!(read_message(&mut b).await.unwrap(), big);
    }
}
