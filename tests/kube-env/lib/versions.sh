# Versions of the test control plane. The staging modules (k8s.io/api, client-go, ...) are
# published as v0.<minor>.<patch> for Kubernetes v1.<minor>.<patch>.
KUBE_VERSION="${KUBE_ENV_K8S_VERSION:-v1.36.3}"
STAGING_VERSION="v0.${KUBE_VERSION#v1.}"
