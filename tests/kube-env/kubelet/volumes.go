package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func (rt *podRT) volDir(name string) string { return filepath.Join(rt.dir, "volumes", name) }

// objects fetches Secrets and ConfigMaps, remembering them for the time of one pod start.
type objects struct {
	rt      *podRT
	secrets map[string]*v1.Secret
	cms     map[string]*v1.ConfigMap
}

func (o *objects) secret(name string) (*v1.Secret, error) {
	if s, ok := o.secrets[name]; ok {
		return s, nil
	}
	s, err := o.rt.k.cs.CoreV1().Secrets(o.rt.ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	o.secrets[name] = s
	return s, nil
}

func (o *objects) configMap(name string) (*v1.ConfigMap, error) {
	if c, ok := o.cms[name]; ok {
		return c, nil
	}
	c, err := o.rt.k.cs.CoreV1().ConfigMaps(o.rt.ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	o.cms[name] = c
	return c, nil
}

func (rt *podRT) newObjects() *objects {
	return &objects{rt: rt, secrets: map[string]*v1.Secret{}, cms: map[string]*v1.ConfigMap{}}
}

func optional(b *bool) bool { return b != nil && *b }

// fieldValue resolves a downward-API fieldRef against the pod.
func (rt *podRT) fieldValue(path string) (string, error) {
	p := rt.pod
	switch path {
	case "metadata.name":
		return p.Name, nil
	case "metadata.namespace":
		return p.Namespace, nil
	case "metadata.uid":
		return string(p.UID), nil
	case "spec.nodeName":
		return p.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return p.Spec.ServiceAccountName, nil
	case "status.podIP", "status.podIPs":
		return rt.ip, nil
	case "status.hostIP", "status.hostIPs":
		return rt.k.hostIP, nil
	case "metadata.labels", "metadata.annotations":
		m := p.Labels
		if path == "metadata.annotations" {
			m = p.Annotations
		}
		var keys []string
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var b strings.Builder
		for _, k := range keys {
			fmt.Fprintf(&b, "%s=%q\n", k, m[k])
		}
		return b.String(), nil
	}
	for _, pre := range []string{"metadata.labels['", "metadata.annotations['"} {
		if strings.HasPrefix(path, pre) && strings.HasSuffix(path, "']") {
			key := path[len(pre) : len(path)-2]
			if strings.HasPrefix(pre, "metadata.labels") {
				return p.Labels[key], nil
			}
			return p.Annotations[key], nil
		}
	}
	return "", fmt.Errorf("unsupported fieldRef %q", path)
}

// resourceValue resolves a resourceFieldRef from the container's requests/limits.
func (rt *podRT) resourceValue(c *v1.Container, r *v1.ResourceFieldSelector) (string, error) {
	if r.ContainerName != "" {
		for _, o := range append(append([]v1.Container{}, rt.pod.Spec.Containers...), rt.pod.Spec.InitContainers...) {
			if o.Name == r.ContainerName {
				c = &o
				break
			}
		}
	}
	parts := strings.SplitN(r.Resource, ".", 2)
	if len(parts) != 2 {
		return "", fmt.Errorf("bad resource %q", r.Resource)
	}
	list := c.Resources.Limits
	if parts[0] == "requests" {
		list = c.Resources.Requests
	}
	q, ok := list[v1.ResourceName(parts[1])]
	if !ok {
		// No limit: report the node's capacity, like the kubelet does.
		switch parts[1] {
		case "cpu":
			q = mustQ(rt.k.cfg.cpu)
		case "memory":
			q = mustQ(rt.k.cfg.memory)
		default:
			return "0", nil
		}
	}
	div := r.Divisor
	if div.IsZero() {
		return strconv.FormatInt(q.Value(), 10), nil
	}
	if parts[1] == "cpu" {
		v := (q.MilliValue() + div.MilliValue() - 1) / div.MilliValue()
		return strconv.FormatInt(v, 10), nil
	}
	v := (q.Value() + div.Value() - 1) / div.Value()
	return strconv.FormatInt(v, 10), nil
}

// containerEnv builds the process environment: PATH and the service variables, then envFrom,
// then env (with $(VAR) references to earlier variables expanded).
func (rt *podRT) containerEnv(c *v1.Container) ([]string, error) {
	o := rt.newObjects()
	vars := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := vars[k]; !ok {
			order = append(order, k)
		}
		vars[k] = v
	}
	set("PATH", rt.k.cfg.path)
	set("HOME", "/root")
	hostname := rt.name
	if rt.pod.Spec.Hostname != "" {
		hostname = rt.pod.Spec.Hostname
	}
	set("HOSTNAME", hostname)
	if rt.k.cfg.proxyListen != "" {
		host, port, _ := net.SplitHostPort(rt.k.cfg.proxyListen)
		set("KUBERNETES_SERVICE_HOST", host)
		set("KUBERNETES_SERVICE_PORT", port)
		set("KUBERNETES_SERVICE_PORT_HTTPS", port)
		set("KUBERNETES_PORT", "tcp://"+rt.k.cfg.proxyListen)
	}
	for _, ef := range c.EnvFrom {
		var data map[string]string
		switch {
		case ef.ConfigMapRef != nil:
			cm, err := o.configMap(ef.ConfigMapRef.Name)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(ef.ConfigMapRef.Optional) {
					continue
				}
				return nil, fmt.Errorf("envFrom configmap %q: %v", ef.ConfigMapRef.Name, err)
			}
			data = cm.Data
		case ef.SecretRef != nil:
			s, err := o.secret(ef.SecretRef.Name)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(ef.SecretRef.Optional) {
					continue
				}
				return nil, fmt.Errorf("envFrom secret %q: %v", ef.SecretRef.Name, err)
			}
			data = map[string]string{}
			for k, v := range s.Data {
				data[k] = string(v)
			}
		}
		keys := make([]string, 0, len(data))
		for k := range data {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			set(ef.Prefix+k, data[k])
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			set(e.Name, expand(e.Value, vars))
			continue
		}
		vf := e.ValueFrom
		switch {
		case vf.FieldRef != nil:
			v, err := rt.fieldValue(vf.FieldRef.FieldPath)
			if err != nil {
				return nil, err
			}
			set(e.Name, v)
		case vf.ResourceFieldRef != nil:
			v, err := rt.resourceValue(c, vf.ResourceFieldRef)
			if err != nil {
				return nil, err
			}
			set(e.Name, v)
		case vf.SecretKeyRef != nil:
			s, err := o.secret(vf.SecretKeyRef.Name)
			if err == nil {
				if v, ok := s.Data[vf.SecretKeyRef.Key]; ok {
					set(e.Name, string(v))
					continue
				}
				err = fmt.Errorf("key %q not found", vf.SecretKeyRef.Key)
			}
			if !optional(vf.SecretKeyRef.Optional) {
				return nil, fmt.Errorf("env %s: secret %q: %v", e.Name, vf.SecretKeyRef.Name, err)
			}
		case vf.ConfigMapKeyRef != nil:
			cm, err := o.configMap(vf.ConfigMapKeyRef.Name)
			if err == nil {
				if v, ok := cm.Data[vf.ConfigMapKeyRef.Key]; ok {
					set(e.Name, v)
					continue
				}
				err = fmt.Errorf("key %q not found", vf.ConfigMapKeyRef.Key)
			}
			if !optional(vf.ConfigMapKeyRef.Optional) {
				return nil, fmt.Errorf("env %s: configmap %q: %v", e.Name, vf.ConfigMapKeyRef.Name, err)
			}
		default:
			return nil, fmt.Errorf("env %s: unsupported valueFrom", e.Name)
		}
	}
	env := make([]string, 0, len(order))
	for _, k := range order {
		env = append(env, k+"="+vars[k])
	}
	return env, nil
}

