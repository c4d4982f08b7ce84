# Source to use the running test cluster from a shell:
#   source tests/kube-env/env.sh   # sets KUBECONFIG and puts the built kubectl first on PATH
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/common.sh"
export KUBECONFIG="$ADMIN_KUBECONFIG"
export PATH="$BIN_DIR:$PATH"
