package main

import (
	"context"
	"io"
	"log"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
)

// svcProxy is a minimal userspace kube-proxy and cluster DNS for the pods of this node:
//   - every ClusterIP is added as a /32 to the pod bridge, and each TCP service port is a
//     listener on it that forwards connections to a ready endpoint (round robin);
//   - a DNS server on the bridge address answers <svc>.<ns>.svc.<domain> with the ClusterIP
//     (or the ready endpoint IPs of a headless service) and NXDOMAIN for everything else.
type svcProxy struct {
	k      *kubelet
	domain string
	svcs   corelisters.ServiceLister
	slices discoverylisters.EndpointSliceLister

	mu        sync.Mutex
	listeners map[string]net.Listener // "ip:port" -> listener
	owner     map[string]string       // "ip:port" -> ns/name/portName
	addrs     map[string]int          // ClusterIP -> number of listeners using it
	rr        uint64
}

func (k *kubelet) startServices(ctx context.Context, f informers.SharedInformerFactory) *svcProxy {
	p := &svcProxy{
		k: k, domain: "cluster.local",
		svcs:      f.Core().V1().Services().Lister(),
		slices:    f.Discovery().V1().EndpointSlices().Lister(),
		listeners: map[string]net.Listener{}, owner: map[string]string{}, addrs: map[string]int{},
	}
	sync := func(interface{}) { p.reconcile() }
	f.Core().V1().Services().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: sync, UpdateFunc: func(_, o interface{}) { sync(o) }, DeleteFunc: sync,
	})
	f.Discovery().V1().EndpointSlices().Informer()
	go p.serveDNS(ctx)
	go func() { <-ctx.Done(); p.closeAll() }()
	return p
}

// reconcile opens a listener for every TCP port of every ClusterIP service and closes the rest.
func (p *svcProxy) reconcile() {
	all, err := p.svcs.List(labels.Everything())
	if err != nil {
		return
	}
	want := map[string]string{}
	for _, s := range all {
		ip := s.Spec.ClusterIP
		if ip == "" || ip == v1.ClusterIPNone || net.ParseIP(ip).To4() == nil {
			continue
		}
		for _, sp := range s.Spec.Ports {
			if sp.Protocol != "" && sp.Protocol != v1.ProtocolTCP {
				continue
			}
			want[net.JoinHostPort(ip, strconv.Itoa(int(sp.Port)))] = s.Namespace + "/" + s.Name + "/" + sp.Name
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, ln := range p.listeners {
		if want[key] != p.owner[key] {
			ln.Close()
			delete(p.listeners, key)
			delete(p.owner, key)
			p.releaseAddr(key)
		}
	}
	for key, own := range want {
		if _, ok := p.listeners[key]; ok {
			continue
		}
		ip, _, _ := net.SplitHostPort(key)
		if p.addrs[ip] == 0 {
			if out, err := exec.Command("ip", "addr", "replace", ip+"/32", "dev", p.k.cfg.bridge).CombinedOutput(); err != nil {
				log.Printf("service address %s: %v: %s", ip, err, out)
				continue
			}
		}
		p.addrs[ip]++
		ln, err := net.Listen("tcp", key)
		if err != nil {
			log.Printf("service %s on %s: %v", own, key, err)
			p.releaseAddr(key)
			continue
		}
		p.listeners[key], p.owner[key] = ln, own
		go p.accept(ln, own)
	}
}

// releaseAddr drops one use of the ClusterIP of key; the last one removes the address.
func (p *svcProxy) releaseAddr(key string) {
	ip, _, _ := net.SplitHostPort(key)
	p.addrs[ip]--
	if p.addrs[ip] <= 0 {
		delete(p.addrs, ip)
		exec.Command("ip", "addr", "del", ip+"/32", "dev", p.k.cfg.bridge).Run()
	}
}

func (p *svcProxy) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, ln := range p.listeners {
		ln.Close()
		p.releaseAddr(key)
	}
	p.listeners = map[string]net.Listener{}
}

// endpoints returns the ready "ip:port" backends of service ns/name for its port portName.
func (p *svcProxy) endpoints(ns, name, portName string) []string {
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: name})
	slices, _ := p.slices.EndpointSlices(ns).List(sel)
	var out []string
	for _, sl := range slices {
		if sl.AddressType != discoveryv1.AddressTypeIPv4 {
			continue
		}
		port := int32(-1)
		for _, sp := range sl.Ports {
			if sp.Name != nil && *sp.Name == portName && sp.Port != nil {
				port = *sp.Port
			}
		}
		for _, ep := range sl.Endpoints {
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				continue
			}
			for _, a := range ep.Addresses {
				if port >= 0 {
					out = append(out, net.JoinHostPort(a, strconv.Itoa(int(port))))
				} else {
					out = append(out, a)
				}
			}
		}
	}
	return out
}

