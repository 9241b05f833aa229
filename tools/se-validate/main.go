// se-validate checks ServiceEntries exactly as istiod does when they arrive over an
// MCP-over-xDS config source: it converts each resource the way pkg/adsc does
// (handleMCP + mcpToPilot) and hands it to the in-memory config store istiod creates
// for that source (pilot/pkg/config/memory, validation on), whose Create runs the
// ServiceEntry schema's ValidateConfig (pkg/config/validation ValidateServiceEntry
// wrapped in the metadata checks). Only errors reject; warnings are counted.
//
// Input (stdin, or the file named by -in): a stream of frames, each a protobuf
// varint length followed by that many bytes of one google.protobuf.Any exactly as
// it goes into DiscoveryResponse.resources (type.googleapis.com/istio.mcp.v1alpha1.Resource
// wrapping the ServiceEntry body). A zero-length frame ends a batch; end of input
// ends the last one. Each batch gets a fresh store, as one istiod would hold one
// response's resources.
//
// Output (stdout), one JSON object per line:
//
//	{"rejection":{"batch":0,"index":3,"name":"istio-system/x","check":"istiod","error":"..."}}
//	{"batch":{"batch":0,"resources":12,"accepted":11,"rejected":1,"warnings":2}}   after every batch
//	{"summary":{"batches":1,"resources":12,"accepted":11,"rejected":1,"warnings":2}} at the end
//
// The exit code is 0 whatever was rejected (the caller decides); non-zero only when
// the input cannot be read as frames.
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	mcp "istio.io/api/mcp/v1alpha1"
	"istio.io/istio/pilot/pkg/config/memory"
	"istio.io/istio/pkg/config"
	"istio.io/istio/pkg/config/schema/collections"
	kubevalidation "k8s.io/apimachinery/pkg/util/validation"
)

// maxFrame bounds one resource; far above any ServiceEntry we emit.
const maxFrame = 64 << 20

type rejection struct {
	Batch int    `json:"batch"`
	Index int    `json:"index"`
	Name  string `json:"name"`
	Check string `json:"check"`
	Error string `json:"error"`
}

type counts struct {
	Batch     *int `json:"batch,omitempty"`
	Batches   *int `json:"batches,omitempty"`
	Resources int  `json:"resources"`
	Accepted  int  `json:"accepted"`
	Rejected  int  `json:"rejected"`
	Warnings  int  `json:"warnings"`
}

func main() {
	in := flag.String("in", "-", "input file of length-delimited Any frames; - for stdin")
	typeURL := flag.String("type-url", "networking.istio.io/v1/ServiceEntry",
		"the ADS type URL the resources are served under (istiod derives the store kind from it)")
	kubeNames := flag.Bool("kube-names", true,
		"also reject a metadata name that is not a Kubernetes DNS-1123 subdomain (check \"kube-name\"); "+
			"istiod's MCP store does not check names, our translation promises it")
	flag.Parse()

	gvk, err := kindOf(*typeURL)
	if err != nil {
		fatal(err)
	}
	var r io.Reader = os.Stdin
	if *in != "-" {
		f, err := os.Open(*in)
		if err != nil {
			fatal(err)
		}
		defer f.Close()
		r = f
	}
	v := validator{gvk: gvk, kubeNames: *kubeNames, out: bufio.NewWriter(os.Stdout)}
	if err := v.run(bufio.NewReaderSize(r, 1<<20)); err != nil {
		v.out.Flush()
		fatal(err)
	}
	v.out.Flush()
}

// kindOf is adsc's convertTypeURLToMCPGVK: group/version/kind, known to collections.Pilot.
func kindOf(typeURL string) (config.GroupVersionKind, error) {
	parts := strings.SplitN(typeURL, "/", 3)
	if len(parts) != 3 {
		return config.GroupVersionKind{}, fmt.Errorf("type URL %q is not group/version/kind", typeURL)
	}
	gvk := config.GroupVersionKind{Group: parts[0], Version: parts[1], Kind: parts[2]}
	if _, ok := collections.Pilot.FindByGroupVersionKind(gvk); !ok {
		return gvk, fmt.Errorf("type URL %q is not a Pilot kind: istiod would not store it", typeURL)
	}
	return gvk, nil
}

type validator struct {
	gvk       config.GroupVersionKind
	kubeNames bool
	out       *bufio.Writer
	total     counts
	batches   int
}

