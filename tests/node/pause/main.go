// The pod sandbox's ("pause") process for tests/node: it holds the pod's namespaces and
// waits until containerd stops it. Built static, so its image needs nothing else.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
