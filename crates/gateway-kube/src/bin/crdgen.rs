//! Prints the DaskCluster CRD as YAML; the Helm chart installs this output:
//!
//!     cargo run -p gateway-kube --bin crdgen > charts/dask-gateway-rs/files/daskcluster-crd.yaml

fn main() {
    print!("{}", gateway_kube::crd::crd_yaml());
}
