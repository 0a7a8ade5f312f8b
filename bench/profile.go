package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/sidecar-proxy/sidecar/bench/procs"
)

// profileBench is docs/PERFORMANCE.md's table: where the CPU per request
// of the bare fasthttp forwarder and of the sidecar at its defaults goes,
// for GET 100 B and GET 64 KiB. Each runs alone on CPU 0 (GOMAXPROCS=1)
// under wrk -t1 -c64 on CPU 1 against the fasthttp backend; a 5 s CPU
// profile is taken in the middle of a 7 s run, and each sampled stack is
// put in the first category (profileCategories, leaf-most first) one of
// its frames matches. CPU per request is from /proc over the whole run;
// a category's µs are its share of that. Profiles are kept in dir.
func profileBench(dir, sidecarBin, backendBin, bareBin string) {
	backendAddr := procs.FreeAddr()
	backend := start(backendBin, []string{"GOMAXPROCS=1"}, "1", "-addr", backendAddr, "-kind", "fasthttp")
	defer procs.Stop(backend)
	procs.WaitHTTP("http://" + backendAddr + "/100")

	bareAddr, barePprof := procs.FreeAddr(), procs.FreeAddr()
	bare := start(bareBin, []string{"GOMAXPROCS=1"}, "0", "-addr", bareAddr, "-upstream", backendAddr, "-pprof", barePprof)
	defer procs.Stop(bare)
	procs.WaitHTTP("http://" + bareAddr + "/100")

	addr, admin := procs.FreeAddr(), procs.FreeAddr()
	cfg := filepath.Join(dir, "sidecar-profile.toml")
	procs.Check(os.WriteFile(cfg, fmt.Appendf(nil, "[server]\nlisten = %q\nadmin_listen = %q\nadmin_pprof = true\n"+
		"[upstreams.bench]\nurl = \"http://%s\"\n[[routes]]\nupstream = \"bench\"\n", addr, admin, backendAddr), 0o600))
	sc := start(sidecarBin, []string{"GOMAXPROCS=1"}, "0", "-config", cfg, "-log-level", "warn")
	defer procs.Stop(sc)
	procs.WaitHTTP("http://" + admin + "/readyz")

	type target struct {
		name, bin, addr, pprof string
		pid                    int
	}
	targets := []target{
		{"bare fasthttp forwarder", bareBin, bareAddr, barePprof, bare.Process.Pid},
		{"sidecar, defaults", sidecarBin, addr, admin, sc.Process.Pid},
	}
	fmt.Printf("\n## Where the CPU per request goes (pprof; each proxy alone on CPU 0, wrk -t1 -c%d on CPU 1)\n", cpuConns)
	for _, path := range []string{"/100", "/64k"} {
		cols := make([]map[string]float64, len(targets))
		perReq := make([]float64, len(targets))
		for i, t := range targets {
			url := "http://" + t.addr + path
			wrk(url, "", cpuConns, 2*time.Second) // warm-up
			before := procs.CPU(t.pid)
			done := make(chan sample, 1)
			go func() { done <- wrk(url, "", cpuConns, 7*time.Second) }()
			time.Sleep(time.Second)
			file := filepath.Join(dir, fmt.Sprintf("cpu-%d%s.pprof", i, strings.ReplaceAll(path, "/", "-")))
			fetch("http://"+t.pprof+"/debug/pprof/profile?seconds=5", file)
			s := <-done
			perReq[i] = float64((procs.CPU(t.pid) - before).Microseconds()) / s.requests
			cols[i] = categorize(t.bin, file)
		}
		fmt.Printf("\n%s, CPU per request: %s %.1f µs, %s %.1f µs\n\n| where | %s | %s |\n|---|---|---|\n",
			path, targets[0].name, perReq[0], targets[1].name, perReq[1], targets[0].name, targets[1].name)
		for _, c := range append(profileCategories, profileCategory{name: profileOther}) {
			if cols[0][c.name] == 0 && cols[1][c.name] == 0 {
				continue
			}
			fmt.Printf("| %s | %s | %s |\n", c.name, cell(cols[0][c.name], perReq[0]), cell(cols[1][c.name], perReq[1]))
		}
		fmt.Printf("| total | %.1f µs | %.1f µs |\n", perReq[0], perReq[1])
	}
	fmt.Printf("\nprofiles: %s/cpu-{0,1}-{100,64k}.pprof (0 bare, 1 sidecar); go tool pprof -top BINARY FILE\n", dir)
}