// writeFile writes one projected file, creating parent directories.
func writeFile(dir, rel string, data []byte, mode *int32, def int32) error {
	m := def
	if mode != nil {
		m = *mode
	}
	p := filepath.Join(dir, filepath.Clean("/"+rel))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(p, data, os.FileMode(m)); err != nil {
		return err
	}
	return os.Chmod(p, os.FileMode(m))
}

// writeKeys writes data (all keys, or the listed items) into dir.
func writeKeys(dir string, data map[string][]byte, items []v1.KeyToPath, def int32, what string, opt bool) error {
	if len(items) == 0 {
		for k, v := range data {
			if err := writeFile(dir, k, v, nil, def); err != nil {
				return err
			}
		}
		return nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if opt {
				continue
			}
			return fmt.Errorf("%s: key %q not found", what, it.Key)
		}
		if err := writeFile(dir, it.Path, v, it.Mode, def); err != nil {
			return err
		}
	}
	return nil
}

func cmBytes(cm *v1.ConfigMap) map[string][]byte {
	d := map[string][]byte{}
	for k, v := range cm.Data {
		d[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		d[k] = v
	}
	return d
}

func defMode(m *int32) int32 {
	if m != nil {
		return *m
	}
	return 0o644
}

// materializeVolumes writes the content of every supported volume under the pod directory.
func (rt *podRT) materializeVolumes() error {
	o := rt.newObjects()
	os.RemoveAll(filepath.Join(rt.dir, "volumes"))
	for _, vol := range rt.pod.Spec.Volumes {
		dir := rt.volDir(vol.Name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		vs := vol.VolumeSource
		switch {
		case vs.EmptyDir != nil:
		case vs.HostPath != nil:
			os.Remove(dir)
			if t := vs.HostPath.Type; t != nil && *t == v1.HostPathDirectoryOrCreate {
				if err := os.MkdirAll(vs.HostPath.Path, 0o755); err != nil {
					return err
				}
			}
			if err := os.Symlink(vs.HostPath.Path, dir); err != nil {
				return err
			}
		case vs.Secret != nil:
			s, err := o.secret(vs.Secret.SecretName)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(vs.Secret.Optional) {
					continue
				}
				return fmt.Errorf("volume %s: secret %q: %v", vol.Name, vs.Secret.SecretName, err)
			}
			if err := writeKeys(dir, s.Data, vs.Secret.Items, defMode(vs.Secret.DefaultMode), "secret "+s.Name, optional(vs.Secret.Optional)); err != nil {
				return err
			}
		case vs.ConfigMap != nil:
			cm, err := o.configMap(vs.ConfigMap.Name)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(vs.ConfigMap.Optional) {
					continue
				}
				return fmt.Errorf("volume %s: configmap %q: %v", vol.Name, vs.ConfigMap.Name, err)
			}
			if err := writeKeys(dir, cmBytes(cm), vs.ConfigMap.Items, defMode(vs.ConfigMap.DefaultMode), "configmap "+cm.Name, optional(vs.ConfigMap.Optional)); err != nil {
				return err
			}
		case vs.DownwardAPI != nil:
			if err := rt.writeDownward(dir, vs.DownwardAPI.Items, defMode(vs.DownwardAPI.DefaultMode)); err != nil {
				return err
			}
		case vs.Projected != nil:
			if err := rt.writeProjected(o, dir, vs.Projected); err != nil {
				return fmt.Errorf("volume %s: %v", vol.Name, err)
			}
		default:
			return fmt.Errorf("volume %s: unsupported volume type (process kubelet supports emptyDir, hostPath, secret, configMap, downwardAPI, projected)", vol.Name)
		}
	}
	return nil
}

