// etcd for the test harness's Kubernetes API server (tests/scripts/k8s.sh): etcd's
// own server main, built from its Go module so no system package is needed.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
