//! `gateway-server`: the Dask Gateway in one binary.
//!
//! With no arguments it serves everything on 127.0.0.1:8000 with the local process backend and
//! simple authentication; `--config gateway.yaml` sets the rest (see docs/configuration.md).

use clap::Parser;
use gateway_server::config::{GatewayConfig, LogFormat};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Command-line flags; each overrides the matching configuration key.
#[derive(Parser, Debug)]
#[command(
    name = "gateway-server",
    version,
    about = "Dask Gateway server (local process backend)"
)]
struct Cli {
    /// YAML configuration file.
    #[arg(short, long, env = "DASK_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Public listen address (overrides `address`).
    #[arg(long, env = "GATEWAY_ADDRESS")]
    address: Option<SocketAddr>,
    /// Separate scheduler TLS address (overrides `scheduler_address`).
    #[arg(long, env = "GATEWAY_SCHEDULER_ADDRESS")]
    scheduler_address: Option<SocketAddr>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, env = "GATEWAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Python environment with dask and dask-gateway (overrides `dask.python_env`).
    #[arg(long, env = "GATEWAY_PYTHON_ENV")]
    python_env: Option<PathBuf>,
    /// Shared password of the simple authenticator (overrides `auth.password`; prefer the
    /// environment variable, which keeps it out of the process list).
    #[arg(long, env = "GATEWAY_AUTH_PASSWORD", hide_env_values = true)]
    auth_password: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn init_logging(config: &GatewayConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        Some(path) => match GatewayConfig::load(path) {
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
        config.dask.python_env = Some(p);
    }
    if let Some(p) = cli.auth_password {
        config.auth.password = Some(p);
    }
    if let Err(e) = config.validate() {
        eprintln!("gateway-server: {e}");
        return ExitCode::from(2);
    }
    if cli.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway-server: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(gateway_server::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("gateway-server: {e}");
            ExitCode::FAILURE
        }
    }
}
