# Versions of the test cluster. The staging modules (k8s.io/api, client-go, ...) are
# published as v0.<minor>.<patch> for Kubernetes v1.<minor>.<patch>.
KUBE_VERSION="${KUBE_ENV_K8S_VERSION:-v1.37.2}"
STAGING_VERSION="v0.${KUBE_VERSION#v1.}"
# The container runtime of the real-container mode (runc itself is Debian's).
CONTAINERD_VERSION="${KUBE_ENV_CONTAINERD_VERSION:-v2.2.9}"
CNI_PLUGINS_VERSION="${KUBE_ENV_CNI_PLUGINS_VERSION:-v1.9.0}"
COREDNS_VERSION="${KUBE_ENV_COREDNS_VERSION:-v1.14.7}"
