//! Create a cluster, scale it to two workers, show what its scheduler reports, and stop it.
//!
//! Uses the same settings as the Python client (dask config files, or `DASK_GATEWAY__ADDRESS`
//! and friends):
//!
//! ```sh
//! DASK_GATEWAY__ADDRESS=http://127.0.0.1:8000 cargo run -p gateway-client --example cluster_lifecycle
//! ```

use gateway_client::{ClientConfig, ClientError, GatewayClient};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let client = GatewayClient::new(ClientConfig::from_dask_config()?)?;
    for option in client.options().await? {
        println!("option {} (default {})", option.field, option.default);
    }
    let name = client.create(Default::default()).await?;
    println!("created {name}; waiting for it to start");
    let model = client
        .wait_until_running(&name, Duration::from_secs(300))
        .await?;
    println!("scheduler: {}", client.scheduler_address(&name)?);
    if let Some(url) = client.dashboard_url(&model) {
        println!("dashboard: {url}");
    }
    client.scale(&name, 2).await?;
    for _ in 0..120 {
        let identity = client.scheduler_identity(&name).await?;
        if identity.workers.len() == 2 {
            println!(
                "{} workers, {} threads, {} bytes of memory",
                identity.workers.len(),
                identity.threads(),
                identity.memory()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    client.stop(&name).await?;
    println!("stopped {name}");
    Ok(())
}
