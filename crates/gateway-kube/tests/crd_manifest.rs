//! The CRD in `manifests/` is generated from the Rust types; this fails when it is stale.

#[test]
fn the_committed_crd_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../manifests/daskcluster-crd.yaml");
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        committed == gateway_kube::crd::crd_yaml(),
        "manifests/daskcluster-crd.yaml is stale: regenerate it with\n  cargo run -p gateway-kube --bin crdgen > manifests/daskcluster-crd.yaml"
    );
}
