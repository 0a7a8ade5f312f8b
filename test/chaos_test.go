package test

// The chaos suite: faults injected under steady load through the real
// binary. `make test` runs each briefly; `make chaos` runs them at full
// length (go test -run Chaos ./test -args -long).

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

var long = flag.Bool("long", false, "run the chaos tests at full length (make chaos)")

// chaosLen is short under `make test` and long under `make chaos`.
func chaosLen(short, full time.Duration) time.Duration {
	if *long {
		return full
	}
	return short
}

// traffic is a closed-loop load of GET requests that records every
// request's latency and outcome, so that any phase can be measured.
type traffic struct {
	mu      sync.Mutex
	samples []trafficSample
	stop    chan struct{}
	wg      sync.WaitGroup
	client  *http.Client
	// firstOdd is the first answer other than 200, for the log.
	firstOdd atomic.Pointer[string]
}

type trafficSample struct {
	at     time.Time
	took   time.Duration
	status int // 0: transport error
	err    error
}

// startTraffic runs workers sending GET url; header, when set, adds
// headers to request i of worker w.
func startTraffic(t testing.TB, urls []string, workers int, header func(w, i int, h http.Header)) *traffic {
	tr := &traffic{stop: make(chan struct{})}
	tr.client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: workers}, Timeout: 10 * time.Second}
	for w := 0; w < workers; w++ {
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-tr.stop:
					return
				default:
				}
				tr.do(urls[(w+i)%len(urls)], func(h http.Header) {
					if header != nil {
						header(w, i, h)
					}
				})
			}
		}()
	}
	t.Cleanup(tr.halt)
	return tr
}

// startPaced is an open-loop load: rps requests a second whatever the
// answers take, as many independent clients send (at most 1,000 in
// flight), so a slow upstream does not slow the arrivals.
func startPaced(t testing.TB, url string, rps int) *traffic {
	tr := &traffic{stop: make(chan struct{})}
	tr.client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1000}, Timeout: 10 * time.Second}
	slots := make(chan struct{}, 1000)
	tr.wg.Add(1)
	go func() {
		defer tr.wg.Done()
		tick := time.NewTicker(time.Second / time.Duration(rps))
		defer tick.Stop()
		for {
			select {
			case <-tr.stop:
				return
			case <-tick.C:
			}
			select {
			case slots <- struct{}{}:
			default:
				continue
			}
			tr.wg.Add(1)
			go func() {
				defer tr.wg.Done()
				tr.do(url, nil)
				<-slots
			}()
		}
	}()
	t.Cleanup(tr.halt)
	return tr
}

// do sends one GET and records it.
func (tr *traffic) do(url string, header func(http.Header)) {
	req, _ := http.NewRequest("GET", url, nil)
	if header != nil {
		header(req.Header)
	}
	start := time.Now()
	resp, err := tr.client.Do(req)
	s := trafficSample{at: start}
	if err == nil {
		var b []byte
		b, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		s.status = resp.StatusCode
		if s.status != 200 && tr.firstOdd.Load() == nil {
			odd := fmt.Sprintf("%d %v %q", s.status, resp.Header, b)
			tr.firstOdd.CompareAndSwap(nil, &odd)
		}
	}
	s.took, s.err = time.Since(start), err
	tr.mu.Lock()
	tr.samples = append(tr.samples, s)
	tr.mu.Unlock()
}

func (tr *traffic) halt() {
	select {
	case <-tr.stop:
	default:
		close(tr.stop)
	}
	tr.wg.Wait()
	tr.client.CloseIdleConnections()
}

// phase sums up the requests started in [from, to).
type phase struct {
	n, fivexx, failed int
	codes             map[int]int
	p50, p99, max     time.Duration
	firstErr          error
}

func (tr *traffic) phase(from, to time.Time) phase {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	p := phase{codes: map[int]int{}}
	var took []time.Duration
	for _, s := range tr.samples {
		if s.at.Before(from) || !s.at.Before(to) {
			continue
		}
		p.n++
		took = append(took, s.took)
		p.codes[s.status]++
		if s.err != nil {
			p.failed++
			if p.firstErr == nil {
				p.firstErr = s.err
			}
		} else if s.status >= 500 {
			p.fivexx++
		}
	}
	if len(took) > 0 {
		slices.Sort(took)
		p.p50 = took[len(took)/2]
		p.p99 = took[min(len(took)-1, int(math.Ceil(0.99*float64(len(took))))-1)]
		p.max = took[len(took)-1]
	}
	return p
}

