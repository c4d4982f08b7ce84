//! `gateway-cli`: manage Dask Gateway clusters from a terminal, over the same REST API and
//! proxy protocol as the Python client (see the `gateway-client` crate).

mod credentials;
mod output;

use clap::{CommandFactory, Parser, Subcommand};
use credentials::CredentialFiles;
use gateway_client::config::{DaskConfig, Overrides};
use gateway_client::tunnel::Tunnel;
use gateway_client::{ClientConfig, ClientError, ClusterStatus, GatewayClient};
use output::{Format, Printer};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::time::Duration;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (gateway unreachable, server error, proxy or TLS failure)
  2  usage error (bad arguments)
  3  cluster not found
  4  unauthorized or forbidden
  5  invalid request (bad option, bad bounds, over a limit) or configuration
  6  conflict (cluster not running) or the cluster ended while waiting
  7  timed out

Settings come from flags, then DASK_GATEWAY__* environment variables, then the dask config
files the Python client reads, read as it reads them (/etc/dask, ~/.config/dask, $DASK_CONFIG:
gateway.address, gateway.proxy-address, gateway.auth.type, gateway.auth.kwargs,
gateway.http-client.proxy, gateway.cluster.options; {VAR} templates). HTTPS trusts the system's
certificates, or SSL_CERT_FILE / SSL_CERT_DIR.

Examples:
  gateway-cli --address http://gateway:8000 new-cluster --opt worker_cores=2 --workers 2 --wait
  gateway-cli list -o json
  gateway-cli info <name>
  gateway-cli adapt <name> --min 1 --max 10
  gateway-cli tunnel <name> --port 8786
  gateway-cli stop --all";

