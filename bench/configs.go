package main

import (
	"fmt"
	"html"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sidecar-proxy/sidecar/bench/procs"
)

// configResult is one row of the configuration table.
type configResult struct {
	name          string
	rps, p50, p99 float64
	ratio         float64 // throughput / direct
	allocs        float64 // per request; -1: not a sidecar
	rssMiB        float64 // peak RSS of the process; -1: not a sidecar
	cpuUs         float64 // the sidecar's processor time per request, µs; -1: not a sidecar
	core1Us       float64 // the backend's and wrk's processor time per request, µs (core 1)
}

// configBench measures the sidecar in each configuration the README talks
// about against the backend directly: small GETs from 10,000 distinct
// clients (X-Forwarded-For from a trusted load generator, so every request
// is a rate-limit decision for one of 10,000 keys), all under their limits.
// Each configuration is its own sidecar process on CPU 0 (GOMAXPROCS=1);
// runs alternate between them. Redis runs on CPU 1 with the backend and
// wrk: in production it is another machine, and the sidecar's core pays
// only for its client side (encoding, round trips, replies).
func configBench(dir, sidecarBin, backendAddr string, backendPid, conns int, dur time.Duration, runs int) ([]configResult, bool) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		fmt.Println("\nconfiguration benchmark skipped: redis-server not installed")
		return nil, true
	}
	redisAddr, rs := startRedis("1")
	defer procs.Stop(rs)

	script := filepath.Join(dir, "clients.lua")
	procs.Check(os.WriteFile(script, []byte(`local reqs = {}
for i = 0, 9999 do
  reqs[i] = wrk.format("GET", "/small", {["Host"] = "bench", ["X-Forwarded-For"] = "10." .. math.floor(i / 256) .. "." .. (i % 256) .. ".1"})
end
local n = 0
request = function()
  n = (n + 7919) % 10000
  return reqs[n]
end
`), 0o600))
	base := `[server]
listen = %q
admin_listen = %q
trusted_proxies = ["127.0.0.1/32"]
admin_pprof = true
[upstreams.bench]
url = "http://%s"
[[routes]]
name = "bench"
upstream = "bench"
`
	const (
		breakerOff = "[upstreams.bench.breaker]\nenabled = false\n"
		tiers      = "[tiers.anonymous]\nlimit = 1000000000\nwindow = \"1m\"\n"
		accessLog  = "[access_log]\nenabled = true\n"
	)
	redis := fmt.Sprintf("[rate_limit]\nstore = \"redis\"\n[redis]\naddrs = [%q]\n", redisAddr)
	type variant struct {
		name, extra, addr, admin string
		target                   float64
		cmd                      *exec.Cmd
	}
	variants := []*variant{
		{name: "sidecar, plain (no limits, breaker off)", extra: breakerOff},
		{name: "+ memory limiter", extra: breakerOff + tiers},
		{name: "+ Redis limiter", extra: breakerOff + tiers + redis},
		{name: "+ breaker", extra: ""},
		{name: "everything on, memory store", extra: tiers + accessLog, target: 0.6},
		{name: "everything on, Redis store", extra: tiers + redis + accessLog, target: 0.6},
	}
	for i, v := range variants {
		v.addr, v.admin = procs.FreeAddr(), procs.FreeAddr()
		cfg := filepath.Join(dir, fmt.Sprintf("config-%d.toml", i))
		procs.Check(os.WriteFile(cfg, fmt.Appendf([]byte(nil), base+v.extra, v.addr, v.admin, backendAddr), 0o600))
		// The access log (one JSON line per request) goes to a file, as
		// a container runtime would take it.
		logf, err := os.Create(filepath.Join(dir, fmt.Sprintf("config-%d.log", i)))
		procs.Check(err)
		defer logf.Close()
		v.cmd = startTo(logf, sidecarBin, []string{"GOMAXPROCS=1"}, "0", "-config", cfg, "-log-level", "warn")
		defer procs.Stop(v.cmd)
		procs.WaitHTTP("http://" + v.admin + "/readyz")
		wrk("http://"+v.addr+"/small", script, conns, time.Second) // warm-up
	}
	wrk("http://"+backendAddr+"/small", script, conns, time.Second)

	direct := []sample{}
	results := make([][]sample, len(variants))
	mallocs := make([]float64, len(variants))
	reqs := make([]float64, len(variants))
	// Processor time of each core per configuration; index len(variants)
	// is direct.
	meters := make([]*cpuMeter, len(variants)+1)
	for i := range meters {
		meters[i] = &cpuMeter{backendPid: backendPid}
		if i < len(variants) {
			meters[i].proxyPid = variants[i].cmd.Process.Pid
		}
	}
	var redisRounds, redisReqs float64
	const okSeries = `sidecar_requests_total{route="bench",method="GET",status_class="2xx",tier="anonymous"}`
	for r := 0; r < runs; r++ {
		direct = append(direct, meters[len(variants)].run(func() sample { return wrk("http://"+backendAddr+"/small", script, conns, dur) }))
		for i, v := range variants {
			before := procs.Scrape(v.admin)
			var profiled chan struct{}
			if profileDir != "" && r == runs-1 {
				profiled = make(chan struct{})
				go func() {
					defer close(profiled)
					saveProfile(v.admin, fmt.Sprintf("profile?seconds=%d", max(1, int(dur.Seconds())-1)), filepath.Join(profileDir, fmt.Sprintf("cpu-%d.pprof", i)))
				}()
			}
			results[i] = append(results[i], meters[i].run(func() sample { return wrk("http://"+v.addr+"/small", script, conns, dur) }))
			if profiled != nil {
				<-profiled
				saveProfile(v.admin, "allocs", filepath.Join(profileDir, fmt.Sprintf("allocs-%d.pprof", i)))
			}
			after := procs.Scrape(v.admin)
			mallocs[i] += after["go_memstats_mallocs_total"] - before["go_memstats_mallocs_total"]
			reqs[i] += after[okSeries] - before[okSeries]
			if i == 2 {
				redisRounds += after["sidecar_ratelimit_store_commands_total"] - before["sidecar_ratelimit_store_commands_total"]
				redisReqs += after[okSeries] - before[okSeries]
			}
		}
	}
	d := median(direct)
	_, directCore1Us := meters[len(variants)].perRequest()
	_, directCore1Busy := meters[len(variants)].busy()
	out := []configResult{{name: "direct to the backend", rps: d.rps, p50: d.p50, p99: d.p99, ratio: 1, allocs: -1, rssMiB: -1,
		cpuUs: -1, core1Us: directCore1Us}}
	fmt.Printf("\nConfigurations: small GET from 10,000 distinct clients (all under their limits); each sidecar on CPU 0 (GOMAXPROCS=1),\nbackend, wrk and Redis on CPU 1; wrk -t1 -c%d -d%s, median of %d alternating runs\n\n", conns, dur, runs)
	fmt.Printf("| configuration | req/s | ratio to direct | target | p50 | p99 | added p50 / p99 | allocations per request | peak RSS | sidecar CPU per request (core 0 busy) | core 1 CPU per request (busy) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	fmt.Printf("| direct to the backend | %.0f | 1.00 | - | %s | %s | - | - | - | - | %.1f µs (%.0f %%) |\n", d.rps, ms(d.p50), ms(d.p99), directCore1Us, directCore1Busy)
	ok := true
	for i, v := range variants {
		m := median(results[i])
		res := configResult{name: v.name, rps: m.rps, p50: m.p50, p99: m.p99, ratio: m.rps / d.rps,
			rssMiB: float64(procs.StatusKB(v.cmd.Process.Pid, "VmHWM")) / 1024}
		if reqs[i] > 0 {
			res.allocs = mallocs[i] / reqs[i]
		}
		res.cpuUs, res.core1Us = meters[i].perRequest()
		busy0, busy1 := meters[i].busy()
		target := "-"
		if v.target > 0 {
			target = fmt.Sprintf("≥ %.2f", v.target)
			if res.ratio < v.target {
				target += " (missed)"
				ok = false
			}
		}
		fmt.Printf("| %s | %.0f | %.2f | %s | %s | %s | %s / %s | %.2f | %.1f MiB | %.1f µs (%.0f %%) | %.1f µs (%.0f %%) |\n", v.name, m.rps, res.ratio, target,
			ms(m.p50), ms(m.p99), signedMs(m.p50-d.p50), signedMs(m.p99-d.p99), res.allocs, res.rssMiB, res.cpuUs, busy0, res.core1Us, busy1)
		out = append(out, res)
	}
	// Core 1 runs wrk and the backend in every row; a proxied request costs
	// it more than a direct one (a cross-core wake-up and cache-cold data on
	// both sockets instead of one core talking to itself), so it can be the
	// limit rather than the sidecar's core.
	fmt.Printf("\nCore 1 (backend + wrk) per request: %.1f µs direct, %.1f µs through the plain sidecar (Redis rows: Redis runs on core 1 too, uncounted).\n",
		directCore1Us, out[1].core1Us)
	if redisReqs > 0 {
		fmt.Printf("\nRedis round trips per 100 requests (pipelined batches, Redis limiter): %.1f\n", 100*redisRounds/redisReqs)
	}

	// Redis frozen (SIGSTOP): after the first failures the limiter stops
	// calling it (cool-down) and decides locally.
	_ = rs.Process.Signal(syscall.SIGSTOP)
	defer func() { _ = rs.Process.Signal(syscall.SIGCONT) }()
	redisV := variants[2]
	for i := 0; i < 5; i++ { // trip the cool-down (each failing decision waits for its timeout)
		if resp, err := http.Get("http://" + redisV.addr + "/small"); err == nil {
			resp.Body.Close()
		}
	}
	frozen := wrk("http://"+redisV.addr+"/small", script, conns, dur)
	plain := out[1]
	fmt.Printf("\nRedis frozen (SIGSTOP), Redis limiter during the cool-down: %.0f req/s (%.2f of plain), p50 %s, p99 %s (plain: p50 %s, p99 %s)\n",
		frozen.rps, frozen.rps/plain.rps, ms(frozen.p50), ms(frozen.p99), ms(plain.p50), ms(plain.p99))
	brk := out[4]
	fmt.Printf("Circuit breaker on (healthy upstream) vs plain: %.2f\n", brk.rps/plain.rps)
	return out, ok
}

