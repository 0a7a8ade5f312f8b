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
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

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
}

func main() {
	dur := flag.Duration("d", 5*time.Second, "duration of each wrk run")
	runs := flag.Int("runs", 3, "runs per scenario and target (median reported)")
	conns := flag.Int("c", 32, "wrk connections")
	kind := flag.String("backend", "nethttp", "bench backend: nethttp (a typical Go app) or fasthttp (twice as fast)")
	onlyLimits := flag.Bool("only-limits", false, "run only the configuration table (rate limits, breaker, everything on) and streaming")
	flag.StringVar(&profileDir, "profiles", "", "directory for CPU and allocation profiles of each configuration (go tool pprof)")
	onlyStream := flag.Bool("only-stream", false, "run only the 1 GiB streaming table")
	svg := flag.String("svg", "docs/bench.svg", "where to write the chart of throughput and p99 per configuration (empty: none)")
	flag.Parse()

	dir, err := os.MkdirTemp("", "sidecar-bench-")
	procs.Check(err)
	defer os.RemoveAll(dir)
	sidecarBin, backendBin, bareBin := filepath.Join(dir, "sidecar"), filepath.Join(dir, "backend"), filepath.Join(dir, "bare")
	procs.Run("go", "build", "-o", sidecarBin, ".")
	procs.Run("go", "build", "-o", backendBin, "./bench/backend")
	procs.Run("go", "build", "-o", bareBin, "./bench/bare")

	backendAddr, proxyAddr, adminAddr, bareAddr := procs.FreeAddr(), procs.FreeAddr(), procs.FreeAddr(), procs.FreeAddr()
	backend := start(backendBin, []string{"GOMAXPROCS=1"}, "1", "-addr", backendAddr, "-kind", *kind)
	defer procs.Stop(backend)
	procs.WaitHTTP("http://" + backendAddr + "/small")
	bare := start(bareBin, []string{"GOMAXPROCS=1"}, "0", "-addr", bareAddr, "-upstream", backendAddr)
	defer procs.Stop(bare)
	procs.WaitHTTP("http://" + bareAddr + "/small")

	// NGINX, when installed, as the reference proxy everyone knows: one
	// worker on CPU 0, keep-alive upstream connections, default buffering.
	nginxAddr := ""
	if path, err := exec.LookPath("nginx"); err == nil {
		nginxAddr = procs.FreeAddr()
		conf := filepath.Join(dir, "nginx.conf")
		procs.Check(os.WriteFile(conf, fmt.Appendf(nil, `worker_processes 1;
daemon off;
error_log %s/nginx-error.log;
pid %s/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %s;
  proxy_temp_path %s;
  client_max_body_size 0;
  upstream be { server %s; keepalive 64; }
  server {
    listen %s;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
`, dir, dir, dir, dir, backendAddr, nginxAddr), 0o600))
		ngx := start(path, nil, "0", "-c", conf)
		defer procs.Stop(ngx)
		procs.WaitHTTP("http://" + nginxAddr + "/small")
	}

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
	fmt.Printf("| scenario | direct req/s | sidecar req/s | sidecar/direct | target | bare fasthttp/direct | nginx/direct | direct p50 / p99 | sidecar p50 / p99 |\n")
	fmt.Printf("|---|---|---|---|---|---|---|---|---|\n")
	failed := false
	if *onlyLimits || *onlyStream {
		scenarios = nil
	}
	for _, sc := range scenarios {
		var direct, proxied, bared, nginxed []sample
		wrk("http://"+backendAddr+sc.path, sc.script, *conns, time.Second) // warm-up
		wrk("http://"+proxyAddr+sc.path, sc.script, *conns, time.Second)
		wrk("http://"+bareAddr+sc.path, sc.script, *conns, time.Second)
		for i := 0; i < *runs; i++ {
			direct = append(direct, wrk("http://"+backendAddr+sc.path, sc.script, *conns, *dur))
			proxied = append(proxied, wrk("http://"+proxyAddr+sc.path, sc.script, *conns, *dur))
			bared = append(bared, wrk("http://"+bareAddr+sc.path, sc.script, *conns, *dur))
			if nginxAddr != "" {
				nginxed = append(nginxed, wrk("http://"+nginxAddr+sc.path, sc.script, *conns, *dur))
			}
		}
		d, p, b := median(direct), median(proxied), median(bared)
		ngx := "not installed"
		if nginxAddr != "" {
			ngx = fmt.Sprintf("%.2f", median(nginxed).rps/d.rps)
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
		fmt.Printf("| %s | %.0f | %.0f | %.2f | %s | %.2f | %s | %s / %s | %s / %s |\n", sc.name, d.rps, p.rps, ratio, target,
			b.rps/d.rps, ngx, ms(d.p50), ms(d.p99), ms(p.p50), ms(p.p99))
	}
	fmt.Printf("\nsidecar peak RSS (VmHWM): %.1f MiB\n", float64(procs.StatusKB(sidecar.Process.Pid, "VmHWM"))/1024)

	if profileDir != "" {
		procs.Check(os.MkdirAll(profileDir, 0o755))
		fmt.Printf("configuration i's profiles: %s/cpu-i.pprof and allocs-i.pprof (i from 0: plain, memory, Redis, breaker, everything on memory, Redis)\n", profileDir)
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
	}
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