func (p *svcProxy) accept(ln net.Listener, own string) {
	parts := strings.SplitN(own, "/", 3)
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			eps := p.endpoints(parts[0], parts[1], parts[2])
			if len(eps) == 0 {
				return // no ready endpoint: refuse by closing, like a REJECT rule
			}
			n := atomic.AddUint64(&p.rr, 1)
			var u net.Conn
			for i := 0; i < len(eps) && u == nil; i++ {
				u, _ = net.DialTimeout("tcp", eps[(int(n)+i)%len(eps)], 5*time.Second)
			}
			if u == nil {
				return
			}
			defer u.Close()
			done := make(chan struct{}, 2)
			go func() { io.Copy(u, c); closeWrite(u); done <- struct{}{} }()
			go func() { io.Copy(c, u); closeWrite(c); done <- struct{}{} }()
			<-done
			<-done
		}()
	}
}

func closeWrite(c net.Conn) {
	if t, ok := c.(*net.TCPConn); ok {
		t.CloseWrite()
	}
}

// lookup resolves a fully qualified name to IPv4 addresses; ok is false for unknown names.
func (p *svcProxy) lookup(name string) (ips []net.IP, ok bool) {
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	rest, found := strings.CutSuffix(name, ".svc."+p.domain)
	if !found {
		return nil, false
	}
	labs := strings.Split(rest, ".")
	if len(labs) != 2 {
		return nil, false
	}
	s, err := p.svcs.Services(labs[1]).Get(labs[0])
	if err != nil {
		return nil, false
	}
	if s.Spec.ClusterIP != "" && s.Spec.ClusterIP != v1.ClusterIPNone {
		return []net.IP{net.ParseIP(s.Spec.ClusterIP)}, true
	}
	seen := map[string]bool{}
	for _, sp := range append([]v1.ServicePort{{}}, s.Spec.Ports...) {
		for _, ep := range p.endpoints(s.Namespace, s.Name, sp.Name) {
			host := ep
			if h, _, err := net.SplitHostPort(ep); err == nil {
				host = h
			}
			if !seen[host] {
				seen[host] = true
				ips = append(ips, net.ParseIP(host))
			}
		}
	}
	return ips, true
}

// serveDNS answers cluster names over UDP on the bridge address, port 53.
func (p *svcProxy) serveDNS(ctx context.Context) {
	pc, err := retry30(func() (net.PacketConn, error) {
		return net.ListenPacket("udp", net.JoinHostPort(p.k.hostIP, "53"))
	})
	if err != nil {
		log.Printf("dns: %v", err)
		return
	}
	go func() { <-ctx.Done(); pc.Close() }()
	buf := make([]byte, 1500)
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if resp := p.answer(buf[:n]); resp != nil {
			pc.WriteTo(resp, addr)
		}
	}
}

func (p *svcProxy) answer(req []byte) []byte {
	var parser dnsmessage.Parser
	h, err := parser.Start(req)
	if err != nil || h.Response {
		return nil
	}
	q, err := parser.Question()
	if err != nil {
		return nil
	}
	ips, known := p.lookup(q.Name.String())
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
	if !known {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if b.StartQuestions() != nil || b.Question(q) != nil || b.StartAnswers() != nil {
		return nil
	}
	if q.Type == dnsmessage.TypeA && q.Class == dnsmessage.ClassINET {
		for _, ip := range ips {
			var a [4]byte
			copy(a[:], ip.To4())
			b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}, dnsmessage.AResource{A: a})
		}
	}
	msg, err := b.Finish()
	if err != nil {
		return nil
	}
	return msg
}