// signedMs prints a latency difference with its sign: through the sidecar
// p99 can be lower than direct, where wrk and the backend share a core.
func signedMs(s float64) string { return fmt.Sprintf("%+.2f ms", s*1000) }

// profileDir, when set (-profiles), receives a CPU profile of each
// configuration's last run and its allocation profile.
var profileDir string

func saveProfile(admin, what, file string) {
	resp, err := http.Get("http://" + admin + "/debug/pprof/" + what)
	if err != nil {
		fmt.Fprintln(os.Stderr, "profile:", err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(file)
	procs.Check(err)
	defer f.Close()
	_, _ = io.Copy(f, resp.Body)
}

// streamBench moves 1 GiB down and 1 GiB up through the sidecar and
// directly, with curl on CPU 1 and the sidecar on CPU 0, and reports MB/s
// and the sidecar's peak RSS.
func streamBench(dir, sidecarBin, backendBin string) bool {
	if _, err := exec.LookPath("curl"); err != nil {
		fmt.Println("\nstreaming benchmark skipped: curl not installed")
		return true
	}
	backendAddr, addr, admin := procs.FreeAddr(), procs.FreeAddr(), procs.FreeAddr()
	be := start(backendBin, []string{"GOMAXPROCS=1"}, "1", "-addr", backendAddr, "-kind", "nethttp")
	defer procs.Stop(be)
	procs.WaitHTTP("http://" + backendAddr + "/small")
	cfg := filepath.Join(dir, "stream.toml")
	procs.Check(os.WriteFile(cfg, fmt.Appendf(nil, "[server]\nlisten = %q\nadmin_listen = %q\nmax_body_bytes = 0\n[upstreams.bench]\nurl = \"http://%s\"\n[[routes]]\nupstream = \"bench\"\n",
		addr, admin, backendAddr), 0o600))
	sc := start(sidecarBin, []string{"GOMAXPROCS=1"}, "0", "-config", cfg, "-log-level", "warn")
	defer procs.Stop(sc)
	procs.WaitHTTP("http://" + admin + "/readyz")
	// NGINX in its streaming mode (no request or response buffering, which
	// would spool 1 GiB to disk) on the same core: the reference for what
	// a proxy reaches on this machine.
	nginxAddr, _, stopNginx := startNginx(dir, "nginx-stream", backendAddr, "proxy_request_buffering off; proxy_buffering off; ")
	defer stopNginx()

	const gib = 1 << 30
	curl := func(shell string) float64 {
		out, err := exec.Command("taskset", "-c", "1", "sh", "-c", shell).Output()
		if err != nil {
			fmt.Fprintf(os.Stderr, "curl failed: %v: %s\n", err, shell)
			return 0
		}
		v, _ := strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
		return v / 1e6
	}
	down := func(host string) float64 {
		return curl(fmt.Sprintf("curl -sf -o /dev/null -w '%%{speed_download}' 'http://%s/bytes?n=%d'", host, gib))
	}
	up := func(host string) float64 {
		return curl(fmt.Sprintf("head -c %d /dev/zero | curl -sf -o /dev/null -T - -w '%%{speed_upload}' 'http://%s/sink'", gib, host))
	}
	// The same from a file: curl sends Content-Length, and reads the file
	// from the page cache rather than a pipe.
	file := filepath.Join(dir, "1gib")
	procs.Check(exec.Command("sh", "-c", fmt.Sprintf("head -c %d /dev/zero > %s", gib, file)).Run())
	defer os.Remove(file)
	upFile := func(host string) float64 {
		return curl(fmt.Sprintf("curl -sf -o /dev/null -T %s -w '%%{speed_upload}' 'http://%s/sink'", file, host))
	}
	type transfer struct {
		name                string
		run                 func(string) float64
		direct, sidecar, ng []float64
	}
	transfers := []*transfer{{name: "download (Content-Length)", run: down}, {name: "upload (Content-Length, from a file)", run: upFile},
		{name: "upload (chunked, from a pipe)", run: up}}
	for r := 0; r < 3; r++ {
		for _, t := range transfers {
			t.direct = append(t.direct, t.run(backendAddr))
			t.sidecar = append(t.sidecar, t.run(addr))
			if nginxAddr != "" {
				t.ng = append(t.ng, t.run(nginxAddr))
			}
		}
	}
	m := func(v []float64) float64 {
		if len(v) == 0 {
			return 0
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	rss := float64(procs.StatusKB(sc.Process.Pid, "VmHWM")) / 1024
	fmt.Printf("\n1 GiB streaming (curl and the backend on CPU 1, the proxy on CPU 0; sidecar with GOMAXPROCS=1, NGINX streaming: one worker, proxy_request_buffering and proxy_buffering off), median of 3\n\n")
	fmt.Printf("| transfer | direct MB/s | sidecar MB/s | ratio | target | NGINX MB/s | NGINX ratio |\n|---|---|---|---|---|---|---|\n")
	ok := true
	for _, t := range transfers {
		d, p, n := m(t.direct), m(t.sidecar), m(t.ng)
		target := "≥ 0.70"
		if p/d < 0.7 {
			target += " (missed)"
			ok = false
		}
		ngx := "- | -"
		if nginxAddr != "" {
			ngx = fmt.Sprintf("%.0f | %.2f", n, n/d)
		}
		fmt.Printf("| %s | %.0f | %.0f | %.2f | %s | %s |\n", t.name, d, p, p/d, target, ngx)
	}
	target := "< 64 MiB"
	if rss >= 64 {
		target += " (missed)"
		ok = false
	}
	fmt.Printf("\nsidecar peak RSS over the streaming runs: %.1f MiB (target %s)\n", rss, target)
	return ok
}

// chart draws throughput and p99 per configuration as an SVG bar chart.
func chart(rows []configResult) []byte {
	const (
		labelW, barW, rowH, pad = 300, 260, 26, 20
	)
	maxRPS, maxP99 := 0.0, 0.0
	for _, r := range rows {
		maxRPS, maxP99 = max(maxRPS, r.rps), max(maxP99, r.p99)
	}
	width := labelW + 2*barW + 4*pad
	height := pad*3 + rowH*len(rows) + 20
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	x1, x2 := labelW+pad, labelW+barW+3*pad
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">throughput (req/s)</text>`+"\n", x1, pad)
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">p99 latency (ms)</text>`+"\n", x2, pad)
	for i, r := range rows {
		y := pad*2 + i*rowH
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", labelW, y+rowH/2+4, html.EscapeString(r.name))
		w := int(float64(barW) * r.rps / maxRPS)
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="#4878a8"/>`+"\n", x1, y+4, w, rowH-8)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%.0f (%.2f×)</text>`+"\n", x1+w+4, y+rowH/2+4, r.rps, r.ratio)
		w = int(float64(barW) * r.p99 / maxP99)
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="#c8783c"/>`+"\n", x2, y+4, w, rowH-8)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%.2f</text>`+"\n", x2+w+4, y+rowH/2+4, r.p99*1000)
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#666">make bench: small GET, 10,000 clients, sidecar on one core; %s</text>`+"\n",
		pad, height-8, time.Now().UTC().Format("2006-01-02"))
	b.WriteString("</svg>\n")
	return []byte(b.String())
}