/// Create, inspect, scale and stop Dask clusters on a Dask Gateway.
#[derive(Parser, Debug)]
#[command(name = "gateway-cli", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Gateway address, e.g. http://gateway:8000 [default: gateway.address from dask config].
    #[arg(long, global = true)]
    address: Option<String>,
    /// Scheduler proxy address (host:port, or a port) [default: the gateway address's].
    #[arg(long, global = true)]
    proxy_address: Option<String>,
    /// Authentication: basic, jupyterhub, jwt or none [default: gateway.auth.type, else basic].
    #[arg(long, global = true)]
    auth: Option<String>,
    /// User name for basic auth [default: gateway.auth.kwargs.username, else $USER].
    #[arg(long, global = true)]
    user: Option<String>,
    /// Password for basic auth (prefer the environment variable).
    #[arg(
        long,
        global = true,
        env = "DASK_GATEWAY_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
    /// Token for jwt or jupyterhub auth (prefer DASK_GATEWAY_JWT / JUPYTERHUB_API_TOKEN).
    #[arg(long, global = true, hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a cluster; prints its name, scheduler address and dashboard URL.
    NewCluster {
        /// A cluster option, KEY=VALUE (the value is read as JSON when it parses, e.g. 2,
        /// 1.5, true, {"A": "1"}; otherwise as text). Repeatable.
        #[arg(long = "opt", value_name = "KEY=VALUE")]
        opts: Vec<String>,
        /// Scale to this many workers once running (implies --wait).
        #[arg(long, conflicts_with = "adapt")]
        workers: Option<u64>,
        /// Adaptive scaling between MIN and MAX workers once running (implies --wait).
        #[arg(long, value_name = "MIN:MAX")]
        adapt: Option<String>,
        /// Wait until the cluster is running.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait (up to a year).
        #[arg(long, default_value_t = 300.0, value_parser = seconds)]
        timeout: f64,
    },
    /// List your clusters (all users' for admins).
    List {
        /// Only these statuses (comma separated) [default: pending,running].
        #[arg(long, value_delimiter = ',')]
        status: Vec<String>,
        /// Every status, stopped and failed included.
        #[arg(long, conflicts_with = "status")]
        all: bool,
    },
    /// Status, workers, threads, memory, dashboard and age of a cluster.
    Info {
        /// Cluster name.
        name: String,
    },
    /// What happened to a cluster: created, running, workers started and stopped, failures.
    Events {
        /// Cluster name.
        name: String,
        /// Keep printing new events until the cluster has finished.
        #[arg(long, short)]
        follow: bool,
    },
    /// Set the number of workers (turns adaptive scaling off).
    Scale {
        /// Cluster name.
        name: String,
        /// Workers.
        count: u64,
    },
    /// Scale adaptively between bounds.
    Adapt {
        /// Cluster name.
        name: String,
        /// Minimum workers.
        #[arg(long)]
        min: Option<u64>,
        /// Maximum workers.
        #[arg(long)]
        max: Option<u64>,
    },
    /// Stop a cluster, or all of yours.
    Stop {
        /// Cluster name.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Stop every active cluster you can see.
        #[arg(long)]
        all: bool,
    },
    /// Core-hours and memory used per user, group or cluster (every user's for admins).
    Usage {
        /// Window start: a date (2026-12-01), an RFC 3339 time, or ms since 1970 [default:
        /// the oldest usage kept].
        #[arg(long)]
        since: Option<String>,
        /// Window end, in the same forms [default: now].
        #[arg(long)]
        until: Option<String>,
        /// One row per user, group or cluster.
        #[arg(long, value_enum, default_value_t = UsageBy::User)]
        by: UsageBy,
        /// Only the clusters of this user (admins).
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
        /// Print CSV (for spreadsheets) instead of --output.
        #[arg(long)]
        csv: bool,
    },
    /// The options clusters accept.
    Options,
    /// Print (or open) a cluster's dashboard URL.
    Dashboard {
        /// Cluster name.
        name: String,
        /// Open it in a browser (xdg-open / open).
        #[arg(long)]
        open: bool,
    },
    /// Forward a local TLS port to the scheduler through the proxy, for
    /// distributed.Client("tls://127.0.0.1:PORT") and tools that cannot send SNI.
    Tunnel {
        /// Cluster name.
        name: String,
        /// Local port (0: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Local address to listen on (an IPv4 or IPv6 address).
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// Directory for the cluster's certificate and key: yours, and closed to others
        /// (created 0700 if missing) [default: a new temporary directory, removed on exit].
        #[arg(long)]
        credentials_dir: Option<PathBuf>,
    },
    /// Shell completion script.
    Completions {
        /// Shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Why a command failed: a client error, or bad input found before calling the gateway.
enum Failure {
    Client(ClientError),
    Usage(String),
    /// A cluster was created, but what `new-cluster` was asked to do with it failed.
    AfterCreate(Box<AfterCreate>),
    /// One or more clusters of `stop --all` could not be stopped (each already reported); the
    /// exit code to end with.
    Partial(i32),
}

/// A cluster `new-cluster` created, whose waiting, scaling or adapting failed (or was
/// interrupted); it was then stopped, as the Python client stops a cluster it could not start.
struct AfterCreate {
    name: String,
    /// What failed; `None`: Ctrl-C.
    error: Option<ClientError>,
    /// Why the cluster ended, when it ended while waited for.
    reason: Option<String>,
    /// Whether stopping it worked.
    stopped: Result<(), ClientError>,
}

/// The exit code of a Ctrl-C, as shells report it.
const INTERRUPTED: i32 = 130;

/// `--timeout`: a number of seconds, from 0 up to a year.
fn seconds(text: &str) -> Result<f64, String> {
    const YEAR: f64 = 365.0 * 24.0 * 3600.0;
    match text.trim().parse::<f64>() {
        Ok(s) if (0.0..=YEAR).contains(&s) => Ok(s),
        _ => Err(format!("expected a number of seconds from 0 to {YEAR}")),
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

fn main() {
    // Output piped into a reader that stops early (`| head`, `| true`) ends the program
    // quietly, as it does any Unix tool, instead of a panic on the next print. Sockets are
    // written with MSG_NOSIGNAL and never raise the signal.
    // SAFETY: setting a signal's disposition to its default, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // The cookie store logs each session cookie it takes at debug: a usable credential, in
    // logs that users paste into bug reports.
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_CLI_LOG")
        .unwrap_or_else(|_| "warn".into())
        .add_directive("cookie_store=warn".parse().expect("a valid directive"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "gateway-cli",
            &mut std::io::stdout(),
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(Failure::Client(e)) => {
            eprintln!("gateway-cli: {}", output::printable(&e.to_string()));
            e.exit_code()
        }
        Err(Failure::Usage(m)) => {
            eprintln!("gateway-cli: {}", output::printable(&m));
            2
        }
        Err(Failure::AfterCreate(failed)) => {
            let AfterCreate {
                name,
                error,
                reason,
                stopped,
            } = *failed;
            let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
            let after = match stopped {
                Ok(()) => "it has been stopped".to_string(),
                Err(e) => {
                    format!("stopping it failed too ({e}): stop it with `gateway-cli stop {name}`")
                }
            };
            let what = match &error {
                Some(e) => e.to_string(),
                None => "waiting for it was interrupted".to_string(),
            };
            eprintln!(
                "gateway-cli: cluster {name} was created, but {}{}; {after}",
                output::printable(&what),
                output::printable(&why)
            );
            error.map_or(INTERRUPTED, |e| e.exit_code())
        }
        Err(Failure::Partial(code)) => code,
    };
    std::process::exit(code);
}

/// The client configuration: flags over environment over dask config files.
fn client_config(cli: &Cli, dask: &DaskConfig) -> Result<ClientConfig, ClientError> {
    let flags = Overrides {
        address: cli.address.clone(),
        proxy_address: cli.proxy_address.clone(),
        auth_type: cli.auth.clone(),
        username: cli.user.clone(),
        password: cli.password.clone(),
        token: cli.token.clone(),
    };
    ClientConfig::resolve(dask, &flags)
}

/// Parses `--opt KEY=VALUE` pairs.
fn parse_options(opts: &[String]) -> Result<Map<String, Value>, Failure> {
    let mut out = Map::new();
    for opt in opts {
        let Some((k, v)) = opt.split_once('=') else {
            return Err(Failure::Usage(format!("--opt {opt:?}: expected KEY=VALUE")));
        };
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        out.insert(k.trim().to_string(), value);
    }
    Ok(out)
}

fn parse_bounds(text: &str) -> Result<(Option<u64>, Option<u64>), Failure> {
    let bad = || Failure::Usage(format!("--adapt {text:?}: expected MIN:MAX, e.g. 1:10"));
    let (lo, hi) = text.split_once(':').ok_or_else(bad)?;
    let num = |s: &str| -> Result<Option<u64>, Failure> {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(|_| bad())
        }
    };
    let (lo, hi) = (num(lo)?, num(hi)?);
    if let (Some(lo), Some(hi)) = (lo, hi) {
        if lo > hi {
            return Err(Failure::Usage(format!(
                "--adapt {text:?}: the minimum {lo} is above the maximum {hi}"
            )));
        }
    }
    Ok((lo, hi))
}

/// What `new-cluster` does once the cluster exists: waits for it, scales or adapts it, and
/// gives the row to print with the gateway's notes (a request clipped by a limit).
async fn finish_new_cluster(
    client: &GatewayClient,
    name: &str,
    wait: bool,
    timeout: f64,
    workers: Option<u64>,
    bounds: Option<(Option<u64>, Option<u64>)>,
) -> Result<(Value, Vec<String>), ClientError> {
    let mut model = client.get(name).await?;
    if wait {
        let bar = spinner(format!("waiting for cluster {name} to start"));
        let waited = client
            .wait_until_running(name, Duration::from_secs_f64(timeout))
            .await;
        bar.finish_and_clear();
        model = waited?;
    }
    let mut notes = Vec::new();
    if let Some(n) = workers {
        notes.extend(client.scale(name, n).await?.msg);
    }
    if let Some((lo, hi)) = bounds {
        notes.extend(client.adapt(name, lo, hi).await?.msg);
    }
    let row = json!({
        "name": name,
        "status": model.status.as_str(),
        "address": client.scheduler_address(name)?,
        "dashboard": client.dashboard_url(&model),
    });
    Ok((row, notes))
}

fn spinner(message: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let printer = Printer::new(cli.output);
    let dask = DaskConfig::load();
    let client = GatewayClient::new(client_config(&cli, &dask)?)?;
    match cli.command {
        Command::NewCluster {
            opts,
            workers,
            adapt,
            wait,
            timeout,
        } => {
            // Everything is checked before the cluster exists.
            let mut options = dask.cluster_options()?;
            options.extend(parse_options(&opts)?);
            let bounds = adapt.as_deref().map(parse_bounds).transpose()?;
            let name = client.create(options).await?;
            let wait = wait || workers.is_some() || bounds.is_some();
            let finish = finish_new_cluster(&client, &name, wait, timeout, workers, bounds);
            let finished = tokio::select! {
                r = finish => r.map_err(Some),
                _ = tokio::signal::ctrl_c() => Err(None),
            };
            match finished {
                Ok((row, notes)) => {
                    for n in &notes {
                        eprintln!("gateway-cli: {}", output::printable(n));
                    }
                    printer.record(&row);
                }
                Err(error) => {
                    let reason = match &error {
                        Some(ClientError::ClusterEnded { .. }) => {
                            client.details(&name).await.ok().and_then(|d| d.reason)
                        }
                        _ => None,
                    };
                    let stopped = client.stop(&name).await;
                    return Err(Failure::AfterCreate(Box::new(AfterCreate {
                        name,
                        error,
                        reason,
                        stopped,
                    })));
                }
            }
        }
        Command::List { status, all } => {
            let statuses: Vec<ClusterStatus> = if all {
                ClusterStatus::ALL.to_vec()
            } else {
                status
                    .iter()
                    .map(|s| s.trim().to_ascii_uppercase().parse::<ClusterStatus>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| Failure::Usage(e.to_string()))?
            };
            let clusters = client.list(&statuses).await?;
            // Owners and stop reasons come from the details (a gateway without them, such as
            // the reference server, just shows fewer columns).
            let details: std::collections::HashMap<String, gateway_client::ClusterDetails> = client
                .list_details(&statuses)
                .await
                .map(|d| d.into_iter().map(|d| (d.name.clone(), d)).collect())
                .unwrap_or_default();
            let rows: Vec<Value> = clusters
                .iter()
                .map(|c| {
                    let d = details.get(&c.name);
                    json!({
                        "name": c.name,
                        "owner": d.map(|d| d.owner.clone()),
                        "status": c.status.as_str(),
                        "age": output::age(c.start_time),
                        "dashboard": client.dashboard_url(c),
                        "reason": d.and_then(|d| d.reason.clone()),
                        "options": c.options,
                    })
                })
                .collect();
            let mut columns = vec!["name"];
            if !details.is_empty() {
                columns.push("owner");
            }
            columns.extend(["status", "age", "dashboard"]);
            if details.values().any(|d| d.reason.is_some()) {
                columns.push("reason");
            }
            printer.table(&rows, &columns);
        }
        Command::Info { name } => {
            let model = client.get(&name).await?;
            let mut row = json!({
                "name": model.name,
                "status": model.status.as_str(),
                "address": client.scheduler_address(&name)?,
                "dashboard": client.dashboard_url(&model),
                "age": output::age(model.start_time),
                "options": model.options,
            });
            if let Ok(d) = client.details(&name).await {
                row["owner"] = json!(d.owner);
                row["group"] = json!(d.group);
                row["reason"] = json!(d.reason);
                row["expires_at"] = json!(d.expires_at);
            }
            if model.status == ClusterStatus::Running {
                // What the gateway knows is shown even when the scheduler cannot be asked.
                match client.scheduler_identity(&name).await {
                    Ok(id) => {
                        row["workers"] = json!(id.workers.len());
                        row["threads"] = json!(id.threads());
                        row["memory"] = json!(gateway_client::model::format_memory(id.memory()));
                        row["worker_details"] =
                            serde_json::to_value(&id.workers).unwrap_or_default();
                    }
                    Err(e) => eprintln!(
                        "gateway-cli: workers unknown: {}",
                        output::printable(&e.to_string())
                    ),
                }
            }
            printer.record(&row);
        }
        Command::Events { name, follow } => {
            let structured = printer.format() != Format::Table;
            if follow {
                let format = printer.format();
                client
                    .follow_events(&name, |e| output::event_line(format, &e))
                    .await?;
            } else {
                let events = client.events(&name).await?;
                let rows: Vec<Value> = events
                    .iter()
                    .map(|e| output::event_row(e, structured))
                    .collect();
                printer.table(&rows, &["time", "type", "reason", "source", "message"]);
            }
        }
        Command::Usage {
            since,
            until,
            by,
            owner,
            csv,
        } => {
            let by = match by {
                UsageBy::User => gateway_client::UsageGrouping::User,
                UsageBy::Group => gateway_client::UsageGrouping::Group,
                UsageBy::Cluster => gateway_client::UsageGrouping::Cluster,
            };
            let request = gateway_client::UsageRequest {
                since,
                until,
                by: Some(by),
                user: owner,
            };
            let report = client.usage(&request).await?;
            if csv {
                print!("{}", output::printable_lines(&report.to_csv()));
            } else {
                let rows: Vec<Value> = report.rows.iter().map(output::usage_row).collect();
                let key: &[&str] = match by {
                    gateway_client::UsageGrouping::User => &["user"],
                    gateway_client::UsageGrouping::Group => &["group"],
                    gateway_client::UsageGrouping::Cluster => &["cluster", "user", "group"],
                };
                let columns: Vec<&str> = key
                    .iter()
                    .copied()
                    .chain([
                        "clusters_created",
                        "clusters_active",
                        "core_hours",
                        "memory_gib_hours",
                        "cores_now",
                    ])
                    .collect();
                printer.table(&rows, &columns);
            }
        }
        Command::Scale { name, count } => {
            let r = client.scale(&name, count).await?;
            // What was asked; where a limit or quota cut it, `ok` is false and the message
            // says to how many.
            printer
                .record(&json!({"name": name, "requested": count, "ok": r.ok, "message": r.msg}));
        }
        Command::Adapt { name, min, max } => {
            if let (Some(lo), Some(hi)) = (min, max) {
                if lo > hi {
                    return Err(Failure::Usage(format!("--min {lo} is above --max {hi}")));
                }
            }
            let r = client.adapt(&name, min, max).await?;
            printer.record(&json!({"name": name, "minimum": min, "maximum": max, "ok": r.ok, "message": r.msg}));
        }
        Command::Stop { name, all } => {
            let names: Vec<String> = match (name, all) {
                // A name that names no cluster of yours is an error, not a stop.
                (Some(n), _) => vec![client.get(&n).await?.name],
                (None, _) => client
                    .list(&[ClusterStatus::Pending, ClusterStatus::Running])
                    .await?
                    .into_iter()
                    .map(|c| c.name)
                    .collect(),
            };
            // Every cluster is tried; the failures are told, and the first one's code is the
            // exit code.
            let mut rows = Vec::new();
            let mut failed = None;
            for n in names {
                if let Err(e) = client.stop(&n).await {
                    eprintln!(
                        "gateway-cli: stopping {n}: {}",
                        output::printable(&e.to_string())
                    );
                    failed.get_or_insert(e.exit_code());
                    continue;
                }
                let status = client.get(&n).await.map(|m| m.status.as_str().to_string());
                rows.push(
                    json!({"name": n, "status": status.unwrap_or_else(|_| "STOPPED".into())}),
                );
            }
            printer.table(&rows, &["name", "status"]);
            if let Some(code) = failed {
                return Err(Failure::Partial(code));
            }
        }
        Command::Options => {
            let options = client.options().await?;
            let rows: Vec<Value> = options
                .iter()
                .map(|o| {
                    json!({
                        "field": o.field,
                        "label": o.label,
                        "type": o.spec.get("type").cloned().unwrap_or(Value::Null),
                        "default": o.default,
                        "spec": o.spec,
                    })
                })
                .collect();
            printer.table(&rows, &["field", "type", "default", "label"]);
        }
        Command::Dashboard { name, open } => {
            let model = client.get(&name).await?;
            let url = client.dashboard_url(&model).ok_or_else(|| {
                ClientError::Conflict(format!(
                    "cluster {name} is {} and has no dashboard",
                    model.status.as_str()
                ))
            })?;
            if open {
                let opener = if cfg!(target_os = "macos") {
                    "open"
                } else {
                    "xdg-open"
                };
                if let Err(e) = std::process::Command::new(opener).arg(&url).status() {
                    eprintln!("gateway-cli: could not run {opener}: {e}");
                }
            }
            printer.record(&json!({"name": name, "dashboard": url}));
        }
        Command::Tunnel {
            name,
            port,
            bind,
            credentials_dir,
        } => tunnel(&client, &printer, name, port, bind, credentials_dir).await?,
        Command::Completions { .. } => unreachable!("handled before the runtime starts"),
    }
    Ok(())
}

/// Writes the cluster's credentials privately, serves the tunnel until Ctrl-C, SIGTERM, SIGHUP
/// (the terminal closed) or SIGQUIT, then removes the credentials it wrote.
async fn tunnel(
    client: &GatewayClient,
    printer: &Printer,
    name: String,
    port: u16,
    bind: String,
    credentials_dir: Option<PathBuf>,
) -> Result<(), Failure> {
    let ip: std::net::IpAddr = bind
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| Failure::Usage(format!("--bind {bind:?} is not an IP address")))?;
    let local = std::net::SocketAddr::new(ip, port);
    let listen = |kind| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| ClientError::Config(format!("installing a signal handler: {e}")))
    };
    use tokio::signal::unix::SignalKind;
    let mut interrupt = listen(SignalKind::interrupt())?;
    let mut terminate = listen(SignalKind::terminate())?;
    // A tunnel started under `nohup` (SIGHUP ignored) keeps running when the terminal closes.
    let mut hangup = if signal_ignored(libc::SIGHUP) {
        None
    } else {
        Some(listen(SignalKind::hangup())?)
    };
    let mut quit = listen(SignalKind::quit())?;
    let tls = client.credentials(&name).await?;
    let tunnel = Tunnel::bind(local, client.proxy_address()?, name.clone(), tls.clone()).await?;
    let files = CredentialFiles::write(credentials_dir, &name, &tls.cert_pem, &tls.key_pem)
        .map_err(ClientError::Config)?;
    let (cert, key) = (&files.cert, &files.key);
    let address = format!("tls://{}", tunnel.local_addr());
    let info = json!({
        "name": name,
        "address": address,
        "tls_ca_file": cert,
        "tls_client_cert": cert,
        "tls_client_key": key,
    });
    if printer.format() == Format::Table {
        println!("Tunnel to cluster {name} listening on {address} (Ctrl-C to stop).");
        println!("Connect with:");
        println!("    from distributed import Client");
        println!("    from distributed.security import Security");
        println!(
            "    security = Security(tls_ca_file={c:?}, tls_client_cert={c:?}, tls_client_key={k:?}, require_encryption=True)",
            c = cert.display().to_string(),
            k = key.display().to_string()
        );
        println!("    client = Client({address:?}, security=security)");
    } else {
        printer.record(&info);
    }
    let stop = async {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = async {
                match hangup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
            _ = quit.recv() => {}
        }
    };
    tunnel.run(stop).await;
    files.remove();
    Ok(())
}

