//! `gateway-bench`: a small closed-loop load generator for the gateway's REST API, used by
//! `scripts/bench` (see `docs/benchmarks.md`).
//!
//! `gateway-bench http <url>` opens N keep-alive HTTP/1.1 connections; each sends the next `GET`
//! as soon as the previous answer has been read in full. Requests are authenticated like the
//! stock client does after its first call: with the session cookie the gateway set in answer to
//! one Basic-authenticated request (or, with `--basic`, with the Basic header every time).
//! After a warm-up it counts the requests completed in the measuring window and reports the
//! rate and latency percentiles.

use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::header::{HeaderValue, AUTHORIZATION, COOKIE, HOST, SET_COOKIE};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(
    name = "gateway-bench",
    about = "Benchmark helpers for the Dask gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Closed-loop GET load on one URL over keep-alive connections.
    Http(HttpArgs),
    /// A bare TCP splice (accept, dial the target, copy both ways) with a chosen copy buffer
    /// size: a yardstick for the gateway's scheduler proxy. Prints `listening <addr>` and serves
    /// until killed.
    Splice(SpliceArgs),
}

#[derive(Args, Clone)]
struct SpliceArgs {
    /// Where to listen (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where to connect each accepted connection, `host:port`.
    #[arg(long)]
    target: String,
    /// Copy buffer per direction, KiB (tokio's `copy_bidirectional` default is 8).
    #[arg(long, default_value_t = 8)]
    buffer_kib: usize,
}

#[derive(Args, Clone)]
struct HttpArgs {
    /// Full URL, e.g. `http://127.0.0.1:8000/api/v1/clusters/`.
    url: String,
    /// User name for Basic authentication.
    #[arg(long, default_value = "bench")]
    user: String,
    /// Password for Basic authentication.
    #[arg(long, default_value = "")]
    password: String,
    /// Send the Basic header on every request instead of the session cookie.
    #[arg(long)]
    basic: bool,
    /// Concurrent connections (one caller each).
    #[arg(short = 'c', long, default_value_t = 16)]
    connections: usize,
    /// Measuring window in seconds.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds before the window (requests are sent but not counted).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Client runtime threads (1 = single-threaded runtime, leaving the other cores to the server).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Http(args) => {
            let rt = if args.threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(args.threads)
                    .enable_all()
                    .build()?
            };
            rt.block_on(http_load(args))
        }
        Cmd::Splice(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(splice(args)),
    }
}

async fn splice(args: SpliceArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("listening {}", listener.local_addr()?);
    let size = args.buffer_kib.max(1) * 1024;
    loop {
        let (mut client, _) = listener.accept().await?;
        let target = args.target.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let Ok(mut upstream) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            let _ =
                tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, size, size)
                    .await;
        });
    }
}

/// Where to connect and what to put in the request line and `Host` header.
#[derive(Clone)]
struct Target {
    addr: String,
    host: HeaderValue,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("only http:// URLs are supported: {url}");
        }
        let auth = uri.authority().context("URL without host")?;
        let port = auth.port_u16().unwrap_or(80);
        let addr = format!("{}:{port}", auth.host());
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        Ok(Target {
            addr,
            host: HeaderValue::from_str(auth.as_str())?,
            path,
        })
    }
}

type Sender = SendRequest<Empty<Bytes>>;

async fn connect(target: &Target) -> Result<Sender> {
    let stream = TcpStream::connect(&target.addr)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request; returns the status, the `Set-Cookie` value (name=value part) if any, and the
/// body length.
async fn get(
    sender: &mut Sender,
    target: &Target,
    auth: &(http::HeaderName, HeaderValue),
) -> Result<(StatusCode, Option<String>, usize)> {
    sender.ready().await?;
    let req = Request::get(target.path.as_str())
        .header(HOST, target.host.clone())
        .header(auth.0.clone(), auth.1.clone())
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let len = body.collect().await?.to_bytes().len();
    let cookie = parts
        .headers
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_string);
    Ok((parts.status, cookie, len))
}

