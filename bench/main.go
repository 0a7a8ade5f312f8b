// Command bench is `make bench`: it measures, in one run, the bench backend
// directly and through the sidecar with wrk, and prints requests/s, p50,
// p99, the sidecar/direct throughput ratio and the sidecar's peak RSS.
//
// Placement: the sidecar runs alone on CPU 0 (GOMAXPROCS=1); the backend
// and wrk share CPU 1. Direct and proxied runs alternate, three of each per
// scenario, and medians are reported, because this machine is shared and
// noisy: only ratios measured side by side mean anything.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sidecar-proxy/sidecar/bench/procs"
)

type scenario struct {
	name, path, script string
	target             float64 // sidecar/direct throughput the issue asks for; 0: report only
}

type sample struct {
	rps, p50, p99 float64
	requests      float64       // completed in the run
	wrkCPU        time.Duration // processor time wrk itself used
	// Set by callers that meter the run (cpuBench): the proxy's processor
	// time per request in µs; the share of wrk's measured time the proxy
	// kept its core busy, and the backend and wrk core 1, in %; the share
	// of the run's wall time core 0 ran anything else (other processes,
	// interrupts, time stolen by the hypervisor), in %.
	proxyUs, proxyBusy, core1Busy, core0Other float64
}

func main() {
	dur := flag.Duration("d", 5*time.Second, "duration of each wrk run")
	runs := flag.Int("runs", 3, "runs per scenario and target (median reported)")
	conns := flag.Int("c", 32, "wrk connections")
	kind := flag.String("backend", "nethttp", "bench backend: nethttp (a typical Go app) or fasthttp (twice as fast)")
	onlyLimits := flag.Bool("only-limits", false, "run only the configuration table (rate limits, breaker, everything on) and streaming")
	flag.StringVar(&profileDir, "profiles", "", "directory for CPU and allocation profiles of each configuration (go tool pprof)")
	onlyStream := flag.Bool("only-stream", false, "run only the 1 GiB streaming table")
	onlyH2 := flag.Bool("only-h2", false, "run only the HTTP/2 table")
	onlyOverload := flag.Bool("only-overload", false, "run only the overload scenario (issue 16)")
	onlyProfile := flag.Bool("only-profile", false, "run only the CPU profile table of docs/PERFORMANCE.md (kept in -profiles, else a temporary directory)")
	onlyCPU := flag.Bool("only-cpu", false, "run only the CPU-per-request table against NGINX and HAProxy (issue 17)")
	cpuDur := flag.Duration("cpu-d", 3*time.Second, "duration of each wrk run of the CPU-per-request table")
	svg := flag.String("svg", "docs/bench.svg", "where to write the chart of throughput and p99 per configuration (empty: none)")
	flag.Parse()

	dir, err := os.MkdirTemp("", "sidecar-bench-")
	procs.Check(err)
	defer os.RemoveAll(dir)
	sidecarBin, backendBin, bareBin := filepath.Join(dir, "sidecar"), filepath.Join(dir, "backend"), filepath.Join(dir, "bare")
	procs.Run("go", "build", "-o", sidecarBin, ".")
	procs.Run("go", "build", "-o", backendBin, "./bench/backend")
	procs.Run("go", "build", "-o", bareBin, "./bench/bare")
	if *onlyProfile {
		pdir := dir
		if profileDir != "" {
			procs.Check(os.MkdirAll(profileDir, 0o755))
			pdir = profileDir
		}
		profileBench(pdir, sidecarBin, backendBin, bareBin)
		return
	}
	if *onlyOverload {
		if !overloadBench(dir, sidecarBin) {
			fmt.Println("\nsome overload targets were missed in this run")
		}
		return
	}
	if *onlyCPU {
		if !cpuBench(dir, sidecarBin, backendBin, bareBin, *cpuDur, *runs) {
			fmt.Println("\nsome CPU-per-request targets were missed in this run")
		}
		return
	}

	backendAddr, proxyAddr, adminAddr, bareAddr, bareHAddr := procs.FreeAddr(), procs.FreeAddr(), procs.FreeAddr(), procs.FreeAddr(), procs.FreeAddr()
	backend := start(backendBin, []string{"GOMAXPROCS=1"}, "1", "-addr", backendAddr, "-kind", *kind)
	defer procs.Stop(backend)
	procs.WaitHTTP("http://" + backendAddr + "/small")
	bare := start(bareBin, []string{"GOMAXPROCS=1"}, "0", "-addr", bareAddr, "-upstream", backendAddr)
	defer procs.Stop(bare)
	procs.WaitHTTP("http://" + bareAddr + "/small")
	bareH := start(bareBin, []string{"GOMAXPROCS=1"}, "0", "-addr", bareHAddr, "-upstream", backendAddr, "-headers")
	defer procs.Stop(bareH)
	procs.WaitHTTP("http://" + bareHAddr + "/small")

	// NGINX, when installed, as the reference proxy everyone knows: one
	// worker on CPU 0, keep-alive upstream connections, default buffering.
	nginxAddr, _, stopNginx := startNginx(dir, "nginx", backendAddr, "")
	defer stopNginx()

	cfg := filepath.Join(dir, "sidecar.toml")
	procs.Check(os.WriteFile(cfg, fmt.Appendf(nil, `[server]
listen = %q
admin_listen = %q
max_body_bytes = 0
[upstreams.bench]
url = "http://%s"
[[routes]]
name = "bench"
upstream = "bench"
`, proxyAddr, adminAddr, backendAddr), 0o600))
	sidecar := start(sidecarBin, []string{"GOMAXPROCS=1"}, "0", "-config", cfg, "-log-level", "warn")
	defer procs.Stop(sidecar)
	procs.WaitHTTP("http://" + adminAddr + "/readyz")

	post := filepath.Join(dir, "post.lua")
	procs.Check(os.WriteFile(post, []byte(`wrk.method = "POST"
wrk.body = string.rep("a", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
`), 0o600))

	scenarios := []scenario{
		{"small GET (13 B)", "/small", "", 0.85},
		{"64 KiB GET", "/64k", "", 0.90},
		{"1 MiB POST echo", "/echo", post, 0},
	}
	fmt.Printf("sidecar (and the bare reference forwarder) on CPU 0, GOMAXPROCS=1; %s backend and wrk on CPU 1;\nwrk -t1 -c%d -d%s; median of %d alternating runs\n\n",
		*kind, *conns, *dur, *runs)
	fmt.Printf("| scenario | direct req/s | sidecar req/s | sidecar/direct | target | bare fasthttp/direct | bare + the sidecar's 6 upstream headers/direct | nginx/direct | direct p50 / p99 | sidecar p50 / p99 | core 1 busy: direct / sidecar / bare / bare + headers / nginx |\n")
	fmt.Printf("|---|---|---|---|---|---|---|---|---|---|---|\n")
	failed := false
	if *onlyLimits || *onlyStream || *onlyH2 {
		scenarios = nil
	}
	for _, sc := range scenarios {
		var direct, proxied, bared, bareHed, nginxed []sample
		// Core 1's load per target; NGINX's worker is a child of the
		// process started, so only core 1 is metered for it.
		meters := []*cpuMeter{{backendPid: backend.Process.Pid}, {backendPid: backend.Process.Pid, proxyPid: sidecar.Process.Pid},
			{backendPid: backend.Process.Pid, proxyPid: bare.Process.Pid}, {backendPid: backend.Process.Pid, proxyPid: bareH.Process.Pid},
			{backendPid: backend.Process.Pid}}
		wrk("http://"+backendAddr+sc.path, sc.script, *conns, time.Second) // warm-up
		wrk("http://"+proxyAddr+sc.path, sc.script, *conns, time.Second)
		wrk("http://"+bareAddr+sc.path, sc.script, *conns, time.Second)
		wrk("http://"+bareHAddr+sc.path, sc.script, *conns, time.Second)
		for i := 0; i < *runs; i++ {
			run := func(m *cpuMeter, addr string) sample {
				return m.run(func() sample { return wrk("http://"+addr+sc.path, sc.script, *conns, *dur) })
			}
			direct = append(direct, run(meters[0], backendAddr))
			proxied = append(proxied, run(meters[1], proxyAddr))
			bared = append(bared, run(meters[2], bareAddr))
			bareHed = append(bareHed, run(meters[3], bareHAddr))
			if nginxAddr != "" {
				nginxed = append(nginxed, run(meters[4], nginxAddr))
			}
		}
		d, p, b, bh := median(direct), median(proxied), median(bared), median(bareHed)
		ngxRatio := "not installed"
		if nginxAddr != "" {
			ngxRatio = fmt.Sprintf("%.2f", median(nginxed).rps/d.rps)
		}
		ratio := p.rps / d.rps
		target := "-"
		if sc.target > 0 {
			target = fmt.Sprintf("≥ %.2f", sc.target)
			if ratio < sc.target {
				target += " (missed)"
				failed = true
			}
		}
		busy := ""
		for i, m := range meters {
			if i == 4 && nginxAddr == "" {
				continue
			}
			_, c1 := m.busy()
			busy += fmt.Sprintf(" / %.0f %%", c1)
		}
		fmt.Printf("| %s | %.0f | %.0f | %.2f | %s | %.2f | %.2f | %s | %s / %s | %s / %s | %s |\n", sc.name, d.rps, p.rps, ratio, target,
			b.rps/d.rps, bh.rps/d.rps, ngxRatio, ms(d.p50), ms(d.p99), ms(p.p50), ms(p.p99), busy[3:])
	}
	fmt.Printf("\nsidecar peak RSS (VmHWM): %.1f MiB\n", float64(procs.StatusKB(sidecar.Process.Pid, "VmHWM"))/1024)

	if profileDir != "" {
		procs.Check(os.MkdirAll(profileDir, 0o755))
		fmt.Printf("configuration i's profiles: %s/cpu-i.pprof and allocs-i.pprof (i from 0: plain, memory, Redis, breaker, everything on memory, Redis)\n", profileDir)
	}
	if !*onlyStream && !*onlyLimits {
		h2Bench(dir, sidecarBin, backendAddr, backend.Process.Pid, *conns, *dur, *runs)
		grpcBench(dir, sidecarBin, *runs)
	}
	if *onlyH2 {
		return
	}
	var results []configResult
	if !*onlyStream {
		var ok bool
		results, ok = configBench(dir, sidecarBin, backendAddr, backend.Process.Pid, *conns, *dur, *runs)
		if !ok {
			failed = true
		}
	}
	if !streamBench(dir, sidecarBin, backendBin) {
		failed = true
	}
	if !*onlyStream && !leaseBench(dir, sidecarBin, backendAddr) {
		failed = true
	}
	if !*onlyStream && !*onlyLimits && !overloadBench(dir, sidecarBin) {
		failed = true
	}
	if !*onlyStream && !*onlyLimits && !cpuBench(dir, sidecarBin, backendBin, bareBin, *cpuDur, *runs) {
		failed = true
	}
	if *svg != "" && len(results) > 0 {
		procs.Check(os.WriteFile(*svg, chart(results), 0o644))
		fmt.Printf("\nchart of throughput and p99 per configuration written to %s\n", *svg)
	}
	if failed {
		fmt.Println("\nsome targets were missed in this run; see README \"Performance\" for why and for the reference proxies")
	}
}

