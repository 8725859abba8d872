// kube-apiserver for the test harness (tests/scripts/k8s.sh), built from the
// k8s.io/kubernetes module. go.mod maps every staging module (k8s.io/api, ...) to its
// published v0.X.Y matching kubernetes v1.X.Y, as kubernetes' own go.mod maps them to
// ./staging and replace directives of a dependency do not apply.
package main

import (
	"os"

	_ "k8s.io/component-base/logs/json/register" // as cmd/kube-apiserver does
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/component-base/cli"

	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	command := app.NewAPIServerCommand()
	code := cli.Run(command)
	os.Exit(code)
}
