//! Prints the DaskCluster CRD as YAML (`manifests/daskcluster-crd.yaml` is its output):
//!
//!     cargo run -p gateway-kube --bin crdgen > manifests/daskcluster-crd.yaml

fn main() {
    print!("{}", gateway_kube::crd::crd_yaml());
}