func ms(s float64) string { return fmt.Sprintf("%.2f ms", s*1000) }

var (
	rpsRE      = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	requestsRE = regexp.MustCompile(`(\d+) requests in`)
	pctRE      = regexp.MustCompile(`(?m)^\s+(50|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s)\b`)
)

// wrk runs wrk pinned to CPU 1 and parses its --latency report.
func wrk(url, script string, conns int, d time.Duration) sample {
	args := []string{"-c", "1", "wrk", "-t1", fmt.Sprintf("-c%d", conns), fmt.Sprintf("-d%ds", int(d.Seconds())), "--latency"}
	if script != "" {
		args = append(args, "-s", script)
	}
	args = append(args, url)
	cmd := exec.Command("taskset", args...) // taskset execs wrk: one process
	out, err := cmd.CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "wrk failed: %v\n%s", err, out)
		os.Exit(1)
	}
	if strings.Contains(string(out), "Non-2xx") || strings.Contains(string(out), "Socket errors") {
		fmt.Fprintf(os.Stderr, "wrk saw errors against %s:\n%s", url, out)
	}
	s := sample{wrkCPU: cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()}
	if m := rpsRE.FindSubmatch(out); m != nil {
		s.rps, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	if m := requestsRE.FindSubmatch(out); m != nil {
		s.requests, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	for _, m := range pctRE.FindAllSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(string(m[2]), 64)
		switch string(m[3]) {
		case "us":
			v /= 1e6
		case "ms":
			v /= 1e3
		}
		if string(m[1]) == "50" {
			s.p50 = v
		} else {
			s.p99 = v
		}
	}
	return s
}

