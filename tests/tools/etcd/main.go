// The etcd server for the test control plane (docs/design.md §8), built from the
// go.etcd.io/etcd/server/v3 module because no release download is reachable.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
