// Command process-kubelet is a test-only kubelet: it registers one Ready node, keeps its
// lease fresh, and runs every pod bound to that node as plain host processes, each pod in
// its own network namespace with an IP on a host bridge. Images are ignored; commands are
// resolved through a configurable PATH. See ../README.md for what it does not support.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	coordv1 "k8s.io/api/coordination/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// config holds the command-line settings.
type config struct {
	kubeconfig  string
	nodeName    string
	runDir      string
	bridge      string
	podCIDR     string
	path        string
	nsPrefix    string
	proxyListen string
	proxyTarget string
	cpu         string
	memory      string
	maxPods     string
	version     string
	services    bool
	serveAddr   string
	tlsCert     string
	tlsKey      string
	clientCA    string
}

// kubelet is the state shared by all pods of the node.
type kubelet struct {
	cfg    config
	cs     kubernetes.Interface
	ipam   *ipam
	hostIP string

	mu   sync.Mutex
	pods map[types.UID]*podRT

	stopping atomic.Bool // set on shutdown: no more pod status writes

	mountsMu sync.Mutex
	mounts   []string // mountpoints this kubelet created on the host fs
}

func main() {
	var c config
	flag.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig with rights to manage nodes, leases and pods")
	flag.StringVar(&c.nodeName, "node-name", "dgrs-node", "name of the node to register")
	flag.StringVar(&c.runDir, "run-dir", "/tmp/dgrs-kube-env/kubelet", "state and container logs")
	flag.StringVar(&c.bridge, "bridge", "dgrs0", "host bridge the pod veths are attached to (must exist, with the gateway IP)")
	flag.StringVar(&c.podCIDR, "pod-cidr", "10.244.0.0/24", "pod network; the bridge holds its first address")
	flag.StringVar(&c.path, "path", "/usr/local/bin:/usr/bin:/bin", "PATH that resolves container commands")
	flag.StringVar(&c.nsPrefix, "netns-prefix", "dgrs-pod-", "prefix of the network namespaces made for pods")
	flag.StringVar(&c.proxyListen, "apiserver-proxy-listen", "", "if set (e.g. 10.244.0.1:6443), forward this bridge address to --apiserver-proxy-target so pods reach the API")
	flag.StringVar(&c.proxyTarget, "apiserver-proxy-target", "127.0.0.1:6443", "loopback address of the API server")
	flag.StringVar(&c.cpu, "cpu", "16", "node cpu capacity")
	flag.StringVar(&c.memory, "memory", "32Gi", "node memory capacity")
	flag.StringVar(&c.maxPods, "max-pods", "110", "node pod capacity")
	flag.StringVar(&c.version, "kubelet-version", "v0.0.0", "version reported in the node info")
	flag.BoolVar(&c.services, "services", true, "serve ClusterIP services (userspace proxy on the bridge) and cluster DNS on the bridge address")
	flag.StringVar(&c.serveAddr, "serve-addr", "", "if set (e.g. 10.244.0.1:10250), serve container logs for the API server here (needs the three TLS flags)")
	flag.StringVar(&c.tlsCert, "tls-cert-file", "", "serving certificate of the kubelet API")
	flag.StringVar(&c.tlsKey, "tls-private-key-file", "", "key of --tls-cert-file")
	flag.StringVar(&c.clientCA, "client-ca-file", "", "CA that signs the API server's kubelet client certificate")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	rc, err := clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	if err != nil {
		log.Fatalf("kubeconfig: %v", err)
	}
	rc.QPS, rc.Burst = 50, 100
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		log.Fatalf("client: %v", err)
	}
	pool, err := newIPAM(c.podCIDR)
	if err != nil {
		log.Fatalf("pod cidr: %v", err)
	}
	k := &kubelet{cfg: c, cs: cs, ipam: pool, hostIP: pool.gateway.String(), pods: map[types.UID]*podRT{}}
	if err := os.MkdirAll(c.runDir, 0o755); err != nil {
		log.Fatal(err)
	}
	k.cleanupStaleNetns()

	ctx, cancel := context.WithCancel(context.Background())
	if c.proxyListen != "" {
		go k.apiProxy(ctx)
	}
	if c.serveAddr != "" {
		go k.serveKubeletAPI(ctx)
	}
	if err := k.registerNode(ctx); err != nil {
		log.Fatalf("register node: %v", err)
	}
	go k.heartbeat(ctx)

	factory := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", c.nodeName).String()
	}))
	inf := factory.Core().V1().Pods().Informer()
	inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o interface{}) { k.observe(o.(*v1.Pod)) },
		UpdateFunc: func(_, o interface{}) { k.observe(o.(*v1.Pod)) },
		DeleteFunc: func(o interface{}) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			if p, ok := o.(*v1.Pod); ok {
				k.gone(p)
			}
		},
	})
	factory.Start(ctx.Done())
	if c.services {
		all := informers.NewSharedInformerFactory(cs, 0)
		k.startServices(ctx, all)
		all.Start(ctx.Done())
	}
	log.Printf("node %s ready; pods get addresses in %s via bridge %s", c.nodeName, c.podCIDR, c.bridge)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	log.Printf("shutting down: stopping all pods")
	k.stopping.Store(true)
	cancel()
	k.shutdown()
}

