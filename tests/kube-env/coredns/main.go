// Command coredns is CoreDNS with only the plugins the test cluster's DNS needs: answers for
// Services and pods from the Kubernetes API (`kubernetes`), plus `errors`, `log`, `health`,
// `ready`, `bind` and `loadbalance`. The stock build links every plugin (cloud DNS providers
// included), which takes far longer to compile and serves nothing here.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
