package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// serveKubeletAPI serves the one kubelet endpoint the API server proxies that makes sense
// here, /containerLogs/{ns}/{pod}/{container} (so `kubectl logs` works), over TLS with client
// certificates of the cluster CA. Everything else (exec, attach, port-forward) is 501.
func (k *kubelet) serveKubeletAPI(ctx context.Context) {
	caPEM, err := os.ReadFile(k.cfg.clientCA)
	if err != nil {
		log.Printf("kubelet api: %v", err)
		return
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(k.cfg.tlsCert, k.cfg.tlsKey)
	if err != nil {
		log.Printf("kubelet api: %v", err)
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/containerLogs/", k.containerLogs)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "not supported by the process kubelet", http.StatusNotImplemented)
	})
	srv := &http.Server{
		Addr:    k.cfg.serveAddr,
		Handler: mux,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientCAs:    pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
		},
	}
	go func() { <-ctx.Done(); srv.Close() }()
	for i := 0; i < 30; i++ {
		err = srv.ListenAndServeTLS("", "")
		if err == http.ErrServerClosed {
			return
		}
		time.Sleep(time.Second)
	}
	log.Printf("kubelet api: %v", err)
}

// logFile finds the log of container c of pod ns/name (the newest pod of that name).
func (k *kubelet) logFile(ns, name, c string) string {
	dirs, _ := filepath.Glob(filepath.Join(k.cfg.runDir, "pods", ns+"_"+name+"_*"))
	sort.Slice(dirs, func(i, j int) bool {
		a, _ := os.Stat(dirs[i])
		b, _ := os.Stat(dirs[j])
		return a != nil && b != nil && a.ModTime().After(b.ModTime())
	})
	for _, d := range dirs {
		p := filepath.Join(d, c+".log")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

func (k *kubelet) containerLogs(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/containerLogs/"), "/")
	if len(parts) != 3 {
		http.Error(w, "want /containerLogs/{namespace}/{pod}/{container}", http.StatusBadRequest)
		return
	}
	p := k.logFile(parts[0], parts[1], parts[2])
	if p == "" {
		http.Error(w, "no log for that container", http.StatusNotFound)
		return
	}
	f, err := os.Open(p)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	q := r.URL.Query()
	data, _ := io.ReadAll(f)
	if n, err := strconv.Atoi(q.Get("tailLines")); err == nil && n >= 0 {
		lines := bytes.SplitAfter(data, []byte("\n"))
		if len(lines) > 0 && len(lines[len(lines)-1]) == 0 {
			lines = lines[:len(lines)-1]
		}
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		data = bytes.Join(lines, nil)
	}
	w.Header().Set("Content-Type", "text/plain")
	w.Write(data)
	if q.Get("follow") != "true" {
		return
	}
	// Follow: stream what gets appended until the client goes away or the container ends.
	fl, _ := w.(http.Flusher)
	rd := bufio.NewReader(f)
	buf := make([]byte, 32*1024)
	for {
		if fl != nil {
			fl.Flush()
		}
		n, _ := rd.Read(buf)
		if n > 0 {
			if _, err := w.Write(buf[:n]); err != nil {
				return
			}
			continue
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
		if !k.containerRunning(parts[0], parts[1], parts[2]) {
			// Drain what the process wrote before it exited, then end the stream.
			if n, _ := rd.Read(buf); n > 0 {
				w.Write(buf[:n])
				continue
			}
			return
		}
	}
}

// containerRunning reports whether container c of pod ns/name runs (or will be restarted).
func (k *kubelet) containerRunning(ns, name, c string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, rt := range k.pods {
		if rt.ns != ns || rt.name != name {
			continue
		}
		rt.mu.Lock()
		defer rt.mu.Unlock()
		if rt.terminated || rt.stopping {
			return false
		}
		for _, x := range append(append([]*ctr{}, rt.inits...), rt.ctrs...) {
			if x.spec.Name == c {
				return x.state.Terminated == nil
			}
		}
	}
	return false
}