// observe reacts to a pod bound to this node being added or changed.
func (k *kubelet) observe(pod *v1.Pod) {
	k.mu.Lock()
	rt := k.pods[pod.UID]
	if rt == nil {
		if pod.DeletionTimestamp != nil {
			k.mu.Unlock()
			go k.deletePodObject(pod.Namespace, pod.Name, pod.UID)
			return
		}
		if pod.Status.Phase == v1.PodSucceeded || pod.Status.Phase == v1.PodFailed {
			k.mu.Unlock()
			return
		}
		rt = newPodRT(k, pod)
		k.pods[pod.UID] = rt
		go rt.run()
	}
	k.mu.Unlock()
	rt.setPod(pod)
}

// gone reacts to a pod object that disappeared (force deletion): kill at once.
func (k *kubelet) gone(pod *v1.Pod) {
	k.mu.Lock()
	rt := k.pods[pod.UID]
	k.mu.Unlock()
	if rt != nil {
		rt.objectGone()
	}
}

func (k *kubelet) forget(uid types.UID) {
	k.mu.Lock()
	delete(k.pods, uid)
	k.mu.Unlock()
}

// deletePodObject removes a pod whose processes are gone (the last step of graceful deletion).
func (k *kubelet) deletePodObject(ns, name string, uid types.UID) {
	zero := int64(0)
	err := k.cs.CoreV1().Pods(ns).Delete(context.Background(), name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero,
		Preconditions:      &metav1.Preconditions{UID: &uid},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		log.Printf("delete pod %s/%s: %v", ns, name, err)
	}
}

// shutdown stops every pod (SIGTERM, short grace, SIGKILL) and removes their namespaces.
func (k *kubelet) shutdown() {
	k.mu.Lock()
	var all []*podRT
	for _, rt := range k.pods {
		all = append(all, rt)
	}
	k.mu.Unlock()
	var wg sync.WaitGroup
	for _, rt := range all {
		wg.Add(1)
		go func(rt *podRT) { defer wg.Done(); rt.shutdown(3 * time.Second) }(rt)
	}
	wg.Wait()
	k.cleanupStaleNetns()
	k.removeMountpoints()
}

// ---- node registration ------------------------------------------------------------------