// cpuMeter adds up, over the runs of one target, the processor time of
// the proxy (core 0) and of core 1 (the backend and wrk), so that a table
// can say what each request cost each core and how busy each core was.
type cpuMeter struct {
	backendPid, proxyPid int  // proxyPid 0: direct, no proxy
	proxyTree            bool // meter proxyPid's descendants too (NGINX's workers)
	proxy, core1         time.Duration
	requests             float64
	wall                 time.Duration
}

// run measures one wrk run.
func (m *cpuMeter) run(f func() sample) sample {
	proxyCPU := procs.CPU
	if m.proxyTree {
		proxyCPU = procs.TreeCPU
	}
	var p0 time.Duration
	if m.proxyPid > 0 {
		p0 = proxyCPU(m.proxyPid)
	}
	b0 := procs.CPU(m.backendPid)
	start := time.Now() // wall time of the whole run, wrk's start-up included, as its CPU is
	s := f()
	if m.proxyPid > 0 {
		m.proxy += proxyCPU(m.proxyPid) - p0
	}
	m.core1 += procs.CPU(m.backendPid) - b0 + s.wrkCPU
	m.requests += s.requests
	m.wall += time.Since(start)
	return s
}

// perRequest is each core's processor time per request, in µs.
func (m *cpuMeter) perRequest() (proxyUs, core1Us float64) {
	n := max(m.requests, 1)
	return float64(m.proxy.Microseconds()) / n, float64(m.core1.Microseconds()) / n
}

