package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
)

// wrapper runs inside the pod's network namespace (entered by `ip netns exec`, which also gives
// the process a private mount namespace) and a new UTS namespace: it bind-mounts the volumes,
// sets the hostname, changes directory, and execs the container command.
// Arguments: (src dst ro|rw)... -- command args...
const wrapper = `set -e
while [ "$1" != "--" ]; do
  /bin/mount --bind "$1" "$2"
  if [ "$3" = ro ]; then /bin/mount -o remount,bind,ro "$2"; fi
  shift 3
done
shift
/bin/hostname "$DGRS_POD_HOSTNAME" 2>/dev/null || true
cd "$DGRS_POD_WORKDIR"
unset DGRS_POD_HOSTNAME DGRS_POD_WORKDIR
exec "$@"`

// ctr is one container of a pod: a supervised host process.
type ctr struct {
	spec     v1.Container
	init     bool
	pid      int
	cmd      *exec.Cmd
	state    v1.ContainerState
	last     v1.ContainerState
	restarts int32
	ready    bool
	started  bool // started at least once
}

// podRT is the runtime of one pod on this node.
type podRT struct {
	k    *kubelet
	uid  types.UID
	ns   string
	name string
	dir  string

	mu         sync.Mutex
	pod        *v1.Pod
	netns      string
	hostVeth   string
	ip         string
	startTime  *metav1.Time
	initDone   bool
	sandbox    bool
	inits      []*ctr
	ctrs       []*ctr
	phase      v1.PodPhase
	reason     string
	message    string
	stopping   bool
	deadline   time.Time // SIGKILL after this once stopping
	gone       bool      // the pod object no longer exists
	terminated bool      // all processes are gone for good
	stopCh     chan struct{}
	dirty      chan struct{}
	hostNet    bool // hostNetwork: no namespace, the pod IP is the host's
}

func newPodRT(k *kubelet, pod *v1.Pod) *podRT {
	id := string(pod.UID)
	short := strings.ReplaceAll(id, "-", "")[:10]
	rt := &podRT{
		k: k, uid: pod.UID, ns: pod.Namespace, name: pod.Name, pod: pod,
		dir:      filepath.Join(k.cfg.runDir, "pods", pod.Namespace+"_"+pod.Name+"_"+short),
		netns:    k.cfg.nsPrefix + short,
		hostVeth: "dgv" + short,
		phase:    v1.PodPending,
		stopCh:   make(chan struct{}),
		dirty:    make(chan struct{}, 1),
		hostNet:  pod.Spec.HostNetwork,
	}
	for _, c := range pod.Spec.InitContainers {
		rt.inits = append(rt.inits, &ctr{spec: c, init: true, state: waiting("PodInitializing", "")})
	}
	for _, c := range pod.Spec.Containers {
		rt.ctrs = append(rt.ctrs, &ctr{spec: c, state: waiting("ContainerCreating", "")})
	}
	return rt
}

func waiting(reason, msg string) v1.ContainerState {
	return v1.ContainerState{Waiting: &v1.ContainerStateWaiting{Reason: reason, Message: msg}}
}

func (rt *podRT) logf(format string, a ...interface{}) {
	log.Printf("pod %s/%s: %s", rt.ns, rt.name, fmt.Sprintf(format, a...))
}

// setPod records the latest pod object and starts graceful termination once it is deleted.
func (rt *podRT) setPod(pod *v1.Pod) {
	rt.mu.Lock()
	rt.pod = pod
	rt.mu.Unlock()
	if pod.DeletionTimestamp != nil {
		grace := int64(30)
		if pod.DeletionGracePeriodSeconds != nil {
			grace = *pod.DeletionGracePeriodSeconds
		}
		rt.requestStop(time.Duration(grace)*time.Second, false)
	}
}

func (rt *podRT) objectGone() { rt.requestStop(0, true) }

// requestStop asks the pod to terminate, with SIGKILL after grace (a shorter later request wins).
func (rt *podRT) requestStop(grace time.Duration, gone bool) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if gone {
		rt.gone = true
	}
	dl := time.Now().Add(grace)
	if !rt.stopping {
		rt.stopping = true
		rt.deadline = dl
		close(rt.stopCh)
		return
	}
	if dl.Before(rt.deadline) {
		rt.deadline = dl
	}
}

func (rt *podRT) stopped() bool {
	select {
	case <-rt.stopCh:
		return true
	default:
		return false
	}
}

// sleep waits d or until the pod is being stopped; it reports whether to go on.
func (rt *podRT) sleep(d time.Duration) bool {
	select {
	case <-rt.stopCh:
		return false
	case <-time.After(d):
		return true
	}
}