func (k *kubelet) nodeStatus() v1.NodeStatus {
	now := metav1.Now()
	res := v1.ResourceList{
		v1.ResourceCPU:              resource.MustParse(k.cfg.cpu),
		v1.ResourceMemory:           resource.MustParse(k.cfg.memory),
		v1.ResourcePods:             resource.MustParse(k.cfg.maxPods),
		v1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
	}
	cond := func(t v1.NodeConditionType, s v1.ConditionStatus, reason, msg string) v1.NodeCondition {
		return v1.NodeCondition{Type: t, Status: s, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: now}
	}
	port := int32(0)
	if _, p, err := net.SplitHostPort(k.cfg.serveAddr); err == nil {
		fmt.Sscan(p, &port)
	}
	return v1.NodeStatus{
		DaemonEndpoints: v1.NodeDaemonEndpoints{KubeletEndpoint: v1.DaemonEndpoint{Port: port}},
		Capacity:        res,
		Allocatable:     res,
		Conditions: []v1.NodeCondition{
			cond(v1.NodeMemoryPressure, v1.ConditionFalse, "KubeletHasSufficientMemory", "process kubelet"),
			cond(v1.NodeDiskPressure, v1.ConditionFalse, "KubeletHasNoDiskPressure", "process kubelet"),
			cond(v1.NodePIDPressure, v1.ConditionFalse, "KubeletHasSufficientPID", "process kubelet"),
			cond(v1.NodeReady, v1.ConditionTrue, "KubeletReady", "process kubelet is posting ready status"),
		},
		Addresses: []v1.NodeAddress{
			{Type: v1.NodeInternalIP, Address: k.hostIP},
			{Type: v1.NodeHostName, Address: k.cfg.nodeName},
		},
		NodeInfo: v1.NodeSystemInfo{
			KubeletVersion:          k.cfg.version,
			OperatingSystem:         "linux",
			Architecture:            runtime.GOARCH,
			ContainerRuntimeVersion: "process://1",
			OSImage:                 "host processes",
		},
	}
}

// mergeConditions keeps each condition's LastTransitionTime while its status is unchanged.
func mergeConditions(old, cur []v1.NodeCondition) []v1.NodeCondition {
	for i := range cur {
		for _, o := range old {
			if o.Type == cur[i].Type && o.Status == cur[i].Status {
				cur[i].LastTransitionTime = o.LastTransitionTime
			}
		}
	}
	return cur
}

func (k *kubelet) registerNode(ctx context.Context) error {
	nodes := k.cs.CoreV1().Nodes()
	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: k.cfg.nodeName, Labels: map[string]string{
			"kubernetes.io/hostname": k.cfg.nodeName,
			"kubernetes.io/os":       "linux",
			"kubernetes.io/arch":     runtime.GOARCH,
		}},
		Spec: v1.NodeSpec{PodCIDR: k.cfg.podCIDR, PodCIDRs: []string{k.cfg.podCIDR}},
	}
	var err error
	for i := 0; i < 60; i++ {
		_, err = nodes.Create(ctx, node, metav1.CreateOptions{})
		if err == nil || apierrors.IsAlreadyExists(err) {
			err = nil
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		return err
	}
	return k.postNodeStatus(ctx)
}