func cell(share, perReq float64) string {
	if share == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f %% (%.2f µs)", 100*share, share*perReq)
}

func fetch(url, file string) {
	resp, err := http.Get(url)
	procs.Check(err)
	defer resp.Body.Close()
	f, err := os.Create(file)
	procs.Check(err)
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	procs.Check(err)
}

type profileCategory struct {
	name string
	re   *regexp.Regexp
}

const profileOther = "other (runtime, Go's net package, fasthttp internals)"

// profileCategories, leaf-most first: a syscall made inside an upstream
// write counts as the syscall, not as the upstream write.
var profileCategories = []profileCategory{
	{"syscall: write (to the client and the upstream)", regexp.MustCompile(`^syscall\.write$|^internal/poll\.\(\*FD\)\.Writev$`)},
	{"syscall: read (from the client and the upstream)", regexp.MustCompile(`^syscall\.read$`)},
	{"syscall: peek at a pooled connection before reuse", regexp.MustCompile(`^syscall\.recvfrom$`)},
	{"epoll (netpoll)", regexp.MustCompile(`^runtime\.netpoll$`)},
	{"deadlines and timers", regexp.MustCompile(`SetReadDeadline|SetWriteDeadline|setDeadlineImpl|^runtime\.\(\*timer\)`)},
	{"GC and allocation", regexp.MustCompile(`^runtime\.mallocgc$|^runtime\.gcBgMarkWorker$|^runtime\.gcDrain`)},
	{"scheduler (park, find work, futex)", regexp.MustCompile(`^runtime\.schedule$|^runtime\.findRunnable$|^runtime\.park_m$|^runtime\.futex|^runtime\.sysmon$`)},
	{"time.Now", regexp.MustCompile(`^time\.Now$`)},
	{"breaker (hystrix-go and ours)", regexp.MustCompile(`hystrix|sidecar/breaker\.`)},
	{"rate limiter", regexp.MustCompile(`sidecar/limiter\.`)},
	{"overload protection", regexp.MustCompile(`sidecar/overload\.`)},
	{"metrics and access log", regexp.MustCompile(`\(\*exchange\)\.record$|VictoriaMetrics|accessLine`)},
	{"request head rewrite (hop-by-hop, X-Forwarded-*, identity)", regexp.MustCompile(`\(\*exchange\)\.prepareRequest$`)},
	{"routing, identity, admission", regexp.MustCompile(`\(\*exchange\)\.begin$|\(\*exchange\)\.admit$|sidecar/admission\.`)},
	{"upstream exchange (request head out, response head parsed)", regexp.MustCompile(`sidecar/upstream\.\(\*Exchange\)\.RoundTrip$`)},
	{"response head rewrite and body copy", regexp.MustCompile(`\(\*exchange\)\.(respond|WriteTo|Read|bufferBody)$`)},
	{"fasthttp server: request head parse, response write", regexp.MustCompile(`fasthttp\.\(\*Server\)\.serveConn$`)},
}

var traceValueRE = regexp.MustCompile(`^\s*([0-9.]+)(s|ms|us|µs)\s+(.*)$`)

// categorize returns each category's share of the profile's samples.
func categorize(bin, file string) map[string]float64 {
	out, err := exec.Command("go", "tool", "pprof", "-traces", bin, file).Output()
	procs.Check(err)
	shares := map[string]float64{}
	total := 0.0
	for _, block := range strings.Split(string(out), "-----------+-------------------------------------------------------")[1:] {
		lines := strings.Split(strings.Trim(block, "\n"), "\n")
		m := traceValueRE.FindStringSubmatch(lines[0])
		if m == nil {
			continue
		}
		v, _ := strconv.ParseFloat(m[1], 64)
		v *= map[string]float64{"s": 1e6, "ms": 1e3, "us": 1, "µs": 1}[m[2]]
		frames := []string{strings.TrimSpace(m[3])}
		for _, l := range lines[1:] {
			frames = append(frames, strings.TrimSpace(l))
		}
		total += v
		cat := profileOther
	match:
		for _, c := range profileCategories {
			for _, f := range frames {
				if c.re.MatchString(f) {
					cat = c.name
					break match
				}
			}
		}
		shares[cat] += v
	}
	for k := range shares {
		shares[k] /= total
	}
	return shares
}
