package main

import (
	"encoding/binary"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ipam hands out pod addresses from one /24-ish range; the first address is the bridge's.
type ipam struct {
	mu      sync.Mutex
	base    uint32
	size    uint32
	prefix  int
	gateway net.IP
	used    map[uint32]string
	next    uint32
}

func newIPAM(cidr string) (*ipam, error) {
	_, n, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, err
	}
	ones, bits := n.Mask.Size()
	if bits != 32 || ones > 29 {
		return nil, fmt.Errorf("need an IPv4 range of /29 or larger, got %s", cidr)
	}
	base := binary.BigEndian.Uint32(n.IP.To4())
	p := &ipam{base: base, size: 1 << (32 - ones), prefix: ones, used: map[uint32]string{}}
	p.gateway = p.ip(1)
	return p, nil
}

func (p *ipam) ip(off uint32) net.IP {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, p.base+off)
	return net.IP(b)
}

// allocate returns a free address for owner, round robin so a freed address is not reused at once.
func (p *ipam) allocate(owner string) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.size - 3 // usable offsets are 2 .. size-2
	for i := uint32(0); i < n; i++ {
		off := 2 + (p.next+i)%n
		if _, taken := p.used[off]; !taken {
			p.used[off] = owner
			p.next = off - 1 // the next search starts after this one
			return p.ip(off).String(), nil
		}
	}
	return "", fmt.Errorf("pod network exhausted")
}

func (p *ipam) release(ip string) {
	a := net.ParseIP(ip).To4()
	if a == nil {
		return
	}
	p.mu.Lock()
	delete(p.used, binary.BigEndian.Uint32(a)-p.base)
	p.mu.Unlock()
}

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// setupNetns creates network namespace ns with eth0 = ip on the bridge, a default route via the
// bridge address, /etc/netns/<ns>/hosts so the pod's hostname resolves to its IP, and a
// resolv.conf pointing at the cluster DNS of the kubelet.
func (k *kubelet) setupNetns(ns, hostVeth, ip, hostname, podNamespace string) error {
	peer := "tmp" + hostVeth
	if len(peer) > 15 {
		peer = peer[:15]
	}
	steps := [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "link", "add", hostVeth, "type", "veth", "peer", "name", peer, "netns", ns},
		{"ip", "link", "set", hostVeth, "master", k.cfg.bridge, "up"},
		{"ip", "-n", ns, "link", "set", peer, "name", "eth0"},
		{"ip", "-n", ns, "addr", "add", ip + "/" + strconv.Itoa(k.ipam.prefix), "dev", "eth0"},
		{"ip", "-n", ns, "link", "set", "eth0", "up"},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
		{"ip", "-n", ns, "route", "add", "default", "via", k.hostIP},
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			k.teardownNetns(ns, hostVeth)
			return err
		}
	}
	etc := filepath.Join("/etc/netns", ns)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return err
	}
	hosts := fmt.Sprintf("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n", ip, hostname)
	if err := os.WriteFile(filepath.Join(etc, "hosts"), []byte(hosts), 0o644); err != nil {
		return err
	}
	if !k.cfg.services {
		return nil
	}
	// `ip netns exec` bind-mounts this over /etc/resolv.conf: cluster DNS on the bridge address.
	// Short timeouts and more attempts: one lost datagram on a loaded machine costs a second
	// instead of failing the lookup ("Temporary failure in name resolution").
	resolv := fmt.Sprintf("search %s.svc.cluster.local svc.cluster.local cluster.local\nnameserver %s\noptions ndots:5 timeout:1 attempts:5\n", podNamespace, k.hostIP)
	return os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte(resolv), 0o644)
}

// netnsPids lists the processes that live in network namespace ns.
func netnsPids(ns string) []int {
	out, _ := exec.Command("ip", "netns", "pids", ns).Output()
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if p, err := strconv.Atoi(f); err == nil {
			pids = append(pids, p)
		}
	}
	return pids
}

// teardownNetns kills whatever still runs in ns, then deletes ns, its veth and its /etc/netns dir.
func (k *kubelet) teardownNetns(ns, hostVeth string) {
	for i := 0; i < 50; i++ {
		pids := netnsPids(ns)
		if len(pids) == 0 {
			break
		}
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := run("ip", "netns", "del", ns); err != nil && !strings.Contains(err.Error(), "No such file") {
		log.Printf("%v", err)
	}
	if hostVeth != "" {
		exec.Command("ip", "link", "del", hostVeth).Run()
	}
	os.RemoveAll(filepath.Join("/etc/netns", ns))
}

// cleanupStaleNetns removes namespaces with our prefix that no running pod owns (left from a
// previous run of the kubelet, or after shutdown).
func (k *kubelet) cleanupStaleNetns() {
	out, _ := exec.Command("ip", "netns", "list").Output()
	owned := map[string]bool{}
	k.mu.Lock()
	for _, rt := range k.pods {
		owned[rt.netns] = true
	}
	k.mu.Unlock()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], k.cfg.nsPrefix) || owned[f[0]] {
			continue
		}
		log.Printf("removing stale network namespace %s", f[0])
		k.teardownNetns(f[0], "")
	}
}