func (rt *podRT) writeDownward(dir string, items []v1.DownwardAPIVolumeFile, def int32) error {
	for _, it := range items {
		var v string
		var err error
		switch {
		case it.FieldRef != nil:
			v, err = rt.fieldValue(it.FieldRef.FieldPath)
		case it.ResourceFieldRef != nil:
			c := &rt.pod.Spec.Containers[0]
			v, err = rt.resourceValue(c, it.ResourceFieldRef)
		}
		if err != nil {
			return err
		}
		if err := writeFile(dir, it.Path, []byte(v), it.Mode, def); err != nil {
			return err
		}
	}
	return nil
}

func (rt *podRT) writeProjected(o *objects, dir string, p *v1.ProjectedVolumeSource) error {
	def := defMode(p.DefaultMode)
	for _, src := range p.Sources {
		switch {
		case src.Secret != nil:
			s, err := o.secret(src.Secret.Name)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(src.Secret.Optional) {
					continue
				}
				return fmt.Errorf("secret %q: %v", src.Secret.Name, err)
			}
			if err := writeKeys(dir, s.Data, src.Secret.Items, def, "secret "+s.Name, optional(src.Secret.Optional)); err != nil {
				return err
			}
		case src.ConfigMap != nil:
			cm, err := o.configMap(src.ConfigMap.Name)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(src.ConfigMap.Optional) {
					continue
				}
				return fmt.Errorf("configmap %q: %v", src.ConfigMap.Name, err)
			}
			if err := writeKeys(dir, cmBytes(cm), src.ConfigMap.Items, def, "configmap "+cm.Name, optional(src.ConfigMap.Optional)); err != nil {
				return err
			}
		case src.DownwardAPI != nil:
			if err := rt.writeDownward(dir, src.DownwardAPI.Items, def); err != nil {
				return err
			}
		case src.ServiceAccountToken != nil:
			sa := rt.pod.Spec.ServiceAccountName
			if sa == "" {
				sa = "default"
			}
			exp := int64(3600)
			if src.ServiceAccountToken.ExpirationSeconds != nil {
				exp = *src.ServiceAccountToken.ExpirationSeconds
			}
			tr := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
				ExpirationSeconds: &exp,
				BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: rt.name, UID: rt.uid},
			}}
			if a := src.ServiceAccountToken.Audience; a != "" {
				tr.Spec.Audiences = []string{a}
			}
			res, err := rt.k.cs.CoreV1().ServiceAccounts(rt.ns).CreateToken(context.Background(), sa, tr, metav1.CreateOptions{})
			if err != nil {
				return fmt.Errorf("token for serviceaccount %q: %v", sa, err)
			}
			if err := writeFile(dir, src.ServiceAccountToken.Path, []byte(res.Status.Token), nil, def); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unsupported projected source")
		}
	}
	return nil
}