func (p phase) String() string {
	return fmt.Sprintf("%d requests, p50 %v, p99 %v, max %v, statuses %v", p.n,
		p.p50.Round(10*time.Microsecond), p.p99.Round(10*time.Microsecond), p.max.Round(10*time.Microsecond), p.codes)
}

// openFDs counts the process's open file descriptors.
func (s *sidecar) openFDs() int {
	s.t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid))
	if err != nil {
		s.t.Fatal(err)
	}
	return len(ents)
}

// settlesTo waits for the sidecar's goroutines and file descriptors to
// come back to within slack of a baseline taken after the warm-up, and
// reports what it saw: a leak leaves them above. fasthttp keeps a served
// connection's worker goroutine for up to 2 × 10 s (its
// MaxIdleWorkerDuration), so the wait is 25 s.
func (s *sidecar) settlesTo(t *testing.T, goroutines float64, fds int, slack int) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(25 * time.Second)
	for {
		g, f := s.metric("go_goroutines"), s.openFDs()
		if g <= goroutines+float64(slack) && f <= fds+slack {
			t.Logf("%v after the faults: %v goroutines (baseline %v), %d fds (baseline %d)", time.Since(start).Round(time.Second), g, goroutines, f, fds)
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("leak: %v goroutines (baseline %v), %d open fds (baseline %d) 25 s after the faults", g, goroutines, f, fds)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitMetricAbove polls a series until it exceeds v and returns how long that took.
func (s *sidecar) waitMetricAbove(t *testing.T, series string, v float64, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for s.metric(series) <= v {
		if time.Since(start) > within {
			t.Fatalf("%s stayed at %v for %v", series, s.metric(series), within)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

// TestChaosRedis kills Redis, restarts it, freezes it (SIGSTOP) and thaws
// it under load through two replicas that share limits through it.
func TestChaosRedis(t *testing.T) {
	rs := redistest.Start(t)
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	cfg := fmt.Sprintf(`
[server]
trusted_proxies = ["127.0.0.1/32"]
[rate_limit]
store = "redis"
cooldown = "1s"
[redis]
addrs = [%q]
[tiers.anonymous]
limit = 1000000
window = "1m"
[upstreams.app]
url = %q
[[routes]]
name = "limited"
path_prefix = "/limited"
upstream = "app"
limits = { anonymous = 10 }
[[routes]]
name = "app"
upstream = "app"
`, rs.Addr, be.url())
	replicas := []*sidecar{startSidecar(t, cfg), startSidecar(t, cfg)}
	const workers = 8
	tr := startTraffic(t, []string{replicas[0].url("/"), replicas[1].url("/")}, workers, func(w, i int, h http.Header) {
		h.Set("X-Forwarded-For", fmt.Sprintf("10.1.%d.%d", w, i%250))
	})
	// shared checks that one client's limit of 10 holds across both
	// replicas: 20 requests alternating between them, exactly 10 admitted.
	clientN := 0
	shared := func(when string) {
		t.Helper()
		clientN++
		admitted := 0
		for i := 0; i < 20; i++ {
			req, _ := http.NewRequest("GET", replicas[i%2].url("/limited"), nil)
			req.Header.Set("X-Forwarded-For", fmt.Sprintf("10.2.0.%d", clientN))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode == 200 {
				admitted++
			}
		}
		if admitted != 10 {
			t.Errorf("%s: one client's limit of 10 admitted %d across two replicas", when, admitted)
		}
	}
	errorsTotal := func() (n float64) {
		for _, r := range replicas {
			n += r.metric(`sidecar_ratelimit_store_errors_total`)
		}
		return n
	}
	backToStore := func() float64 {
		return min(replicas[0].metric(`sidecar_ratelimit_store_switches_total{to="store"}`),
			replicas[1].metric(`sidecar_ratelimit_store_switches_total{to="store"}`))
	}
	hold := chaosLen(1500*time.Millisecond, 5*time.Second)
	freeze := chaosLen(3*time.Second, 10*time.Second)

	time.Sleep(hold)
	t0 := time.Now()
	time.Sleep(hold)
	steady := tr.phase(t0, time.Now())
	shared("steady")

	t1 := time.Now()
	rs.Kill()
	time.Sleep(hold)
	killed := tr.phase(t1, time.Now())

	switches := backToStore()
	t2 := time.Now()
	rs.Restart()
	restartRecovery := time.Duration(0)
	for _, r := range replicas {
		restartRecovery = max(restartRecovery, r.waitMetricAbove(t, `sidecar_ratelimit_store_switches_total{to="store"}`, switches, 10*time.Second))
	}
	restarted := tr.phase(t2, time.Now())
	shared("after the restart")

	// Frozen: connections stay open and nothing answers, the worst case.
	t3 := time.Now()
	rs.Freeze()
	for _, r := range replicas {
		r.waitMetricAbove(t, `sidecar_ratelimit_store_cooldown`, 0, 5*time.Second)
	}
	tripped := time.Now()
	errsAtTrip := errorsTotal()
	time.Sleep(freeze)
	errsInCooldown := errorsTotal() - errsAtTrip
	frozen := tr.phase(t3, time.Now())
	inCooldown := tr.phase(tripped, time.Now())
	switches = backToStore()
	t4 := time.Now()
	rs.Thaw()
	thawRecovery := time.Duration(0)
	for _, r := range replicas {
		thawRecovery = max(thawRecovery, r.waitMetricAbove(t, `sidecar_ratelimit_store_switches_total{to="store"}`, switches, 10*time.Second))
	}
	thawed := tr.phase(t4, time.Now())
	shared("after the thaw")
	tr.halt()

	all := tr.phase(time.Time{}, time.Now())
	if all.fivexx != 0 || all.failed != 0 {
		t.Errorf("%d requests: %d 5xx, %d failed (first: %v)", all.n, all.fivexx, all.failed, all.firstErr)
	}
	if all.codes[200] != all.n {
		t.Errorf("some requests were not admitted: %v", all.codes)
	}
	// During the cool-down only the probe (one request per replica per
	// cool-down of 1 s) may wait on Redis; every other decision is local.
	probes := 2 * (int(freeze/time.Second) + 1)
	// Decisions already in flight when the cool-down began fail too: at
	// most one per worker.
	if int(errsInCooldown) > probes+workers {
		t.Errorf("%v store errors during %v of cool-down: more than %d probes and %d in flight — requests are waiting on frozen Redis",
			errsInCooldown, freeze, probes, workers)
	}
	waited := 0
	tr.mu.Lock()
	for _, s := range tr.samples {
		if !s.at.Before(tripped) && s.at.Before(t4) && s.took >= 50*time.Millisecond {
			waited++
		}
	}
	tr.mu.Unlock()
	t.Logf("steady:     %v", steady)
	t.Logf("killed:     %v", killed)
	t.Logf("restarted:  %v; both replicas back on Redis %v after the restart", restarted, restartRecovery.Round(time.Millisecond))
	t.Logf("frozen:     %v", frozen)
	t.Logf("cool-down:  %v; %d requests took ≥ store_timeout (50 ms), %v store errors (≤ %d probes + %d in flight allowed)", inCooldown, waited, errsInCooldown, probes, workers)
	t.Logf("thawed:     %v; both replicas back on Redis %v after the thaw", thawed, thawRecovery.Round(time.Millisecond))
	t.Logf("added p99 while frozen (cool-down) vs steady: %v", (inCooldown.p99 - steady.p99).Round(10*time.Microsecond))
}

// flappingUpstream is an upstream that refuses, hangs, fails or answers,
// as the test says.
type flappingUpstream struct {
	addr  string
	mode  atomic.Value // "ok", "refuse", "hang", "500"
	mu    sync.Mutex
	ln    net.Listener
	conns map[net.Conn]bool
	srv   *http.Server
	hung  chan struct{}
}

func startFlapping(t *testing.T) *flappingUpstream {
	f := &flappingUpstream{addr: freeAddr(t), hung: make(chan struct{}), conns: map[net.Conn]bool{}}
	f.mode.Store("ok")
	f.srv = &http.Server{ConnState: func(c net.Conn, st http.ConnState) {
		f.mu.Lock()
		defer f.mu.Unlock()
		switch st {
		case http.StateNew:
			f.conns[c] = true
		case http.StateClosed, http.StateHijacked:
			delete(f.conns, c)
		}
	}, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch f.mode.Load() {
		case "hang":
			select {
			case <-r.Context().Done():
			case <-f.hung:
			}
		case "500":
			w.WriteHeader(500)
		default:
			io.WriteString(w, "ok")
		}
	})}
	f.listen(t)
	t.Cleanup(func() {
		close(f.hung)
		f.srv.Close()
	})
	return f
}

func (f *flappingUpstream) listen(t *testing.T) {
	ln, err := net.Listen("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.ln = ln
	f.mu.Unlock()
	go f.srv.Serve(ln)
}

// set switches the mode; "refuse" closes the listener and every open
// connection, leaving the port closed.
func (f *flappingUpstream) set(t *testing.T, mode string) {
	prev := f.mode.Swap(mode)
	if mode == "refuse" {
		f.mu.Lock()
		f.ln.Close()
		for c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
	} else if prev == "refuse" {
		f.listen(t)
	}
}

// TestChaosUpstreamFlaps makes the upstream refuse, hang, fail and recover
// under load: the breaker opens and closes, no request waits longer than
// its timeouts, and nothing leaks.
func TestChaosUpstreamFlaps(t *testing.T) {
	up := startFlapping(t)
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.app]
url = "http://%s"
connect_timeout = "200ms"
response_timeout = "300ms"
retries = 0
[upstreams.app.breaker]
failure_statuses = [500, 502, 503, 504]
error_percent = 50
volume_threshold = 10
sleep_window = "500ms"
[upstreams.app.fallback]
status = 503
body = "fallback"
[[routes]]
name = "app"
upstream = "app"
`, up.addr))
	// Open loop: a hung upstream must not slow the arrivals, or the
	// breaker's error percentage (over hystrix's 10 s window) would never
	// be reached by a closed loop of clients each stuck on a timeout.
	tr := startPaced(t, sc.url("/"), 400)
	time.Sleep(500 * time.Millisecond)
	goroutines, fds := sc.metric("go_goroutines"), sc.openFDs()

	opened := sc.metric(`sidecar_breaker_transitions_total{circuit="upstream:app",to="open"}`)
	closed := sc.metric(`sidecar_breaker_transitions_total{circuit="upstream:app",to="closed"}`)
	failing := chaosLen(3*time.Second, 10*time.Second)
	healthy := chaosLen(time.Second, 5*time.Second)
	cycles := 1
	if *long {
		cycles = 4
	}
	var phases []string
	for c := 0; c < cycles; c++ {
		for _, mode := range []string{"ok", "refuse", "ok", "hang", "ok", "500", "ok"} {
			from := time.Now()
			up.set(t, mode)
			if mode == "ok" {
				time.Sleep(healthy)
			} else {
				time.Sleep(failing)
			}
			phases = append(phases, fmt.Sprintf("%-6s %v", mode, tr.phase(from, time.Now())))
		}
	}
	last := time.Now()
	time.Sleep(healthy)
	recovered := tr.phase(last, time.Now())
	tr.halt()
	for _, p := range phases {
		t.Logf("%s", p)
	}

	all := tr.phase(time.Time{}, time.Now())
	if all.failed != 0 {
		t.Errorf("%d requests failed without an answer (first: %v)", all.failed, all.firstErr)
	}
	// The longest wait allowed: connect (200 ms) or response (300 ms)
	// timeout, plus scheduling slack on a shared machine.
	if limit := 300*time.Millisecond + time.Second; all.max > limit {
		t.Errorf("a request waited %v, longer than its timeouts allow (%v)", all.max, limit)
	}
	if v := sc.metric(`sidecar_breaker_transitions_total{circuit="upstream:app",to="open"}`) - opened; v < float64(3*cycles) {
		t.Errorf("the circuit opened %v times in %d refuse/hang/500 phases", v, 3*cycles)
	}
	if v := sc.metric(`sidecar_breaker_transitions_total{circuit="upstream:app",to="closed"}`) - closed; v < float64(3*cycles) {
		t.Errorf("the circuit closed %v times after %d recoveries", v, 3*cycles)
	}
	if recovered.codes[200] != recovered.n || recovered.n == 0 {
		t.Errorf("after the last recovery: %v", recovered)
	}
	if v := sc.metric(`sidecar_breaker_state{circuit="upstream:app"}`); v != 0 {
		t.Errorf("breaker state %v after recovery, want 0 (closed)", v)
	}
	t.Logf("all: %v", all)
	sc.settlesTo(t, goroutines, fds, 4)
}

// TestChaosReloadEverySecond rewrites the config and sends SIGHUP every
// second under load and streams, then SIGTERM: no request is lost and
// every stream either completes or is visibly cut.
func TestChaosReloadEverySecond(t *testing.T) {
	body := map[string]string{}
	mk := func(name string) *backend {
		return startBackend(t, func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/stream" {
				fl := w.(http.Flusher)
				for i := 0; i < 10; i++ {
					fmt.Fprintf(w, "%s%d;", name, i)
					fl.Flush()
					time.Sleep(30 * time.Millisecond)
				}
				io.WriteString(w, "END")
				return
			}
			io.WriteString(w, name)
		})
	}
	a, b := mk("A"), mk("B")
	body[a.url()], body[b.url()] = "A", "B"
	cfgFor := func(up string, i int) string {
		// Each reload changes something besides the upstream, so that
		// every one of them is a real new snapshot.
		return routeTo(up, fmt.Sprintf("response_timeout = \"%ds\"", 10+i%5))
	}
	sc := startSidecar(t, cfgFor(a.url(), 0), "-watch-interval", "1h")
	stop := make(chan struct{})
	res, wg := runLoad(t, sc.Addr, "/", 4, stop)

	// Streams: each one ends with "END"; a stream cut short must be an error.
	var streamsDone, streamsCut, streamsSilentlyShort atomic.Int64
	var streamWG sync.WaitGroup
	for i := 0; i < 2; i++ {
		streamWG.Add(1)
		go func() {
			defer streamWG.Done()
			client := &http.Client{Timeout: 10 * time.Second}
			for {
				resp, err := client.Get(sc.url("/stream"))
				if err != nil {
					var op *net.OpError
					if strings.Contains(err.Error(), "refused") || (errors.As(err, &op) && op.Op == "dial") {
						return // the listener is gone
					}
					streamsCut.Add(1)
					continue
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				switch {
				case err != nil:
					streamsCut.Add(1)
				case strings.HasSuffix(string(got), "END"):
					streamsDone.Add(1)
				default:
					streamsSilentlyShort.Add(1)
				}
			}
		}()
	}

	dur := chaosLen(5*time.Second, 30*time.Second)
	reloads := 0
	ups := []string{a.url(), b.url()}
	before := sc.metric(`sidecar_config_reloads_total{result="success"}`)
	for start := time.Now(); time.Since(start) < dur; {
		time.Sleep(time.Second)
		reloads++
		sc.writeConfig(cfgFor(ups[reloads%2], reloads))
		sc.signal(syscall.SIGHUP)
	}
	time.Sleep(300 * time.Millisecond)
	if got := sc.metric(`sidecar_config_reloads_total{result="success"}`) - before; got != float64(reloads) {
		t.Errorf("%d SIGHUPs, %v successful reloads", reloads, got)
	}
	sc.signal(syscall.SIGTERM)
	if code := sc.wait(15 * time.Second); code != 0 {
		t.Errorf("exit code %d after SIGTERM", code)
	}
	close(stop)
	wg.Wait()
	streamWG.Wait()
	if res.dropped.Load() != 0 {
		t.Errorf("%d requests lost during reloads and drain; first: %v", res.dropped.Load(), res.firstDrop)
	}
	if n := streamsSilentlyShort.Load(); n != 0 {
		t.Errorf("%d streams ended early without an error", n)
	}
	if streamsDone.Load() == 0 || res.bodies["A"] == 0 || res.bodies["B"] == 0 {
		t.Errorf("traffic did not follow the reloads: %d streams done, bodies %v", streamsDone.Load(), res.bodies)
	}
	t.Logf("%d reloads in %v, then SIGTERM: %d requests ok (bodies %v), 0 lost; streams: %d complete, %d cut visibly, 0 short",
		reloads, dur, res.ok.Load(), res.bodies, streamsDone.Load(), streamsCut.Load())
}

// TestChaosHostileClients holds 10,000 idle connections open, runs
// slowloris clients and clients that abort mid-upload and mid-download,
// and measures well-behaved clients against a quiet baseline.
func TestChaosHostileClients(t *testing.T) {
	const big = 64 << 20
	chunk := make([]byte, 64<<10)
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/upload":
			io.Copy(io.Discard, r.Body)
		case "/download":
			w.Header().Set("Content-Length", fmt.Sprint(big))
			for sent := 0; sent < big; sent += len(chunk) {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		default:
			io.WriteString(w, "ok")
		}
	})
	sc := startSidecar(t, `
[server]
max_connections = 20000
header_timeout = "5s"
`+routeTo(be.url(), ""))
	hold := chaosLen(3*time.Second, 20*time.Second)
	const workers = 4
	tr := startTraffic(t, []string{sc.url("/")}, workers, nil)
	time.Sleep(500 * time.Millisecond)
	goroutines, fds := sc.metric("go_goroutines"), sc.openFDs()
	q0 := time.Now()
	time.Sleep(hold)
	quiet := tr.phase(q0, time.Now())

	// 10,000 idle connections that never send a byte (fewer only if this
	// process may not open that many files: then the log says so).
	idle := 10_000
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && int(lim.Cur) < idle+1000 {
		idle = max(1000, int(lim.Cur)-1000)
		t.Logf("open-file limit %d: holding %d idle connections instead of 10,000", lim.Cur, idle)
	}
	var conns []net.Conn
	for len(conns) < idle {
		c, err := net.Dial("tcp", sc.Addr)
		if err != nil {
			t.Fatalf("idle connection %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	h0 := time.Now()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var slowloris, uploadsAborted, downloadsAborted atomic.Int64
	// Slowloris: a header byte every 100 ms, never finishing the head.
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := net.Dial("tcp", sc.Addr)
				if err != nil {
					return
				}
				slowloris.Add(1)
				head := "GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + strings.Repeat("a", 1000)
				for j := 0; j < len(head); j++ {
					if _, err := c.Write([]byte{head[j]}); err != nil {
						break
					}
					select {
					case <-stop:
						c.Close()
						return
					case <-time.After(100 * time.Millisecond):
					}
				}
				c.Close()
			}
		}()
	}
	// Aborted uploads: announce 8 MiB, send 256 KiB, reset the connection.
	// Aborted downloads: ask for 64 MiB, read 256 KiB, reset the connection.
	// Each runs every 5 ms on a new connection until stop; the connection
	// is then reset, as a crashing or cancelled client does.
	aborter := func(half func(c net.Conn) bool, counted *atomic.Int64) {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			c, err := net.Dial("tcp", sc.Addr)
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(2 * time.Second))
			ok := half(c)
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
			if ok {
				counted.Add(1)
			}
		}
	}
	upload := func(c net.Conn) bool {
		fmt.Fprintf(c, "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", 8<<20)
		for k := 0; k < 4; k++ {
			c.Write(chunk)
		}
		time.Sleep(5 * time.Millisecond)
		return true
	}
	download := func(c net.Conn) bool {
		io.WriteString(c, "GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
		buf := make([]byte, 64<<10)
		got := 0
		for got < 256<<10 {
			n, err := c.Read(buf)
			if err != nil {
				break
			}
			got += n
		}
		return got >= 256<<10
	}
	for i := 0; i < 4; i++ {
		wg.Add(2)
		go aborter(upload, &uploadsAborted)
		go aborter(download, &downloadsAborted)
	}
	time.Sleep(hold)
	hostile := tr.phase(h0, time.Now())
	rss := sc.statusField("VmRSS")
	close(stop)
	wg.Wait()
	tr.halt()
	for _, c := range conns {
		c.Close()
	}
	conns = nil

	if quiet.n == 0 || hostile.n == 0 {
		t.Fatalf("no traffic measured: quiet %v, hostile %v", quiet, hostile)
	}
	for name, p := range map[string]phase{"quiet": quiet, "hostile": hostile} {
		if p.codes[200] != p.n {
			t.Errorf("well-behaved clients during the %s phase: %v (first error %v)", name, p, p.firstErr)
		}
	}
	if uploadsAborted.Load() == 0 || downloadsAborted.Load() == 0 || slowloris.Load() < 100 {
		t.Errorf("the hostile clients did not run: %d aborted uploads, %d aborted downloads, %d slowloris",
			uploadsAborted.Load(), downloadsAborted.Load(), slowloris.Load())
	}
	if odd := tr.firstOdd.Load(); odd != nil {
		t.Logf("first answer other than 200: %s", *odd)
	}
	t.Logf("quiet:   %v", quiet)
	t.Logf("hostile: %v (%d idle connections, %d slowloris, %d aborted uploads, %d aborted downloads)",
		hostile, idle, slowloris.Load(), uploadsAborted.Load(), downloadsAborted.Load())
	t.Logf("p99 hostile/quiet: %.2f; sidecar RSS with %d idle connections: %.1f MiB",
		float64(hostile.p99)/float64(quiet.p99), idle, float64(rss)/(1<<20))
	sc.settlesTo(t, goroutines, fds, 4)
}
