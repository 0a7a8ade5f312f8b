package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testpb "google.golang.org/grpc/interop/grpc_testing"

	"github.com/sidecar-proxy/sidecar/bench/procs"
	"github.com/sidecar-proxy/sidecar/test/grpcbackend/grpcclient"
)

// grpcBench measures gRPC through the sidecar (h2c in, protocol = "h2c"
// out) against the real grpc-go backend of the tests, directly and
// proxied in alternating runs: unary calls from 64 concurrent callers on
// one connection, and a 256 MiB bidirectional echo. It reports calls/s,
// MB/s and the sidecar's CPU per call. The client runs in this process
// (on CPU 1 with the backend); the sidecar alone on CPU 0.
func grpcBench(dir, sidecarBin string, runs int) {
	fmt.Printf("\n### gRPC: unary calls and a bidirectional stream, over h2c\n\n")
	bin, err := grpcclient.Build(dir)
	procs.Check(err)
	beAddr := procs.FreeAddr()
	be := start(bin, []string{"GOMAXPROCS=1"}, "1", "-addr", beAddr, "-max-msg-size", "4194304")
	defer procs.Stop(be)
	for i := 0; i < 100; i++ { // listening once a connection is taken
		if c, err := net.DialTimeout("tcp", beAddr, time.Second); err == nil {
			c.Close()
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	addr, sc := startH2C(dir, sidecarBin, "grpc", "url = \"http://"+beAddr+"\"\nprotocol = \"h2c\"\n")
	defer procs.Stop(sc)

	type row struct {
		unary, mbps []float64
		cpu         time.Duration
		calls       int
	}
	var direct, proxied row
	for r := 0; r <= runs; r++ { // run 0 warms up
		for _, t := range []struct {
			row    *row
			target string
		}{{&direct, beAddr}, {&proxied, addr}} {
			c0 := procs.CPU(sc.Process.Pid)
			calls, rate := unaryLoad(t.target, 20000)
			cpu := procs.CPU(sc.Process.Pid) - c0
			mbps := echoLoad(t.target, 256<<20)
			if r == 0 {
				continue
			}
			t.row.unary, t.row.mbps = append(t.row.unary, rate), append(t.row.mbps, mbps)
			if t.target == addr {
				t.row.cpu += cpu
				t.row.calls += calls
			}
		}
	}
	fmt.Printf("median of %d alternating runs; the client in the bench process\n\n", runs)
	fmt.Printf("| | direct | through the sidecar | sidecar/direct |\n|---|---|---|---|\n")
	du, pu := medianOf(direct.unary), medianOf(proxied.unary)
	dm, pm := medianOf(direct.mbps), medianOf(proxied.mbps)
	fmt.Printf("| unary calls/s (64 callers, 1 connection) | %.0f | %.0f | %.2f |\n", du, pu, pu/du)
	fmt.Printf("| bidirectional echo, MB/s each way | %.0f | %.0f | %.2f |\n", dm, pm, pm/dm)
	fmt.Printf("\nsidecar CPU per unary call: %.1f µs\n", float64(proxied.cpu.Microseconds())/float64(max(proxied.calls, 1)))
}

// unaryLoad makes n unary calls from 64 goroutines and returns the calls
// made and calls per second.
func unaryLoad(addr string, n int) (int, float64) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	procs.Check(err)
	defer conn.Close()
	c := testpb.NewTestServiceClient(conn)
	var wg sync.WaitGroup
	start := time.Now()
	per := n / 64
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range per {
				if _, err := c.UnaryCall(context.Background(), &testpb.SimpleRequest{}); err != nil {
					fmt.Fprintln(os.Stderr, "unary call:", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	return per * 64, float64(per*64) / time.Since(start).Seconds()
}

// echoLoad streams total bytes both ways and returns MB/s each way.
func echoLoad(addr string, total int64) float64 {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	procs.Check(err)
	defer conn.Close()
	res, err := grpcclient.Echo(context.Background(), testpb.NewTestServiceClient(conn), total, 64<<10)
	procs.Check(err)
	return float64(res.Received) / 1e6 / res.Elapsed.Seconds()
}

func medianOf(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}
