# The node of the test cluster, sourced by up: containerd (CRI, overlayfs, Debian's runc, CNI
# bridge networking), the kubelet (cgroup v1 via cgroupfs), kube-proxy (nftables mode) and
# CoreDNS, all host processes. `start_node` runs after the control plane; `import_images` also
# serves a running cluster. Expects start, wait_for, log and kubectl_ from up and the settings of
# common.sh.

# sysctls a Kubernetes node needs: forwarding between pods and Services, and bridged pod-to-pod
# traffic through netfilter (so a Service's DNAT is undone on the way back over the bridge).
node_sysctls() {
  modprobe br_netfilter 2>/dev/null || true
  sysctl -qw net.ipv4.ip_forward=1
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  sysctl -qw net.bridge.bridge-nf-call-ip6tables=1 2>/dev/null || true
}

write_containerd_config() {
  mkdir -p "$CONTAINERD_DIR" "$CNI_DIR/net.d" "$CNI_DIR/ipam"
  cat > "$CONTAINERD_DIR/config.toml" <<TOML
version = 3
root = "$CONTAINERD_DIR/root"
state = "$CONTAINERD_DIR/state"

[grpc]
  address = "$CONTAINERD_SOCK"

[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '$PAUSE_IMAGE'

[plugins.'io.containerd.cri.v1.runtime']
  # Root here lacks CAP_SYS_RESOURCE (the machine's bounding set drops it), so no process may
  # lower its OOM score: clamp the kubelet's negative scores (-998 for sandboxes, -997 for
  # Guaranteed pods) to containerd's own instead of failing every sandbox.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '$RUNC'
        Root = '$CONTAINERD_DIR/runc'
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['$RUNTIME_DIR/cni']
    conf_dir = '$CNI_DIR/net.d'
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
TOML
  # One bridge network: the bridge holds the gateway address (the host's address on the pod
  # network), host-local hands out the rest of the pod range, portmap serves hostPort.
  cat > "$CNI_DIR/net.d/10-dgrs.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "dgrs",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$CNI_DIR/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$BRIDGE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
}

# import_images ARCHIVE...: imports OCI image archives into containerd's k8s.io namespace (what
# the kubelet sees), skipping those whose digest is already there. The archives name their
# images (org.opencontainers.image.ref.name, as images/build and skopeo write it).
import_images() {
  local a name digest
  for a in "$@"; do
    [ -f "$a" ] || { log "no image archive at $a"; return 1; }
    read -r name digest < <(tar -xOf "$a" index.json | python3 -c 'import json,sys; m=json.load(sys.stdin)["manifests"][0]; print(m["annotations"]["org.opencontainers.image.ref.name"], m["digest"])')
    if ctr_ images ls -q "name==$name" 2>/dev/null | grep -qx "$name" &&
       [ "$(ctr_ images ls "name==$name" 2>/dev/null | awk 'NR==2 {print $3}')" = "$digest" ]; then
      continue
    fi
    local t=$SECONDS
    ctr_ images import --no-unpack=false --local "$a" >/dev/null
    log "imported $name ($digest) in $((SECONDS - t))s"
  done
}

# The pod sandbox image: the pause process alone, uid 65535.
pause_image() {
  local out="$CACHE_DIR/pause-image.tar" src="$RUNTIME_DIR/bin/pause"
  if [ ! -f "$out" ] || [ "$src" -nt "$out" ]; then
    local root; root="$(mktemp -d)"
    install -m 0755 "$src" "$root/pause"
    "$here/../../images/lib/pack" --rootfs "$root" --ref "$PAUSE_IMAGE" --out "$out" \
      --user 65535:65535 --entrypoint /pause >/dev/null
    rm -rf "$root"
  fi
  echo "$out"
}

write_kubelet_config() {
  mkdir -p "$KUBELET_ROOT" "$RUN_DIR/pod-logs"
  cat > "$RUN_DIR/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 only; Kubernetes 1.35+ refuses it unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
address: $BRIDGE_IP
port: $KUBELET_PORT
readOnlyPort: 0
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [$CLUSTER_DNS]
podLogsDir: $RUN_DIR/pod-logs
failSwapOn: false
# A shared test machine: keep every image (they are imported, never pulled) and evict nothing
# for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
serializeImagePulls: false
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
shutdownGracePeriod: 0s
YAML
}

write_kube_proxy_config() {
  cat > "$RUN_DIR/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $RUN_DIR/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: nftables
clusterCIDR: $POD_CIDR
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$BRIDGE_IP/32"]
# Leave the host's conntrack table size as it is.
conntrack: {maxPerCore: 0}
YAML
}

write_coredns_config() {
  kubectl_ apply -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "dgrs:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "dgrs:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "dgrs:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "dgrs:coredns"}
YAML
  # Names in the cluster domain from the API; everything else is refused (nothing leaves this
  # machine). No cache: a Service is resolvable the moment it exists.
  cat > "$RUN_DIR/Corefile" <<COREFILE
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $CLUSTER_DNS
    errors
    log . {
        class error
    }
    health 127.0.0.1:18080
    ready 127.0.0.1:18181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $RUN_DIR/coredns.kubeconfig dgrs
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    loadbalance
}
COREFILE
}

start_node() {
  for tool in nft iptables conntrack; do
    command -v "$tool" >/dev/null || { log "$tool is missing (tests/kube-env/ci installs it)"; return 1; }
  done
  [ -x "$RUNC" ] || { log "runc is missing at $RUNC (apt-get install runc)"; return 1; }
  node_sysctls
  write_containerd_config
  PATH="$RUNTIME_DIR/bin:$PATH" start containerd "$RUNTIME_DIR/bin/containerd" --config "$CONTAINERD_DIR/config.toml"
  wait_for containerd 30 "$RUNTIME_DIR/bin/ctr" --address "$CONTAINERD_SOCK" version
  import_images "$(pause_image)" $KUBE_ENV_IMAGES

  # The API server calls the kubelet (logs, exec, port-forward) as this user; the kubelet
  # authorizes it with the API server (webhook mode).
  kubectl_ apply -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "dgrs:apiserver-kubelet-client"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kubelet-api-admin"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}
YAML
  write_kubelet_config
  start kubelet "$BIN_DIR/kubelet" --config "$RUN_DIR/kubelet.yaml" \
    --kubeconfig "$RUN_DIR/kubelet.kubeconfig" --hostname-override "$NODE_NAME" \
    --node-ip "$BRIDGE_IP" --root-dir "$KUBELET_ROOT" --v=1

  write_kube_proxy_config
  start kube-proxy "$BIN_DIR/kube-proxy" --config "$RUN_DIR/kube-proxy.yaml"

  write_coredns_config
  start coredns "$RUNTIME_DIR/bin/coredns" -conf "$RUN_DIR/Corefile" -dns.port 53
  wait_for "CoreDNS ready" 60 curl -fsS http://127.0.0.1:18181/ready
}
