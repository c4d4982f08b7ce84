// Command pause is the process of every pod sandbox in the test cluster (containerd's
// `sandbox` image): it holds the pod's namespaces, reaps children reparented to it, and exits
// on SIGINT or SIGTERM. Written here because the usual image comes from a registry this
// machine cannot reach.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