// mountArgs renders the container's volumeMounts as wrapper arguments (src dst ro|rw).
func (rt *podRT) mountArgs(c *v1.Container) ([]string, error) {
	var args []string
	for _, m := range c.VolumeMounts {
		src := rt.volDir(m.Name)
		if m.SubPath != "" {
			src = filepath.Join(src, filepath.Clean("/"+m.SubPath))
		} else if m.SubPathExpr != "" {
			return nil, fmt.Errorf("volumeMount %s: subPathExpr is not supported", m.Name)
		}
		real, err := filepath.EvalSymlinks(src)
		if err != nil {
			if m.SubPath == "" {
				return nil, fmt.Errorf("volumeMount %s: %v", m.Name, err)
			}
			// A missing subPath is created as a directory, as the kubelet does.
			if err := os.MkdirAll(src, 0o755); err != nil {
				return nil, err
			}
			real = src
		}
		fi, err := os.Stat(real)
		if err != nil {
			return nil, err
		}
		if err := rt.k.ensureMountpoint(m.MountPath, !fi.IsDir()); err != nil {
			return nil, fmt.Errorf("mountpoint %s: %v", m.MountPath, err)
		}
		ro := "rw"
		if m.ReadOnly {
			ro = "ro"
		}
		args = append(args, real, m.MountPath, ro)
	}
	return args, nil
}