func (rt *podRT) markDirty() {
	select {
	case rt.dirty <- struct{}{}:
	default:
	}
}

// run drives the pod through its life: sandbox, volumes, init containers, containers,
// termination, and finally removal of the object once it was deleted.
func (rt *podRT) run() {
	rt.logf("starting (uid %s)", rt.uid)
	statusDone := make(chan struct{})
	statusQuit := make(chan struct{})
	go rt.statusLoop(statusQuit, statusDone)
	rt.markDirty()

	if err := os.MkdirAll(rt.dir, 0o755); err != nil {
		rt.logf("%v", err)
	}
	if rt.startSandbox() && rt.prepare() && rt.runInits() {
		rt.startContainers()
	}
	<-rt.stopCh
	rt.terminate()
	rt.markDirty()
	close(statusQuit)
	<-statusDone

	rt.mu.Lock()
	gone := rt.gone
	rt.mu.Unlock()
	if !gone {
		rt.k.deletePodObject(rt.ns, rt.name, rt.uid)
	}
	os.RemoveAll(filepath.Join(rt.dir, "volumes"))
	rt.k.forget(rt.uid)
	rt.logf("removed")
}

// startSandbox allocates the pod IP and builds its network namespace.
func (rt *podRT) startSandbox() bool {
	if rt.hostNet {
		now := metav1.Now()
		rt.mu.Lock()
		rt.ip, rt.sandbox, rt.startTime = rt.k.hostIP, true, &now
		rt.mu.Unlock()
		rt.markDirty()
		return true
	}
	for {
		if rt.stopped() {
			return false
		}
		ip, err := rt.k.ipam.allocate(string(rt.uid))
		if err == nil {
			hostname := rt.name
			if h := rt.pod.Spec.Hostname; h != "" {
				hostname = h
			}
			err = rt.k.setupNetns(rt.netns, rt.hostVeth, ip, hostname, rt.ns)
			if err != nil {
				rt.k.ipam.release(ip)
			} else {
				now := metav1.Now()
				rt.mu.Lock()
				rt.ip, rt.sandbox, rt.startTime = ip, true, &now
				rt.mu.Unlock()
				rt.markDirty()
				return true
			}
		}
		rt.setWaiting("ContainerCreating", "sandbox: "+err.Error())
		rt.logf("sandbox: %v", err)
		if !rt.sleep(2 * time.Second) {
			return false
		}
	}
}

// prepare materialises the volumes, retrying while referenced objects are missing.
func (rt *podRT) prepare() bool {
	for {
		if rt.stopped() {
			return false
		}
		err := rt.materializeVolumes()
		if err == nil {
			return true
		}
		rt.setWaiting("CreateContainerConfigError", err.Error())
		if !rt.sleep(2 * time.Second) {
			return false
		}
	}
}

func (rt *podRT) setWaiting(reason, msg string) {
	rt.mu.Lock()
	for _, c := range append(append([]*ctr{}, rt.inits...), rt.ctrs...) {
		if c.state.Waiting != nil {
			c.state = waiting(reason, msg)
		}
	}
	rt.mu.Unlock()
	rt.markDirty()
}

// runInits runs the init containers one after the other; each must succeed.
func (rt *podRT) runInits() bool {
	for _, c := range rt.inits {
		for {
			if rt.stopped() {
				return false
			}
			code := rt.runOnce(c)
			if code == 0 {
				break
			}
			if rt.stopped() {
				return false
			}
			if rt.pod.Spec.RestartPolicy == v1.RestartPolicyNever {
				rt.mu.Lock()
				rt.phase, rt.reason = v1.PodFailed, "InitContainerFailed"
				rt.mu.Unlock()
				rt.finish()
				return false
			}
			rt.mu.Lock()
			c.restarts++
			c.last = c.state
			c.state = waiting("CrashLoopBackOff", "")
			n := c.restarts
			rt.mu.Unlock()
			rt.markDirty()
			if !rt.sleep(backoff(n)) {
				return false
			}
		}
	}
	rt.mu.Lock()
	rt.initDone = true
	rt.mu.Unlock()
	rt.markDirty()
	return true
}

func backoff(n int32) time.Duration {
	d := time.Second << uint(n-1)
	if n > 5 || d > 30*time.Second {
		d = 30 * time.Second
	}
	return d
}

