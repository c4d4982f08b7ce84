# Certificates and kubeconfigs of the test cluster, made with openssl into $PKI. Sourced by up.

# cert NAME CN [ORG] [SANS]: a key and a certificate signed by the cluster CA.
cert() {
  local name="$1" cn="$2" org="${3:-}" sans="${4:-}" subj="/CN=$2"
  [ -n "$org" ] && subj="$subj/O=$org"
  [ -f "$PKI/$name.crt" ] && return 0
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "$subj" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } > "$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -out "$PKI/$name.crt" -days 3650 -extfile "$PKI/$name.ext" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

# kubeconfig FILE USER CERTNAME: a kubeconfig authenticating with the client cert CERTNAME.
kubeconfig() {
  local file="$1" user="$2" c="$3"
  cat > "$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: dgrs
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$c.crt")
    client-key-data: $(base64 -w0 < "$PKI/$c.key")
contexts:
- name: dgrs
  context: {cluster: dgrs, user: $user, namespace: default}
current-context: dgrs
KC
  chmod 600 "$file"
}

make_pki() {
  mkdir -p "$PKI"
  if [ ! -f "$PKI/ca.crt" ]; then
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
      -days 3650 -subj "/CN=dgrs-kube-env-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  fi
  local svc_ip
  svc_ip="$(python3 -c "import ipaddress,sys; print(ipaddress.ip_network('$SERVICE_CIDR')[1])")"
  cert apiserver kube-apiserver "" \
    "IP:127.0.0.1,IP:$BRIDGE_IP,IP:$svc_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin dgrs-admin system:masters
  cert controller-manager system:kube-controller-manager
  cert scheduler system:kube-scheduler
  cert kubelet "system:node:$NODE_NAME" system:nodes
  cert kubelet-serving "system:node:$NODE_NAME" system:nodes "IP:$BRIDGE_IP,DNS:$NODE_NAME"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client
  # kube-proxy has the built-in system:node-proxier binding; CoreDNS gets a ClusterRole from up.
  cert kube-proxy system:kube-proxy
  cert coredns dgrs:coredns
  if [ ! -f "$PKI/sa.key" ]; then
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  fi
  kubeconfig "$ADMIN_KUBECONFIG" dgrs-admin admin
  kubeconfig "$RUN_DIR/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
  kubeconfig "$RUN_DIR/scheduler.kubeconfig" system:kube-scheduler scheduler
  kubeconfig "$RUN_DIR/kubelet.kubeconfig" "system:node:$NODE_NAME" kubelet
  kubeconfig "$RUN_DIR/kube-proxy.kubeconfig" system:kube-proxy kube-proxy
  kubeconfig "$RUN_DIR/coredns.kubeconfig" dgrs:coredns coredns
}
