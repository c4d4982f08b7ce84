//! `gateway-server`: the Dask Gateway in one binary.
//!
//! With no arguments it serves everything on 127.0.0.1:8000 with the local process backend and
//! simple authentication; `--config gateway.yaml` sets the rest (see docs/configuration.md).
//! `gateway-server controller` runs only the Kubernetes controller.

use clap::{Parser, Subcommand};
use gateway_server::config::{BackendKind, GatewayConfig, LogFormat};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// The static musl build (the gateway image) uses mimalloc: musl's allocator is much slower
/// under the controller's and proxy's many small allocations (docs/benchmarks.md).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command-line flags; each overrides the matching configuration key.
#[derive(Parser, Debug)]
#[command(
    name = "gateway-server",
    version,
    about = "Dask Gateway server: REST API, scheduler proxy and cluster backend in one binary",
    after_help = "Examples:\n  gateway-server                                   # local processes on 127.0.0.1:8000\n  gateway-server --config gateway.yaml\n  gateway-server --backend kubernetes --namespace dask --config gateway.yaml\n  gateway-server controller --config gateway.yaml  # only the DaskCluster controller"
)]
struct Cli {
    /// What to run (default: the gateway).
    #[command(subcommand)]
    command: Option<Command>,
    /// YAML configuration file.
    #[arg(short, long, env = "DASK_GATEWAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Public listen address (overrides `address`).
    #[arg(long, env = "GATEWAY_ADDRESS", global = true)]
    address: Option<SocketAddr>,
    /// Separate scheduler TLS address (overrides `scheduler_address`).
    #[arg(long, env = "GATEWAY_SCHEDULER_ADDRESS", global = true)]
    scheduler_address: Option<SocketAddr>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, env = "GATEWAY_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Python environment with dask and dask-gateway (overrides `dask.python_env`).
    #[arg(long, env = "GATEWAY_PYTHON_ENV", global = true)]
    python_env: Option<PathBuf>,
    /// Shared password of the simple authenticator (overrides `auth.password`; prefer the
    /// environment variable, which keeps it out of the process list).
    #[arg(
        long,
        env = "GATEWAY_AUTH_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    auth_password: Option<String>,
    /// Where clusters run: local or kubernetes (overrides `backend`).
    #[arg(long, env = "GATEWAY_BACKEND", global = true)]
    backend: Option<BackendKind>,
    /// Kubernetes namespace of the clusters (overrides `kubernetes.namespace`).
    #[arg(long, env = "GATEWAY_NAMESPACE", global = true)]
    namespace: Option<String>,
    /// Check the configuration and exit.
    #[arg(long, global = true)]
    check_config: bool,
}

/// Roles other than the gateway itself.
#[derive(Subcommand, Debug)]
enum Command {
    /// Run only the DaskCluster controller (Kubernetes), with leader election; `/metrics` and
    /// `/api/health` are served on `address`.
    Controller,
}

fn init_logging(config: &GatewayConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    use std::io::IsTerminal;
    // Colour codes only for a person at a terminal, not in `kubectl logs` or a journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => match GatewayConfig::read(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("gateway-server: {e}");
                return ExitCode::from(2);
            }
        },
        None => GatewayConfig::default(),
    };
    if let Some(a) = cli.address {
        config.address = a;
    }
    if let Some(a) = cli.scheduler_address {
        config.scheduler_address = Some(a);
    }
    if let Some(d) = cli.data_dir {
        config.data_dir = Some(d);
    }
    if let Some(p) = cli.python_env {
        // Relative to where it was started, as a user typing it means.
        config.dask.python_env = Some(std::path::absolute(&p).unwrap_or(p));
    }
    if let Some(p) = cli.auth_password {
        config.auth.password = Some(p);
    }
    if let Some(b) = cli.backend {
        config.backend = b;
    }
    if let Some(ns) = cli.namespace {
        config.kubernetes.namespace = Some(ns);
    }
    let controller_only = matches!(cli.command, Some(Command::Controller));
    if controller_only {
        config.backend = BackendKind::Kubernetes;
        if config.api_url.is_none() {
            // Only the gateway's pods use it; the controller copies it from each DaskCluster.
            config.api_url = Some("http://unused.invalid/api".into());
        }
    }
    let config = match config.check() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway-server: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    // The controller alone is many small wake-ups and little work: the embedded one, moved from
    // the gateway's pool of threads to a thread of its own, used about a fifth less CPU per
    // 100-worker scale-up (docs/benchmarks.md, "The controller on a thread of its own"; see
    // `start::kube::spawn_controller`). The controller-only role runs on one thread likewise.
    let mut builder = if controller_only {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway-server: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if controller_only {
        runtime.block_on(gateway_server::run_controller(config, shutdown_signal()))
    } else {
        runtime.block_on(gateway_server::run(config, shutdown_signal()))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("gateway-server: {e}");
            ExitCode::FAILURE
        }
    }
}