// busy is the share of the runs' wall time each core was busy, in %.
func (m *cpuMeter) busy() (proxyPct, core1Pct float64) {
	w := float64(max(m.wall, 1))
	return 100 * float64(m.proxy) / w, 100 * float64(m.core1) / w
}

func median(ss []sample) sample {
	pick := func(f func(sample) float64) float64 {
		v := make([]float64, len(ss))
		for i, s := range ss {
			v[i] = f(s)
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	return sample{
		rps: pick(func(s sample) float64 { return s.rps }),
		p50: pick(func(s sample) float64 { return s.p50 }),
		p99: pick(func(s sample) float64 { return s.p99 }),

		proxyUs:    pick(func(s sample) float64 { return s.proxyUs }),
		proxyBusy:  pick(func(s sample) float64 { return s.proxyBusy }),
		core1Busy:  pick(func(s sample) float64 { return s.core1Busy }),
		core0Other: pick(func(s sample) float64 { return s.core0Other }),
	}
}

// startNginx runs NGINX, when installed, with one worker on CPU 0 in front
// of backendAddr (keep-alive upstream connections, directives added to the
// location), and returns its address ("" when not installed), the master
// process's pid (its worker is a child) and how to stop it.
func startNginx(dir, name, backendAddr, location string) (addr string, pid int, stop func()) {
	path, err := exec.LookPath("nginx")
	if err != nil {
		return "", 0, func() {}
	}
	addr = procs.FreeAddr()
	conf := filepath.Join(dir, name+".conf")
	procs.Check(os.WriteFile(conf, fmt.Appendf(nil, `worker_processes 1;
daemon off;
error_log %[1]s/%[2]s-error.log;
pid %[1]s/%[2]s.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s;
  proxy_temp_path %[1]s;
  client_max_body_size 0;
  upstream be { server %[3]s; keepalive 64; }
  server {
    listen %[4]s;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; %[5]s}
  }
}
`, dir, name, backendAddr, addr, location), 0o600))
	ngx := start(path, nil, "0", "-c", conf)
	procs.WaitHTTP("http://" + addr + "/small")
	return addr, ngx.Process.Pid, func() { procs.Stop(ngx) }
}

// startRedis runs a redis-server without persistence on a free port,
// pinned to cpu, and returns its address once it answers PING.
func startRedis(cpu string) (string, *exec.Cmd) {
	addr := procs.FreeAddr()
	_, port, _ := net.SplitHostPort(addr)
	// Its log (a warning at SIGTERM) would land in the tables' output.
	cmd := startTo(io.Discard, "redis-server", nil, cpu, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning")
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	for i := 0; rdb.Ping(context.Background()).Err() != nil; i++ {
		if i == 200 {
			procs.Check(fmt.Errorf("redis-server on %s did not answer", addr))
		}
		time.Sleep(25 * time.Millisecond)
	}
	return addr, cmd
}

func start(bin string, env []string, cpu string, args ...string) *exec.Cmd {
	return startTo(os.Stderr, bin, env, cpu, args...)
}

// startTo starts bin pinned to cpu with its output going to out.
func startTo(out io.Writer, bin string, env []string, cpu string, args ...string) *exec.Cmd {
	cmd := exec.Command("taskset", append([]string{"-c", cpu, bin}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = out, out
	procs.Check(cmd.Start())
	return cmd
}