func mustQ(s string) resource.Quantity { return resource.MustParse(s) }

// insecureTransport is for HTTPS probes, which (like the kubelet's) don't verify certificates.
var insecureTransport = &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}

// ---- readiness probes ------------------------------------------------------------------

// probeLoop runs the container's readiness probe (httpGet, tcpSocket or exec) and sets Ready.
func (rt *podRT) probeLoop(c *ctr, stop chan struct{}) {
	p := c.spec.ReadinessProbe
	period := time.Duration(max32(p.PeriodSeconds, 1)) * time.Second
	if period > 2*time.Second {
		// Tests want fast readiness; probe at least every 2s.
		period = 2 * time.Second
	}
	succ, fail := max32(p.SuccessThreshold, 1), max32(p.FailureThreshold, 1)
	okRun, badRun := int32(0), int32(0)
	select {
	case <-stop:
		return
	case <-time.After(time.Duration(p.InitialDelaySeconds) * time.Second):
	}
	for {
		rt.mu.Lock()
		running := c.state.Running != nil
		ready := c.ready
		rt.mu.Unlock()
		if running {
			if rt.probe(&c.spec, p) {
				okRun, badRun = okRun+1, 0
			} else {
				okRun, badRun = 0, badRun+1
			}
			nr := ready
			if okRun >= succ {
				nr = true
			} else if badRun >= fail {
				nr = false
			}
			if nr != ready {
				rt.mu.Lock()
				if c.state.Running != nil {
					c.ready = nr
				}
				rt.mu.Unlock()
				rt.markDirty()
			}
		}
		select {
		case <-stop:
			return
		case <-time.After(period):
		}
	}
}

func max32(v, m int32) int32 {
	if v < m {
		return m
	}
	return v
}

func (rt *podRT) port(c *v1.Container, p intstr.IntOrString) string {
	if p.Type == intstr.Int {
		return strconv.Itoa(p.IntValue())
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return strconv.Itoa(int(cp.ContainerPort))
		}
	}
	return p.StrVal
}

func (rt *podRT) probe(c *v1.Container, p *v1.Probe) bool {
	timeout := time.Duration(max32(p.TimeoutSeconds, 1)) * time.Second
	rt.mu.Lock()
	ip := rt.ip
	rt.mu.Unlock()
	switch {
	case p.HTTPGet != nil:
		h := p.HTTPGet
		host := ip
		if h.Host != "" {
			host = h.Host
		}
		scheme := strings.ToLower(string(h.Scheme))
		if scheme == "" {
			scheme = "http"
		}
		url := fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, rt.port(c, h.Port)), h.Path)
		req, err := http.NewRequest("GET", url, nil)
		if err != nil {
			return false
		}
		for _, hh := range h.HTTPHeaders {
			req.Header.Add(hh.Name, hh.Value)
		}
		cl := &http.Client{Timeout: timeout, Transport: insecureTransport}
		resp, err := cl.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode >= 200 && resp.StatusCode < 400
	case p.TCPSocket != nil:
		host := ip
		if p.TCPSocket.Host != "" {
			host = p.TCPSocket.Host
		}
		conn, err := net.DialTimeout("tcp", net.JoinHostPort(host, rt.port(c, p.TCPSocket.Port)), timeout)
		if err != nil {
			return false
		}
		conn.Close()
		return true
	case p.Exec != nil:
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		env, err := rt.containerEnv(c)
		if err != nil {
			return false
		}
		args := append([]string{"ip", "netns", "exec", rt.netns}, p.Exec.Command...)
		if rt.hostNet {
			// Resolve the command with the pod's PATH, not the kubelet's.
			args = append([]string{"/bin/sh", "-c", `exec "$@"`, "probe"}, p.Exec.Command...)
		}
		if len(args) == 0 {
			return false
		}
		cmd := exec.CommandContext(ctx, args[0], args[1:]...)
		cmd.Env = env
		return cmd.Run() == nil
	}
	return true
}