#[derive(Default)]
struct Stats {
    latencies_us: Vec<u32>,
    errors: u64,
    bytes: u64,
    last_status: u16,
}

async fn caller(
    target: Target,
    auth: (http::HeaderName, HeaderValue),
    measure_from: Instant,
    end: Instant,
) -> Result<Stats> {
    let mut sender = connect(&target).await?;
    let mut stats = Stats {
        latencies_us: Vec::with_capacity(1 << 18),
        ..Stats::default()
    };
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let (status, _, len) = get(&mut sender, &target, &auth).await?;
        let t1 = Instant::now();
        if t0 >= measure_from && t1 <= end {
            stats
                .latencies_us
                .push(t1.duration_since(t0).as_micros().min(u32::MAX as u128) as u32);
            stats.bytes += len as u64;
            stats.last_status = status.as_u16();
            if !status.is_success() {
                stats.errors += 1;
            }
        }
    }
    Ok(stats)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

async fn http_load(args: HttpArgs) -> Result<()> {
    let target = Target::parse(&args.url)?;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", args.user, args.password))
    );
    let basic = (AUTHORIZATION, HeaderValue::from_str(&basic)?);

    // One Basic-authenticated request, as the client's 401 retry would send; keep its cookie.
    let mut probe = connect(&target).await?;
    let (status, cookie, _) = get(&mut probe, &target, &basic).await?;
    if !status.is_success() {
        bail!("GET {} as {:?} answered {status}", args.url, args.user);
    }
    drop(probe);
    let (auth, auth_kind) = match (&cookie, args.basic) {
        (Some(c), false) => ((COOKIE, HeaderValue::from_str(c)?), "cookie"),
        _ => (basic, "basic"),
    };

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = (0..args.connections.max(1))
        .map(|_| tokio::spawn(caller(target.clone(), auth.clone(), measure_from, end)))
        .collect();
    let mut all = Stats::default();
    for t in tasks {
        let s = t.await??;
        all.latencies_us.extend_from_slice(&s.latencies_us);
        all.errors += s.errors;
        all.bytes += s.bytes;
        all.last_status = s.last_status;
    }
    all.latencies_us.sort_unstable();
    let n = all.latencies_us.len() as u64;
    let rps = n as f64 / args.duration;
    let mean = if n > 0 {
        all.latencies_us.iter().map(|&v| v as f64).sum::<f64>() / n as f64 / 1000.0
    } else {
        0.0
    };
    let (p50, p90, p99, max) = (
        percentile(&all.latencies_us, 50.0),
        percentile(&all.latencies_us, 90.0),
        percentile(&all.latencies_us, 99.0),
        percentile(&all.latencies_us, 100.0),
    );
    let body_bytes = all.bytes.checked_div(n).unwrap_or(0);
    if args.json {
        let out = serde_json::json!({
            "url": args.url,
            "auth": auth_kind,
            "connections": args.connections,
            "duration_s": args.duration,
            "requests": n,
            "errors": all.errors,
            "requests_per_s": rps,
            "latency_ms": {"mean": mean, "p50": p50, "p90": p90, "p99": p99, "max": max},
            "response_body_bytes": body_bytes,
        });
        println!("{out}");
    } else {
        println!(
            "{n} requests in {:.1} s over {} connections ({auth_kind} auth): {rps:.0} req/s, \
             latency mean {mean:.2} ms p50 {p50:.2} ms p90 {p90:.2} ms p99 {p99:.2} ms \
             max {max:.2} ms, {} errors, {body_bytes} B bodies",
            args.duration, args.connections, all.errors
        );
    }
    if all.errors > 0 {
        bail!(
            "{} of {n} requests failed (last status {})",
            all.errors,
            all.last_status
        );
    }
    Ok(())
}