func (v *validator) run(r *bufio.Reader) error {
	store := memory.Make(collections.Pilot)
	batch := counts{}
	index := 0
	endBatch := func() {
		n := v.batches
		batch.Batch = &n
		v.emit(map[string]any{"batch": batch})
		v.out.Flush() // a caller streaming batches waits for this line
		v.total.Resources += batch.Resources
		v.total.Accepted += batch.Accepted
		v.total.Rejected += batch.Rejected
		v.total.Warnings += batch.Warnings
		v.batches++
		store = memory.Make(collections.Pilot)
		batch = counts{}
		index = 0
	}
	for {
		frame, err := readFrame(r)
		if errors.Is(err, io.EOF) {
			if batch.Resources > 0 || v.batches == 0 {
				endBatch()
			}
			break
		}
		if err != nil {
			return err
		}
		if len(frame) == 0 {
			endBatch()
			continue
		}
		batch.Resources++
		name, check, warn, err := v.check(store, frame)
		if warn != nil {
			batch.Warnings++
		}
		if err != nil {
			batch.Rejected++
			v.emit(map[string]any{"rejection": rejection{
				Batch: v.batches, Index: index, Name: name, Check: check, Error: err.Error(),
			}})
		} else {
			batch.Accepted++
		}
		index++
	}
	n := v.batches
	v.total.Batches = &n
	v.emit(map[string]any{"summary": v.total})
	return nil
}

// check follows adsc.handleMCP for one resource, then the store's Create.
func (v *validator) check(store interface {
	Create(config.Config) (string, error)
	Get(config.GroupVersionKind, string, string) *config.Config
}, frame []byte,
) (name, check string, warning error, err error) {
	rsc := &anypb.Any{}
	if err := proto.Unmarshal(frame, rsc); err != nil {
		return "", "decode", nil, fmt.Errorf("frame is not a google.protobuf.Any: %v", err)
	}
	m := &mcp.Resource{}
	if err := rsc.UnmarshalTo(m); err != nil {
		// istiod: "Error unmarshalling received MCP config", resource dropped.
		return "", "adsc", nil, fmt.Errorf("unmarshalling MCP resource: %v", err)
	}
	cfg, err := mcpToPilot(m)
	if m.Metadata != nil {
		name = m.Metadata.Name
	}
	if err != nil {
		// istiod: "Invalid data", resource dropped.
		return name, "adsc", nil, err
	}
	cfg.GroupVersionKind = v.gvk
	if v.kubeNames {
		if problems := kubevalidation.IsDNS1123Subdomain(cfg.Name); len(problems) > 0 {
			return name, "kube-name", nil, fmt.Errorf("name %q: %s", cfg.Name, strings.Join(problems, "; "))
		}
	}
	if store.Get(cfg.GroupVersionKind, cfg.Name, cfg.Namespace) != nil {
		// istiod would Update the first one with the second: one of them is lost.
		return name, "duplicate", nil, fmt.Errorf("%s appears twice in one response", name)
	}
	// The store's Create validates and would reject; run the schema's ValidateConfig
	// first only to learn about warnings, which Create discards.
	if schema, ok := collections.Pilot.FindByGroupVersionKind(cfg.GroupVersionKind); ok {
		warning, _ = schema.ValidateConfig(*cfg)
	}
	if _, err := store.Create(*cfg); err != nil {
		return name, "istiod", warning, err
	}
	return name, "", warning, nil
}

// mcpToPilot is pkg/adsc's conversion (its revision filter passes every resource
// without an istio.io/rev label, and we send none).
func mcpToPilot(m *mcp.Resource) (*config.Config, error) {
	if m == nil || m.Metadata == nil {
		return nil, errors.New("resource has no metadata (istiod stores an empty config)")
	}
	c := &config.Config{
		Meta: config.Meta{
			ResourceVersion: m.Metadata.Version,
			Labels:          m.Metadata.Labels,
			Annotations:     m.Metadata.Annotations,
		},
	}
	if c.Meta.Annotations == nil {
		c.Meta.Annotations = make(map[string]string)
	}
	nsn := strings.Split(m.Metadata.Name, "/")
	if len(nsn) != 2 {
		return nil, fmt.Errorf("invalid name %s", m.Metadata.Name)
	}
	c.Namespace = nsn[0]
	c.Name = nsn[1]
	c.CreationTimestamp = m.Metadata.CreateTime.AsTime()
	pb, err := m.Body.UnmarshalNew()
	if err != nil {
		return nil, err
	}
	c.Spec = pb
	return c, nil
}

func readFrame(r *bufio.Reader) ([]byte, error) {
	n, err := binary.ReadUvarint(r)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("reading frame length: %v", err)
	}
	if n > maxFrame {
		return nil, fmt.Errorf("frame of %d bytes exceeds %d", n, maxFrame)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, fmt.Errorf("reading a %d-byte frame: %v", n, err)
	}
	return buf, nil
}

func (v *validator) emit(line any) {
	b, err := json.Marshal(line)
	if err != nil {
		fatal(err)
	}
	v.out.Write(b)
	v.out.WriteByte('\n')
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "se-validate: %v\n", err)
	os.Exit(2)
}
