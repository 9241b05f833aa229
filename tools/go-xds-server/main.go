// go-xds-server: the usual choice for an xDS server in Go, for a side-by-side
// benchmark with cloudmap-xds (benches/load.rs). It serves the same MCP
// resources for the same type URLs over ADS, through go-control-plane's
// state-of-the-world snapshot cache and its stock gRPC server.
//
//	go-xds-server -addr 127.0.0.1:PORT -snapshots DIR -count N
//
// DIR holds snap-0.pb .. snap-(N-1).pb, each a serialized
// envoy.service.discovery.v3.DiscoveryResponse whose resources are the
// ServiceEntry set (Any{istio.mcp.v1alpha1.Resource}) and whose version_info is
// its version. All are decoded before serving, so a publication costs only what
// the cache and server do. Commands on standard input, one per line:
//
//	publish K   sets snapshot K for every node; prints "published UNIX_NANOS"
//
// It prints "ready" once listening with snapshot 0 set.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	mcp "istio.io/api/mcp/v1alpha1"
)

// emptyVersion is the version of every type that has no resources.
const emptyVersion = "empty"

// serviceEntryTypes are the type URLs istiod asks ServiceEntries under.
var serviceEntryTypes = map[string]bool{
	"networking.istio.io/v1/ServiceEntry":       true,
	"networking.istio.io/v1beta1/ServiceEntry":  true,
	"networking.istio.io/v1alpha3/ServiceEntry": true,
}

// mcpSnapshot is a cache.ResourceSnapshot for arbitrary type URLs: the stock
// cache.Snapshot only knows Envoy's own types and refuses Istio's.
type mcpSnapshot struct {
	version   string
	resources map[string]types.ResourceWithTTL
	plain     map[string]types.Resource
}

func (s *mcpSnapshot) GetVersion(typeURL string) string {
	if serviceEntryTypes[typeURL] {
		return s.version
	}
	return emptyVersion
}

func (s *mcpSnapshot) GetResourcesAndTTL(typeURL string) map[string]types.ResourceWithTTL {
	if serviceEntryTypes[typeURL] {
		return s.resources
	}
	return map[string]types.ResourceWithTTL{}
}

func (s *mcpSnapshot) GetResources(typeURL string) map[string]types.Resource {
	if serviceEntryTypes[typeURL] {
		return s.plain
	}
	return map[string]types.Resource{}
}

func (s *mcpSnapshot) ConstructVersionMap() error { return nil }

func (s *mcpSnapshot) GetVersionMap(string) map[string]string { return nil }

func load(path string) (*mcpSnapshot, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var response discovery.DiscoveryResponse
	if err := proto.Unmarshal(raw, &response); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s := &mcpSnapshot{
		version:   response.GetVersionInfo(),
		resources: make(map[string]types.ResourceWithTTL, len(response.GetResources())),
		plain:     make(map[string]types.Resource, len(response.GetResources())),
	}
	for _, any := range response.GetResources() {
		var r mcp.Resource
		if err := proto.Unmarshal(any.GetValue(), &r); err != nil {
			return nil, fmt.Errorf("%s: resource: %w", path, err)
		}
		name := r.GetMetadata().GetName()
		s.resources[name] = types.ResourceWithTTL{Resource: &r}
		s.plain[name] = &r
	}
	return s, nil
}

// oneGroup puts every node in one group, so one SetSnapshot reaches every stream.
type oneGroup struct{}

func (oneGroup) ID(*core.Node) string { return "all" }

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	dir := flag.String("snapshots", "", "directory of snap-K.pb files")
	count := flag.Int("count", 1, "number of snapshots")
	flag.Parse()

	snapshots := make([]*mcpSnapshot, *count)
	for k := range snapshots {
		s, err := load(filepath.Join(*dir, fmt.Sprintf("snap-%d.pb", k)))
		if err != nil {
			log.Fatal(err)
		}
		snapshots[k] = s
	}

	ctx := context.Background()
	snapshotCache := cache.NewSnapshotCache(true, oneGroup{}, nil)
	if err := snapshotCache.SetSnapshot(ctx, "all", snapshots[0]); err != nil {
		log.Fatal(err)
	}
	grpcServer := grpc.NewServer(grpc.MaxSendMsgSize(1 << 30))
	discovery.RegisterAggregatedDiscoveryServiceServer(grpcServer, server.NewServer(ctx, snapshotCache, nil))
	listener, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		if err := grpcServer.Serve(listener); err != nil {
			log.Fatal(err)
		}
	}()
	fmt.Printf("ready %s\n", listener.Addr())

	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		fields := strings.Fields(lines.Text())
		if len(fields) != 2 || fields[0] != "publish" {
			log.Fatalf("unknown command %q", lines.Text())
		}
		k, err := strconv.Atoi(fields[1])
		if err != nil || k < 0 || k >= len(snapshots) {
			log.Fatalf("no snapshot %q", fields[1])
		}
		published := time.Now().UnixNano()
		if err := snapshotCache.SetSnapshot(ctx, "all", snapshots[k]); err != nil {
			log.Fatal(err)
		}
		fmt.Printf("published %d\n", published)
	}
}