// startContainers starts every app container under a supervisor goroutine.
func (rt *podRT) startContainers() {
	var wg sync.WaitGroup
	for _, c := range rt.ctrs {
		wg.Add(1)
		go func(c *ctr) { defer wg.Done(); rt.supervise(c) }(c)
	}
	go func() {
		wg.Wait()
		// All containers ended and none restarts: the pod is terminal.
		if rt.stopped() {
			return
		}
		rt.mu.Lock()
		rt.phase = v1.PodSucceeded
		for _, c := range rt.ctrs {
			if t := c.state.Terminated; t == nil || t.ExitCode != 0 {
				rt.phase = v1.PodFailed
			}
		}
		rt.mu.Unlock()
		rt.finish()
	}()
}

// finish tears down the sandbox of a pod that reached a terminal phase on its own.
func (rt *podRT) finish() {
	rt.logf("finished")
	rt.mu.Lock()
	rt.terminated = true
	rt.mu.Unlock()
	rt.teardownSandbox()
	rt.markDirty()
}

func (rt *podRT) teardownSandbox() {
	if rt.hostNet {
		return
	}
	rt.k.teardownNetns(rt.netns, rt.hostVeth)
	rt.k.ipam.release(rt.ip)
}

// supervise runs c, restarting it per the pod's restartPolicy, until the pod stops.
func (rt *podRT) supervise(c *ctr) {
	probeStop := make(chan struct{})
	defer close(probeStop)
	if c.spec.ReadinessProbe != nil {
		go rt.probeLoop(c, probeStop)
	}
	for {
		code := rt.runOnce(c)
		if rt.stopped() {
			return
		}
		policy := rt.pod.Spec.RestartPolicy
		if policy == v1.RestartPolicyNever || (policy == v1.RestartPolicyOnFailure && code == 0) {
			return
		}
		rt.mu.Lock()
		c.restarts++
		c.last = c.state
		c.state = waiting("CrashLoopBackOff", fmt.Sprintf("back-off restarting failed container %s", c.spec.Name))
		n := c.restarts
		rt.mu.Unlock()
		rt.markDirty()
		if !rt.sleep(backoff(n)) {
			return
		}
	}
}

// runOnce starts the container's process and waits for it; it returns the exit code.
func (rt *podRT) runOnce(c *ctr) int32 {
	cmd, err := rt.buildCmd(c)
	for err != nil {
		if _, permanent := err.(permanentError); permanent {
			break
		}
		// A missing Secret/ConfigMap: wait for it, as the kubelet does.
		rt.mu.Lock()
		c.state = waiting("CreateContainerConfigError", err.Error())
		rt.mu.Unlock()
		rt.markDirty()
		if !rt.sleep(2 * time.Second) {
			return 137
		}
		cmd, err = rt.buildCmd(c)
	}
	if err != nil {
		rt.logf("container %s: %v", c.spec.Name, err)
		now := metav1.Now()
		rt.mu.Lock()
		c.state = v1.ContainerState{Terminated: &v1.ContainerStateTerminated{ExitCode: 128, Reason: "StartError", Message: err.Error(), StartedAt: now, FinishedAt: now}}
		rt.mu.Unlock()
		rt.markDirty()
		return 128
	}
	rt.mu.Lock()
	if rt.stopping {
		rt.mu.Unlock()
		return 137
	}
	err = cmd.Start()
	if f, ok := cmd.Stdout.(*os.File); ok {
		f.Close() // the child has its own copy
	}
	start := metav1.Now()
	if err != nil {
		c.state = v1.ContainerState{Terminated: &v1.ContainerStateTerminated{ExitCode: 128, Reason: "StartError", Message: err.Error(), StartedAt: start, FinishedAt: start}}
		rt.mu.Unlock()
		rt.markDirty()
		return 128
	}
	c.cmd, c.pid, c.started = cmd, cmd.Process.Pid, true
	c.state = v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: start}}
	c.ready = c.spec.ReadinessProbe == nil && !c.init
	if rt.phase == v1.PodPending && !c.init {
		all := true
		for _, o := range rt.ctrs {
			all = all && o.started
		}
		if all {
			rt.phase = v1.PodRunning
		}
	}
	rt.mu.Unlock()
	rt.logf("container %s started, pid %d", c.spec.Name, cmd.Process.Pid)
	rt.markDirty()

	err = cmd.Wait()
	code := int32(0)
	reason := "Completed"
	if err != nil {
		reason = "Error"
		if ee, ok := err.(*exec.ExitError); ok {
			ws := ee.Sys().(syscall.WaitStatus)
			if ws.Signaled() {
				code = 128 + int32(ws.Signal())
			} else {
				code = int32(ws.ExitStatus())
			}
		} else {
			code = 128
		}
	}
	rt.mu.Lock()
	if rt.stopping && code != 0 {
		reason = "Error"
	}
	c.cmd, c.ready = nil, false
	c.state = v1.ContainerState{Terminated: &v1.ContainerStateTerminated{
		ExitCode: code, Reason: reason, StartedAt: start, FinishedAt: metav1.Now(),
		ContainerID: fmt.Sprintf("process://%d", c.pid),
	}}
	rt.mu.Unlock()
	rt.logf("container %s exited with %d", c.spec.Name, code)
	rt.markDirty()
	return code
}

