# Settings shared by up, down, ci and the tests. Every value can be overridden from the
# environment. Sourced, not executed.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/lib/versions.sh"
CACHE_DIR="${DGRS_CACHE:-$HOME/.cache/dask-gateway-rs}/kube-env"
BIN_DIR="$CACHE_DIR/bin-$KUBE_VERSION"
RUN_DIR="${KUBE_ENV_DIR:-/tmp/dgrs-kube-env}"
PKI="$RUN_DIR/pki"
PIDS="$RUN_DIR/pids"
LOGS="$RUN_DIR/logs"
ADMIN_KUBECONFIG="$RUN_DIR/admin.kubeconfig"

APISERVER_PORT="${KUBE_ENV_APISERVER_PORT:-6443}"
ETCD_CLIENT_PORT="${KUBE_ENV_ETCD_PORT:-2379}"
ETCD_PEER_PORT="${KUBE_ENV_ETCD_PEER_PORT:-2380}"
KCM_PORT="${KUBE_ENV_KCM_PORT:-10257}"
SCHED_PORT="${KUBE_ENV_SCHEDULER_PORT:-10259}"
KUBELET_PORT="${KUBE_ENV_KUBELET_PORT:-10250}"

# Pod network: a host bridge holding the first address; pods get the others.
BRIDGE="${KUBE_ENV_BRIDGE:-dgrs0}"
POD_CIDR="${KUBE_ENV_POD_CIDR:-10.244.0.0/24}"
BRIDGE_IP="${KUBE_ENV_BRIDGE_IP:-10.244.0.1}"
POD_PREFIXLEN="${POD_CIDR#*/}"
SERVICE_CIDR="${KUBE_ENV_SERVICE_CIDR:-10.96.0.0/16}"
NODE_NAME="${KUBE_ENV_NODE_NAME:-dgrs-node}"

RUNTIME_DIR="$CACHE_DIR/runtime"
CONTAINERD_DIR="$RUN_DIR/containerd"
CONTAINERD_SOCK="$CONTAINERD_DIR/containerd.sock"
KUBELET_ROOT="$RUN_DIR/kubelet-root"
CNI_DIR="$RUN_DIR/cni"
RUNC="${KUBE_ENV_RUNC:-/usr/sbin/runc}"
# Image of every pod sandbox (built and imported by up; never pulled).
PAUSE_IMAGE="dgrs.local/kube-env/pause:1"
# Cluster DNS: CoreDNS on the host, on the bridge address.
CLUSTER_DNS="$BRIDGE_IP"

COMPONENTS="etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy coredns"

kubectl_() { "$BIN_DIR/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }
ctr_() { "$RUNTIME_DIR/bin/ctr" --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }

# pid_alive NAME: the recorded process of NAME runs and is still the binary we started.
pid_alive() {
  local f="$PIDS/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  grep -qF "$1" "/proc/$pid/cmdline" 2>/dev/null
}
