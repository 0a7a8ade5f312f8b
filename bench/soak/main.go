// Command soak is `make soak`: 2 million requests from 1 million distinct
// clients through the sidecar, once with the memory store and once with
// Redis, printing a table of what the process held after the warm-up, at
// half time and at the end. It checks that memory levels off (no more than
// 10 % RSS growth over the second half) and that goroutines, open file
// descriptors and the /metrics series count come back to their post-warm-up
// values; it exits non-zero when one of those does not hold.
//
// The warm-up runs for 65 s of traffic first: the circuit breaker
// (hystrix-go) holds the last 60 s of request durations, so that is how long
// memory takes to level off at a given request rate.
//
// Clients are told apart by X-Forwarded-For from a trusted load generator
// on 127.0.0.1, so every request is a rate-limit decision for a key the
// store may not have seen: the worst case for the limiter's memory.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/bench/procs"
)

func main() { os.Exit(soakAll()) }

// soakAll returns the exit code; it returns rather than exits so that
// every process it started is stopped by its deferred stop.
func soakAll() int {
	requests := flag.Int("requests", 2_000_000, "requests per store")
	clients := flag.Int("clients", 1_000_000, "distinct clients")
	conns := flag.Int("c", 32, "concurrent connections")
	stores := flag.String("stores", "memory,redis", "stores to soak, comma-separated")
	flag.StringVar(&heapProfiles, "heap-profiles", "", "directory to save each store's heap profile in at the end (go tool pprof)")
	flag.Parse()

	dir, err := os.MkdirTemp("", "sidecar-soak-")
	procs.Check(err)
	defer os.RemoveAll(dir)
	sidecarBin, backendBin := filepath.Join(dir, "sidecar"), filepath.Join(dir, "backend")
	procs.Run("go", "build", "-o", sidecarBin, ".")
	procs.Run("go", "build", "-o", backendBin, "./bench/backend")
	backendAddr := procs.FreeAddr()
	backend := start(backendBin, "-addr", backendAddr, "-kind", "fasthttp")
	defer procs.Stop(backend)
	procs.WaitHTTP("http://" + backendAddr + "/small")

	fmt.Printf("soak: %d requests from %d distinct clients per store, %d connections\n\n", *requests, *clients, *conns)
	fmt.Println("| store | req/s | 5xx / errors | RSS warm-up → half → end (MiB) | RSS growth, 2nd half | goroutines warm-up → end | open fds warm-up → end | series warm-up → end | limiter keys at end | result |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|")
	failed := false
	for _, store := range strings.Split(*stores, ",") {
		if !soak(dir, sidecarBin, backendAddr, store, *requests, *clients, *conns) {
			failed = true
		}
	}
	if failed {
		fmt.Println("\nsoak FAILED: see the rows marked failed")
		return 1
	}
	return 0
}

var heapProfiles string

type snapshot struct {
	rssKB              int64
	goroutines, series int
	fds                int
	keys               float64
}