// terminate stops all processes: SIGTERM to each container's process group, SIGKILL at the
// deadline, then the network namespace goes.
func (rt *podRT) terminate() {
	rt.mu.Lock()
	already := rt.terminated
	var pids []int
	for _, c := range append(append([]*ctr{}, rt.inits...), rt.ctrs...) {
		if c.cmd != nil {
			pids = append(pids, c.pid)
		}
	}
	rt.mu.Unlock()
	if already {
		return
	}
	for _, p := range pids {
		syscall.Kill(-p, syscall.SIGTERM)
	}
	for {
		rt.mu.Lock()
		alive := false
		for _, c := range append(append([]*ctr{}, rt.inits...), rt.ctrs...) {
			alive = alive || c.cmd != nil
		}
		dl := rt.deadline
		rt.mu.Unlock()
		if !alive {
			break
		}
		if time.Now().After(dl) {
			for _, p := range pids {
				syscall.Kill(-p, syscall.SIGKILL)
			}
			// Anything that left the process group is still in the network namespace.
			if !rt.hostNet {
				for _, p := range netnsPids(rt.netns) {
					syscall.Kill(p, syscall.SIGKILL)
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	rt.mu.Lock()
	rt.terminated = true
	for _, c := range append(append([]*ctr{}, rt.inits...), rt.ctrs...) {
		if c.state.Terminated == nil {
			reason := "Completed"
			if c.state.Waiting != nil && c.started {
				reason = "ContainerStatusUnknown"
			}
			c.state = v1.ContainerState{Terminated: &v1.ContainerStateTerminated{ExitCode: 0, Reason: reason, FinishedAt: metav1.Now()}}
		}
	}
	if rt.phase != v1.PodSucceeded && rt.phase != v1.PodFailed {
		rt.phase = v1.PodSucceeded
		for _, c := range rt.ctrs {
			if c.state.Terminated.ExitCode != 0 {
				rt.phase = v1.PodFailed
			}
		}
	}
	rt.mu.Unlock()
	rt.teardownSandbox()
}

// shutdown is used when the kubelet itself stops: kill the pod without deleting its object.
func (rt *podRT) shutdown(grace time.Duration) {
	rt.requestStop(grace, true)
	deadline := time.Now().Add(grace + 10*time.Second)
	for time.Now().Before(deadline) {
		rt.k.mu.Lock()
		_, still := rt.k.pods[rt.uid]
		rt.k.mu.Unlock()
		if !still {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// buildCmd prepares the process of container c: env, mounts, netns and log files.
func (rt *podRT) buildCmd(c *ctr) (*exec.Cmd, error) {
	env, err := rt.containerEnv(&c.spec)
	if err != nil {
		return nil, err
	}
	lookup := map[string]string{}
	for _, kv := range env {
		if i := strings.IndexByte(kv, '='); i > 0 {
			lookup[kv[:i]] = kv[i+1:]
		}
	}
	argv := append([]string{}, c.spec.Command...)
	argv = append(argv, c.spec.Args...)
	if len(argv) == 0 {
		return nil, permanentError{fmt.Errorf("no command: the process kubelet ignores images, so command or args must be set")}
	}
	for i := range argv {
		argv[i] = expand(argv[i], lookup)
	}
	mounts, err := rt.mountArgs(&c.spec)
	if err != nil {
		return nil, err
	}
	workdir := c.spec.WorkingDir
	if workdir == "" {
		workdir = filepath.Join(rt.dir, "work")
		if err := os.MkdirAll(workdir, 0o755); err != nil {
			return nil, err
		}
	} else if _, err := os.Stat(workdir); err != nil {
		if err := rt.k.ensureMountpoint(workdir, false); err != nil {
			return nil, err
		}
	}
	hostname := rt.name
	if h := rt.pod.Spec.Hostname; h != "" {
		hostname = h
	}
	args := []string{"ip", "netns", "exec", rt.netns, "unshare", "--uts"}
	if rt.hostNet {
		args = []string{"unshare", "--mount", "--propagation", "private", "--uts"}
	}
	args = append(args, "--", "/bin/sh", "-c", wrapper, "dgrs-wrap")
	args = append(args, mounts...)
	args = append(args, "--")
	args = append(args, argv...)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(env, "DGRS_POD_HOSTNAME="+hostname, "DGRS_POD_WORKDIR="+workdir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	logf, err := os.OpenFile(filepath.Join(rt.dir, c.spec.Name+".log"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	return cmd, nil
}

// permanentError is a container start failure that retrying cannot fix.
type permanentError struct{ error }

// expand replaces $(VAR) with its value when VAR is defined; $$ escapes a dollar sign.
func expand(s string, vars map[string]string) string {
	if !strings.Contains(s, "$") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '$' && i+1 < len(s) {
			if s[i+1] == '$' {
				b.WriteByte('$')
				i++
				continue
			}
			if s[i+1] == '(' {
				if j := strings.IndexByte(s[i+2:], ')'); j >= 0 {
					name := s[i+2 : i+2+j]
					if v, ok := vars[name]; ok {
						b.WriteString(v)
						i += 2 + j
						continue
					}
				}
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ---- status ------------------------------------------------------------------------------

// statusLoop writes the pod status whenever it changed, until quit (then once more).
func (rt *podRT) statusLoop(quit, done chan struct{}) {
	defer close(done)
	for {
		select {
		case <-rt.dirty:
			rt.pushStatus()
		case <-quit:
			select {
			case <-rt.dirty:
			default:
			}
			rt.pushStatus()
			return
		}
	}
}

func (rt *podRT) pushStatus() {
	if rt.k.stopping.Load() {
		return // the kubelet is going away: leave the pods as they were for the next one
	}
	pods := rt.k.cs.CoreV1().Pods(rt.ns)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := pods.Get(context.Background(), rt.name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cur.UID != rt.uid {
			return nil
		}
		cur.Status = rt.buildStatus(cur.Status)
		_, err = pods.UpdateStatus(context.Background(), cur, metav1.UpdateOptions{})
		return err
	})
	if err != nil && !apierrors.IsNotFound(err) {
		rt.logf("status: %v", err)
	}
}

func ctrStatus(c *ctr, podIP string) v1.ContainerStatus {
	started := c.state.Running != nil
	s := v1.ContainerStatus{
		Name: c.spec.Name, State: c.state, LastTerminationState: c.last, Ready: c.ready,
		RestartCount: c.restarts, Image: c.spec.Image, ImageID: "process://" + c.spec.Image,
		Started: &started,
	}
	if c.started {
		s.ContainerID = fmt.Sprintf("process://%d", c.pid)
	}
	return s
}

// buildStatus renders the runtime state into a PodStatus, keeping fields others own.
func (rt *podRT) buildStatus(old v1.PodStatus) v1.PodStatus {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	st := old
	st.Phase = rt.phase
	st.Reason, st.Message = rt.reason, rt.message
	st.HostIP = rt.k.hostIP
	st.HostIPs = []v1.HostIP{{IP: rt.k.hostIP}}
	if rt.ip != "" {
		st.PodIP = rt.ip
		st.PodIPs = []v1.PodIP{{IP: rt.ip}}
	}
	if rt.startTime != nil {
		st.StartTime = rt.startTime
	}
	st.InitContainerStatuses = nil
	for _, c := range rt.inits {
		st.InitContainerStatuses = append(st.InitContainerStatuses, ctrStatus(c, rt.ip))
	}
	st.ContainerStatuses = nil
	allReady := len(rt.ctrs) > 0
	for _, c := range rt.ctrs {
		st.ContainerStatuses = append(st.ContainerStatuses, ctrStatus(c, rt.ip))
		allReady = allReady && c.ready
	}
	if rt.terminated || rt.stopping {
		allReady = false
	}
	b := func(ok bool) v1.ConditionStatus {
		if ok {
			return v1.ConditionTrue
		}
		return v1.ConditionFalse
	}
	setCond(&st, v1.PodReadyToStartContainers, b(rt.sandbox && !rt.terminated))
	setCond(&st, v1.PodInitialized, b(rt.initDone || len(rt.inits) == 0))
	setCond(&st, v1.ContainersReady, b(allReady))
	setCond(&st, v1.PodReady, b(allReady))
	return st
}

func setCond(st *v1.PodStatus, t v1.PodConditionType, s v1.ConditionStatus) {
	for i := range st.Conditions {
		if st.Conditions[i].Type == t {
			if st.Conditions[i].Status != s {
				st.Conditions[i].Status = s
				st.Conditions[i].LastTransitionTime = metav1.Now()
			}
			return
		}
	}
	st.Conditions = append(st.Conditions, v1.PodCondition{Type: t, Status: s, LastTransitionTime: metav1.Now()})
}
