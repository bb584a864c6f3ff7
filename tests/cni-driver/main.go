// cni-driver: a minimal container runtime's CNI side, built on libcni (Debian's
// golang-github-appc-cni-dev), so tests and the demo run plugins exactly as a real
// runtime would: chained execution, prevResult handling, result cache, CHECK/DEL.
//
// Usage: cni-driver add|check|del <conflist file> <container id> <netns path> <ifname> [CNI_ARGS]
// Environment: CNI_PATH (plugin dirs, ':'-separated), CNI_CACHE_DIR.
// add prints the final result JSON on stdout; failures print the CNI error on stderr
// as JSON ({"code":N,"msg":...}) and exit 1.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

func fail(err error) {
	// libcni wraps plugin errors ("plugin type=... failed (add): %w"); keep the code.
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		out, _ := json.Marshal(map[string]interface{}{"code": cniErr.Code, "msg": err.Error(), "details": cniErr.Details})
		fmt.Fprintln(os.Stderr, string(out))
	} else {
		out, _ := json.Marshal(map[string]interface{}{"code": 0, "msg": err.Error()})
		fmt.Fprintln(os.Stderr, string(out))
	}
	os.Exit(1)
}

func main() {
	if len(os.Args) < 6 {
		fmt.Fprintln(os.Stderr, "usage: cni-driver add|check|del <conflist> <container id> <netns> <ifname> [CNI_ARGS]")
		os.Exit(2)
	}
	command, confPath, containerID, netns, ifname := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5]
	list, err := libcni.ConfListFromFile(confPath)
	if err != nil {
		fail(err)
	}
	rt := &libcni.RuntimeConf{ContainerID: containerID, NetNS: netns, IfName: ifname}
	if len(os.Args) > 6 && os.Args[6] != "" {
		for _, kv := range strings.Split(os.Args[6], ";") {
			if parts := strings.SplitN(kv, "=", 2); len(parts) == 2 {
				rt.Args = append(rt.Args, [2]string{parts[0], parts[1]})
			}
		}
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)
	ctx := context.Background()
	switch command {
	case "add":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		out, err := json.Marshal(res)
		if err != nil {
			fail(err)
		}
		fmt.Println(string(out))
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown command", command)
		os.Exit(2)
	}
}