func soak(dir, sidecarBin, backendAddr, store string, requests, clients, conns int) bool {
	extra := ""
	switch store {
	case "memory":
	case "redis":
		redisAddr := procs.FreeAddr()
		_, port, _ := net.SplitHostPort(redisAddr)
		rs := start("redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning")
		defer procs.Stop(rs)
		time.Sleep(300 * time.Millisecond)
		extra = fmt.Sprintf("[rate_limit]\nstore = \"redis\"\n[redis]\naddrs = [%q]\n", redisAddr)
	default:
		fmt.Fprintf(os.Stderr, "soak: -stores: unknown store %q (memory, redis)\n", store)
		return false
	}
	addr, admin := procs.FreeAddr(), procs.FreeAddr()
	cfg := filepath.Join(dir, "soak-"+store+".toml")
	// A 10 s window keeps Redis' live keys (one per client seen in the
	// window) at a few hundred thousand; every request is under its limit.
	procs.Check(os.WriteFile(cfg, fmt.Appendf(nil, `[server]
listen = %q
admin_listen = %q
trusted_proxies = ["127.0.0.1/32"]
admin_pprof = true
[tiers.anonymous]
limit = 1000
window = "10s"
[upstreams.bench]
url = "http://%s"
[[routes]]
name = "bench"
upstream = "bench"
%s`, addr, admin, backendAddr, extra), 0o600))
	sc := start(sidecarBin, "-config", cfg, "-log-level", "warn")
	defer procs.Stop(sc)
	procs.WaitHTTP("http://" + admin + "/readyz")

	client := &fasthttp.HostClient{Addr: addr, MaxConns: conns, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second}
	var next atomic.Int64
	var bad atomic.Int64
	var firstBad atomic.Pointer[string]
	// load sends n requests, client ids continuing from where the last
	// call stopped, so that every client makes requests/clients requests.
	load := func(n int) time.Duration {
		begin := time.Now()
		end := next.Load() + int64(n)
		var wg sync.WaitGroup
		for w := 0; w < conns; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
				defer fasthttp.ReleaseRequest(req)
				defer fasthttp.ReleaseResponse(resp)
				var xff []byte
				for {
					i := next.Add(1) - 1
					if i >= end {
						return
					}
					c := int(i) % clients
					xff = fmt.Appendf(xff[:0], "10.%d.%d.%d", c>>16&255, c>>8&255, c&255)
					req.Reset()
					req.SetRequestURI("http://bench/small")
					req.Header.SetBytesV("X-Forwarded-For", xff)
					err := client.Do(req, resp)
					if err != nil || resp.StatusCode() != 200 {
						if bad.Add(1) == 1 {
							s := fmt.Sprintf("%v %d %q", err, resp.StatusCode(), resp.Body())
							firstBad.Store(&s)
						}
					}
				}
			}()
		}
		wg.Wait()
		return time.Since(begin)
	}
	take := func() snapshot {
		m := procs.Scrape(admin)
		return snapshot{rssKB: procs.StatusKB(sc.Process.Pid, "VmRSS"), goroutines: int(m["go_goroutines"]), fds: procs.OpenFDs(sc.Process.Pid),
			series: len(m), keys: m["sidecar_ratelimit_memory_keys"]}
	}
	settle := func(want snapshot) snapshot {
		// Idle keep-alive connections close and fasthttp's idle workers
		// exit (up to 2 × 10 s) before the counts are compared.
		client.CloseIdleConnections()
		deadline := time.Now().Add(30 * time.Second)
		for {
			s := take()
			if (s.goroutines <= want.goroutines+2 && s.fds <= want.fds+2 && s.series <= want.series) || time.Now().After(deadline) {
				return s
			}
			time.Sleep(500 * time.Millisecond)
		}
	}

	// Warm-up: hystrix-go keeps every request's duration for 60 s (its
	// rolling Timing, ~16 B per request: memory that follows the request
	// rate), so memory cannot level off before a minute of traffic.
	for begin := time.Now(); time.Since(begin) < 65*time.Second; {
		load(50_000)
	}
	warmed := settle(snapshot{goroutines: 1 << 30, fds: 1 << 30, series: 1 << 30})
	half := requests / 2
	var took time.Duration
	took += load(half)
	mid := take()
	// The rest, in slices, sampling the peak RSS of the second half.
	peak := mid.rssKB
	for sent := 0; sent < requests-half; {
		n := min(100_000, requests-half-sent)
		took += load(n)
		sent += n
		peak = max(peak, procs.StatusKB(sc.Process.Pid, "VmRSS"))
	}
	end := take()
	peak = max(peak, end.rssKB)
	if heapProfiles != "" {
		code, body, err := fasthttp.Get(nil, "http://"+admin+"/debug/pprof/heap")
		if err == nil && code == 200 {
			procs.Check(os.WriteFile(filepath.Join(heapProfiles, "heap-"+store+".pprof"), body, 0o644))
		}
	}
	after := settle(warmed)

	growth := float64(peak-mid.rssKB) / float64(mid.rssKB)
	ok := growth <= 0.10 && bad.Load() == 0 && after.goroutines <= warmed.goroutines+2 &&
		after.fds <= warmed.fds+2 && after.series <= warmed.series
	result := "ok"
	if !ok {
		result = "FAILED"
	}
	keys := "-"
	if store == "memory" {
		keys = fmt.Sprintf("%.0f (cap 200,000)", end.keys)
	}
	mib := func(kb int64) string { return fmt.Sprintf("%.1f", float64(kb)/1024) }
	fmt.Printf("| %s | %.0f | %d | %s → %s → %s | %+.1f %% (≤ 10 %%) | %d → %d | %d → %d | %d → %d | %s | %s |\n",
		store, float64(requests)/took.Seconds(), bad.Load(), mib(warmed.rssKB), mib(mid.rssKB), mib(end.rssKB), 100*growth,
		warmed.goroutines, after.goroutines, warmed.fds, after.fds, warmed.series, after.series, keys, result)
	if p := firstBad.Load(); p != nil {
		fmt.Printf("  first failed request: %s\n", *p)
	}
	return ok
}

func start(bin string, args ...string) *exec.Cmd {
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	procs.Check(cmd.Start())
	return cmd
}
