package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/sidecar-proxy/sidecar/bench/procs"
)

// h2Bench compares small requests over HTTP/2 (prior-knowledge h2c,
// h2load with many streams on few connections) through the sidecar and
// through NGINX with http2 on, side by side with the sidecar's HTTP/1.1
// path (wrk) in the same runs, and reports each one's CPU per request.
// It needs h2load (Debian's nghttp2-client); without it the table is
// skipped with a note.
func h2Bench(dir, sidecarBin, backendAddr string, backendPid, conns int, d time.Duration, runs int) {
	fmt.Printf("\n### HTTP/2: small GET (13 B) over h2c\n\n")
	if _, err := exec.LookPath("h2load"); err != nil {
		fmt.Println("h2load not installed (apt-get install nghttp2-client): HTTP/2 table skipped")
		return
	}
	addr, sc := startH2C(dir, sidecarBin, "h2", "url = \"http://"+backendAddr+"\"\n")
	defer procs.Stop(sc)
	// NGINX keeps an HTTP/2 connection for 1000 requests by default
	// (keepalive_requests); h2load does not reconnect, so lift it.
	ngxAddr, stopNginx := startNginxH2(dir, backendAddr)
	defer stopNginx()

	type target struct {
		name string
		pid  int
		run  func() sample
	}
	n := 100000
	targets := []target{
		{"sidecar, h2c (h2load -c 8 -m 16)", sc.Process.Pid, func() sample { return h2load("http://"+addr+"/small", n) }},
		{"sidecar, HTTP/1.1 (wrk -c " + strconv.Itoa(conns) + ")", sc.Process.Pid, func() sample { return wrk("http://"+addr+"/small", "", conns, d) }},
	}
	if ngxAddr != "" {
		targets = append(targets, target{"nginx, h2c (h2load -c 8 -m 16)", nginxWorker(), func() sample { return h2load("http://"+ngxAddr+"/small", n) }})
	}
	meters := make([]cpuMeter, len(targets))
	samples := make([][]sample, len(targets))
	for i := range targets {
		meters[i] = cpuMeter{backendPid: backendPid, proxyPid: targets[i].pid}
		targets[i].run() // warm-up
	}
	for r := 0; r < runs; r++ {
		for i, t := range targets {
			samples[i] = append(samples[i], meters[i].run(t.run))
		}
	}
	fmt.Printf("proxy on CPU 0 (GOMAXPROCS=1 / one NGINX worker); backend and load generator on CPU 1; median of %d alternating runs\n\n", runs)
	fmt.Printf("| target | req/s | proxy CPU per request |\n|---|---|---|\n")
	for i, t := range targets {
		us, _ := meters[i].perRequest()
		fmt.Printf("| %s | %.0f | %.1f µs |\n", t.name, median(samples[i]).rps, us)
	}
}

// startH2C runs a sidecar on CPU 0 with h2c on, in front of one upstream
// (its table's lines given), and returns its address once ready.
func startH2C(dir, sidecarBin, name, upstream string) (string, *exec.Cmd) {
	addr, admin := procs.FreeAddr(), procs.FreeAddr()
	cfg := filepath.Join(dir, "sidecar-"+name+".toml")
	procs.Check(os.WriteFile(cfg, fmt.Appendf(nil, "[server]\nlisten = %q\nadmin_listen = %q\nh2c = true\nmax_body_bytes = 0\n"+
		"[upstreams.bench]\n%s[[routes]]\nupstream = \"bench\"\n", addr, admin, upstream), 0o600))
	sc := start(sidecarBin, []string{"GOMAXPROCS=1"}, "0", "-config", cfg, "-log-level", "warn")
	procs.WaitHTTP("http://" + admin + "/readyz")
	return addr, sc
}

var (
	h2rpsRE  = regexp.MustCompile(`finished in [^,]+, ([0-9.]+) req/s`)
	h2doneRE = regexp.MustCompile(`requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded`)
)

// h2load runs n requests with h2load pinned to CPU 1: 8 connections, 16
// streams each.
func h2load(url string, n int) sample {
	cmd := exec.Command("taskset", "-c", "1", "h2load", "-c", "8", "-m", "16", "-n", strconv.Itoa(n), url)
	out, err := cmd.CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "h2load failed: %v\n%s", err, out)
		os.Exit(1)
	}
	s := sample{wrkCPU: cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()}
	if m := h2rpsRE.FindSubmatch(out); m != nil {
		s.rps, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	if m := h2doneRE.FindSubmatch(out); m != nil {
		s.requests, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	if int(s.requests) != n {
		fmt.Fprintf(os.Stderr, "h2load against %s: %v of %d requests succeeded\n%s", url, s.requests, n, out)
	}
	return s
}

// startNginxH2 is startNginx with http2 on the listener (prior-knowledge
// h2c) and keep-alive for as many requests as a run sends.
func startNginxH2(dir, backendAddr string) (string, func()) {
	path, err := exec.LookPath("nginx")
	if err != nil {
		return "", func() {}
	}
	addr := procs.FreeAddr()
	conf := filepath.Join(dir, "nginx-h2.conf")
	procs.Check(os.WriteFile(conf, fmt.Appendf(nil, `worker_processes 1;
daemon off;
error_log %[1]s/nginx-h2-error.log;
pid %[1]s/nginx-h2.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  upstream be { server %[2]s; keepalive 64; }
  server {
    listen %[3]s http2;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
`, dir, backendAddr, addr), 0o600))
	ngx := start(path, nil, "0", "-c", conf)
	for i := 0; exec.Command("h2load", "-n", "1", "http://"+addr+"/small").Run() != nil; i++ { // it speaks only h2 there
		if i == 100 {
			fmt.Fprintln(os.Stderr, "nginx with http2 did not answer: its row is skipped")
			procs.Stop(ngx)
			return "", func() {}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return addr, func() { procs.Stop(ngx) }
}

// nginxWorker finds the NGINX worker process, which does the work (the
// master started with daemon off only forks it): the newest one, which is
// the one just started.
func nginxWorker() int {
	out, err := exec.Command("pgrep", "-n", "-f", "nginx: worker").Output()
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(string(regexp.MustCompile(`\d+`).Find(out)))
	return pid
}