func (k *kubelet) postNodeStatus(ctx context.Context) error {
	n, err := k.cs.CoreV1().Nodes().Get(ctx, k.cfg.nodeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	st := k.nodeStatus()
	st.Conditions = mergeConditions(n.Status.Conditions, st.Conditions)
	n.Status = st
	_, err = k.cs.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
	return err
}

// heartbeat renews the node lease every 10s and the node status every 20s.
func (k *kubelet) heartbeat(ctx context.Context) {
	leases := k.cs.CoordinationV1().Leases(v1.NamespaceNodeLease)
	dur := int32(40)
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for n := 0; ; n++ {
		now := metav1.NowMicro()
		l, err := leases.Get(ctx, k.cfg.nodeName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			owner := []metav1.OwnerReference{}
			if node, err := k.cs.CoreV1().Nodes().Get(ctx, k.cfg.nodeName, metav1.GetOptions{}); err == nil {
				owner = append(owner, metav1.OwnerReference{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID})
			}
			holder := k.cfg.nodeName
			_, err = leases.Create(ctx, &coordv1.Lease{
				ObjectMeta: metav1.ObjectMeta{Name: k.cfg.nodeName, OwnerReferences: owner},
				Spec:       coordv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &dur, RenewTime: &now},
			}, metav1.CreateOptions{})
			if err != nil && ctx.Err() == nil {
				log.Printf("create lease: %v", err)
			}
		case err == nil:
			l.Spec.RenewTime = &now
			if _, err := leases.Update(ctx, l, metav1.UpdateOptions{}); err != nil && ctx.Err() == nil {
				log.Printf("renew lease: %v", err)
			}
		default:
			if ctx.Err() == nil {
				log.Printf("get lease: %v", err)
			}
		}
		if n%2 == 1 {
			if err := k.postNodeStatus(ctx); err != nil && ctx.Err() == nil {
				log.Printf("node status: %v", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// apiProxy forwards TCP from the bridge address to the loopback API server, so pods (which
// cannot see the host's loopback) reach it at KUBERNETES_SERVICE_HOST.
func (k *kubelet) apiProxy(ctx context.Context) {
	ln, err := retry30(func() (net.Listener, error) { return net.Listen("tcp", k.cfg.proxyListen) })
	if err != nil {
		log.Printf("api proxy: %v", err)
		return
	}
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			u, err := net.DialTimeout("tcp", k.cfg.proxyTarget, 5*time.Second)
			if err != nil {
				return
			}
			defer u.Close()
			done := make(chan struct{}, 2)
			go func() { io.Copy(u, c); done <- struct{}{} }()
			go func() { io.Copy(c, u); done <- struct{}{} }()
			<-done
		}()
	}
}

// ---- mountpoints -----------------------------------------------------------------------

// ensureMountpoint creates dst (a directory, or an empty file when file is true) if missing and
// records the topmost path it created, so it can be removed when the kubelet stops.
func (k *kubelet) ensureMountpoint(dst string, file bool) error {
	dst = filepath.Clean(dst)
	top := ""
	for p := dst; p != "/" && p != "."; p = filepath.Dir(p) {
		if _, err := os.Lstat(p); err == nil {
			break
		}
		top = p
	}
	if top == "" {
		return nil
	}
	k.mountsMu.Lock()
	defer k.mountsMu.Unlock()
	k.mounts = append(k.mounts, top)
	f, _ := os.OpenFile(filepath.Join(k.cfg.runDir, "created-mountpoints"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if f != nil {
		fmt.Fprintln(f, top)
		f.Close()
	}
	if file {
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		return os.WriteFile(dst, nil, 0o644)
	}
	return os.MkdirAll(dst, 0o755)
}

// removeMountpoints deletes the mountpoints created on the host, but only empty ones.
func (k *kubelet) removeMountpoints() {
	k.mountsMu.Lock()
	defer k.mountsMu.Unlock()
	for i := len(k.mounts) - 1; i >= 0; i-- {
		removeEmptyTree(k.mounts[i])
	}
	k.mounts = nil
	os.Remove(filepath.Join(k.cfg.runDir, "created-mountpoints"))
}

// removeEmptyTree removes p if it holds nothing but empty directories and empty files.
func removeEmptyTree(p string) {
	ok := true
	filepath.Walk(p, func(_ string, info os.FileInfo, err error) error {
		if err != nil || (!info.IsDir() && info.Size() > 0) {
			ok = false
		}
		return nil
	})
	if ok && strings.HasPrefix(p, "/") && p != "/" {
		os.RemoveAll(p)
	}
}

// retry30 calls open once a second until it succeeds, at most 30 times (a bridge address may
// appear a moment after start-up), and returns the last result.
func retry30[T any](open func() (T, error)) (T, error) {
	var v T
	var err error
	for i := 0; i < 30; i++ {
		if v, err = open(); err == nil {
			return v, nil
		}
		time.Sleep(time.Second)
	}
	return v, err
}