/// Whether `signal` is ignored in this process (as `nohup` leaves SIGHUP).
fn signal_ignored(signal: libc::c_int) -> bool {
    // SAFETY: reads the current disposition only (no new action is given).
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_bounds() {
        let o = parse_options(&["a=2".into(), "b=text".into(), "c={\"X\": \"1\"}".into()])
            .ok()
            .unwrap();
        assert_eq!(o["a"], json!(2));
        assert_eq!(o["b"], json!("text"));
        assert_eq!(o["c"], json!({"X": "1"}));
        assert!(parse_options(&["novalue".into()]).is_err());
        assert_eq!(parse_bounds("1:10").ok().unwrap(), (Some(1), Some(10)));
        assert_eq!(parse_bounds(":3").ok().unwrap(), (None, Some(3)));
        assert!(parse_bounds("x").is_err());
        assert!(parse_bounds("-1:2").is_err());
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn auth_none_is_allowed() {
        let cli = Cli::parse_from([
            "gateway-cli",
            "--address",
            "http://x:1",
            "--auth",
            "none",
            "options",
        ]);
        assert_eq!(
            client_config(&cli, &DaskConfig::default()).unwrap().auth,
            gateway_client::Auth::None
        );
    }
}

/// `usage --by`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum UsageBy {
    /// One row per user.
    User,
    /// One row per group policy.
    Group,
    /// One row per cluster.
    Cluster,
}
