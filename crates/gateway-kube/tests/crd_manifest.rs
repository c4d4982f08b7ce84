//! The CRD the Helm chart installs (and `manifests/` renders) is generated from the Rust types;
//! this fails when it is stale.

#[test]
fn the_committed_crd_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../charts/dask-gateway-rs/files/daskcluster-crd.yaml");
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        committed == gateway_kube::crd::crd_yaml(),
        "charts/dask-gateway-rs/files/daskcluster-crd.yaml is stale: regenerate it (and the manifests) with\n  cargo run -p gateway-kube --bin crdgen > charts/dask-gateway-rs/files/daskcluster-crd.yaml && scripts/render-manifests"
    );
}
