package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// failingBackend answers "upstream ok", or 503 while *failing is set,
// and counts the requests it got in *hits.
func failingBackend(t *testing.T) (be *backend, failing *atomic.Bool, hits *atomic.Int64) {
	failing, hits = new(atomic.Bool), new(atomic.Int64)
	be = startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if failing.Load() {
			w.WriteHeader(503)
			return
		}
		io.WriteString(w, "upstream ok")
	})
	return be, failing, hits
}

// waitClosed asks until the upstream answers again: the probe after the
// sleep window closed the circuit.
func waitClosed(t *testing.T, sc *sidecar) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; {
		resp, body := get(t, sc.url("/"), nil)
		if resp.StatusCode == 200 && body == "upstream ok" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("circuit never closed after the upstream recovered")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestCircuitOpensServesFallbackAndRecovers(t *testing.T) {
	be, failing, hits := failingBackend(t)
	sc := startSidecar(t, routeTo(be.url(), `
[upstreams.app.breaker]
error_percent = 50
volume_threshold = 10
sleep_window = "1s"
[upstreams.app.fallback]
status = 503
content_type = "application/json"
body = '{"error":"try again soon"}'
`))
	failing.Store(true)
	opened := false
	for i := 0; i < 100 && !opened; i++ {
		resp, _ := get(t, sc.url("/"), nil)
		opened = resp.Header.Get("X-Sidecar-Fallback") == "open"
	}
	if !opened {
		t.Fatal("circuit never opened")
	}
	// 10 failures cross the thresholds (volume 10, 100 % errors); hystrix
	// decides on its own goroutine, so a few more may get through.
	if late := hits.Load() - 10; late > 5 {
		t.Errorf("%d requests reached the failing upstream after the thresholds were crossed", late)
	} else {
		t.Logf("requests that reached the failing upstream after the thresholds were crossed: %d", late)
	}
	before := hits.Load()
	_, connsBefore := be.counts()
	start := time.Now()
	for i := 0; i < 50; i++ {
		resp, body := get(t, sc.url("/"), nil)
		if resp.StatusCode != 503 || body != `{"error":"try again soon"}` || resp.Header.Get("X-Sidecar-Fallback") != "open" ||
			resp.Header.Get("Retry-After") == "" {
			t.Fatalf("while open: %d %q %v", resp.StatusCode, body, resp.Header)
		}
	}
	t.Logf("fallback while open: %v per request (client round trip included)", (time.Since(start) / 50).Round(time.Microsecond))
	if got := hits.Load() - before; got != 0 {
		t.Errorf("the backend got %d requests while the circuit was open", got)
	}
	if _, conns := be.counts(); conns != connsBefore {
		t.Errorf("the sidecar dialled the backend %d times while the circuit was open", conns-connsBefore)
	}
	if v := sc.metric(`sidecar_breaker_state{circuit="upstream:app"}`); v != 1 && v != 2 {
		t.Errorf("breaker state gauge %v", v)
	}
	// The upstream recovers; after the sleep window a probe closes the circuit.
	failing.Store(false)
	waitClosed(t, sc)
	for i := 0; i < 10; i++ {
		if resp, _ := get(t, sc.url("/"), nil); resp.StatusCode != 200 {
			t.Fatalf("after recovery: %d", resp.StatusCode)
		}
	}
	if sc.metric(`sidecar_breaker_transitions_total{circuit="upstream:app",to="closed"}`) < 1 {
		t.Errorf("closing not counted")
	}
}

func TestBulkheadGivesFallbackAtOnce(t *testing.T) {
	release := make(chan struct{})
	var hits atomic.Int64
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		<-release
	})
	sc := startSidecar(t, routeTo(be.url(), "[upstreams.app.breaker]\nmax_concurrent = 2\n"))
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if resp, err := http.Get(sc.url("/slow")); err == nil {
				resp.Body.Close()
			}
		}()
	}
	for hits.Load() < 2 {
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	resp, _ := get(t, sc.url("/third"), nil)
	took := time.Since(start)
	close(release)
	wg.Wait()
	if resp.StatusCode != 503 || resp.Header.Get("X-Sidecar-Fallback") != "saturated" {
		t.Errorf("third concurrent request: %d %q", resp.StatusCode, resp.Header.Get("X-Sidecar-Fallback"))
	}
	if hits.Load() != 2 {
		t.Errorf("backend got %d requests with max_concurrent 2", hits.Load())
	}
	t.Logf("saturated fallback answered in %v (without queueing behind the slow upstream)", took.Round(time.Microsecond))
	if v := sc.metric(`sidecar_bulkhead_rejections_total{upstream="app"}`); v != 1 {
		t.Errorf("bulkhead rejections counted %v", v)
	}
}

func TestFallbackUpstreamAndTimeoutFallback(t *testing.T) {
	readonly := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "read-only copy") })
	slow := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
	})
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.primary]
url = "http://%s"
[upstreams.primary.fallback]
upstream = "readonly"
[upstreams.readonly]
url = %q
[upstreams.slow]
url = %q
response_timeout = "200ms"
[upstreams.slow.fallback]
status = 200
content_type = "text/plain"
body = "cached answer"
[[routes]]
path_prefix = "/slow"
upstream = "slow"
[[routes]]
upstream = "primary"
`, freeAddr(t), readonly.url(), slow.url()))
	resp, body := get(t, sc.url("/"), nil)
	if resp.StatusCode != 200 || body != "read-only copy" || resp.Header.Get("X-Sidecar-Fallback") != "error" {
		t.Errorf("refused primary: %d %q %q", resp.StatusCode, body, resp.Header.Get("X-Sidecar-Fallback"))
	}
	resp, body = get(t, sc.url("/slow"), nil)
	if resp.StatusCode != 200 || body != "cached answer" || resp.Header.Get("X-Sidecar-Fallback") != "timeout" {
		t.Errorf("timed-out upstream: %d %q %q", resp.StatusCode, body, resp.Header.Get("X-Sidecar-Fallback"))
	}
	if v := sc.metric(`sidecar_fallbacks_total{upstream="slow",reason="timeout"}`); v != 1 {
		t.Errorf("timeout fallbacks counted %v", v)
	}
}

func TestReloadChangesBulkheadSize(t *testing.T) {
	release := make(chan struct{})
	var hits atomic.Int64
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		<-release
	})
	defer close(release)
	sc := startSidecar(t, routeTo(be.url(), "[upstreams.app.breaker]\nmax_concurrent = 1\n"))
	go func() {
		if resp, err := http.Get(sc.url("/a")); err == nil {
			resp.Body.Close()
		}
	}()
	for hits.Load() < 1 {
		time.Sleep(5 * time.Millisecond)
	}
	if resp, _ := get(t, sc.url("/b"), nil); resp.StatusCode != 503 {
		t.Fatalf("second request with max_concurrent 1: %d", resp.StatusCode)
	}
	sc.writeConfig(routeTo(be.url(), "[upstreams.app.breaker]\nmax_concurrent = 3\n"))
	deadline := time.Now().Add(5 * time.Second)
	for hits.Load() < 2 && time.Now().Before(deadline) {
		go func() {
			if resp, err := http.Get(sc.url("/c")); err == nil {
				resp.Body.Close()
			}
		}()
		time.Sleep(100 * time.Millisecond)
	}
	if hits.Load() < 2 {
		t.Errorf("max_concurrent raised by reload did not take effect")
	}
}

func TestStatusEndpoint(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, routeTo(be.url(), "[upstreams.app.breaker]\nmax_concurrent = 5\n"))
	get(t, sc.url("/"), nil)
	resp, body := get(t, "http://"+sc.Admin+"/status", nil)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("/status: %d %q", resp.StatusCode, body)
	}
	for _, want := range []string{`"name": "upstream:app"`, `"state": "closed"`, `"addr": "` + be.Addr + `"`, `"idle_connections": 1`, `"store": "memory"`} {
		if !strings.Contains(body, want) {
			t.Errorf("/status lacks %s:\n%s", want, body)
		}
	}
}

func TestRouteWithItsOwnCircuit(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/broken" {
			w.WriteHeader(502)
		}
	})
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.app]
url = %q
[upstreams.app.breaker]
volume_threshold = 5
sleep_window = "1m"
[[routes]]
name = "broken"
path_prefix = "/broken"
upstream = "app"
own_circuit = true
[[routes]]
name = "rest"
upstream = "app"
`, be.url()))
	opened := false
	for i := 0; i < 50 && !opened; i++ {
		resp, _ := get(t, sc.url("/broken"), nil)
		opened = resp.Header.Get("X-Sidecar-Fallback") == "open"
	}
	if !opened {
		t.Fatal("the route's circuit never opened")
	}
	for i := 0; i < 10; i++ {
		if resp, _ := get(t, sc.url("/fine"), nil); resp.StatusCode != 200 {
			t.Fatalf("another route of the same upstream was cut off: %d", resp.StatusCode)
		}
	}
	if v := sc.metric(`sidecar_breaker_state{circuit="route:broken"}`); v != 1 {
		t.Errorf("route circuit state %v", v)
	}
	if v := sc.metric(`sidecar_breaker_state{circuit="upstream:app"}`); v != 0 {
		t.Errorf("upstream circuit state %v", v)
	}
}

// After a healthy spell, consecutive_failures cuts a failing upstream off
// after that many failures in a row, where the window's percentage (3 of
// 43 here) would have kept sending it traffic; a reload does not close the
// circuit; the upstream's recovery does, through the probe.
func TestConsecutiveFailuresCutOffAfterHealthySpell(t *testing.T) {
	be, failing, hits := failingBackend(t)
	breakerCfg := func(sleep string) string {
		return routeTo(be.url(), fmt.Sprintf(`
[upstreams.app.breaker]
consecutive_failures = 3
sleep_window = %q
`, sleep))
	}
	sc := startSidecar(t, breakerCfg("2s"))
	for i := 0; i < 40; i++ {
		if resp, _ := get(t, sc.url("/"), nil); resp.StatusCode != 200 {
			t.Fatalf("healthy spell: %d", resp.StatusCode)
		}
	}
	failing.Store(true)
	for i := 0; i < 3; i++ {
		if resp, _ := get(t, sc.url("/"), nil); resp.StatusCode != 503 || resp.Header.Get("X-Sidecar-Fallback") == "open" {
			t.Fatalf("failure %d: %d %v, want the upstream's 503", i+1, resp.StatusCode, resp.Header)
		}
	}
	before := hits.Load()
	for i := 0; i < 20; i++ {
		if resp, _ := get(t, sc.url("/"), nil); resp.Header.Get("X-Sidecar-Fallback") != "open" {
			t.Fatalf("request %d after 3 failures in a row: %d %v, want the open-circuit fallback", i+1, resp.StatusCode, resp.Header)
		}
	}
	if got := hits.Load() - before; got != 0 {
		t.Errorf("the upstream got %d requests after the trip", got)
	}
	// A reload that changes the upstream's settings builds a new circuit:
	// it stays open. (The sleep window, 2 s, leaves the reload time even on
	// a loaded machine; after it, the next request would be the probe.)
	sc.writeConfig(breakerCfg("2100ms"))
	sc.signal(syscall.SIGHUP)
	deadline := time.Now().Add(5 * time.Second)
	for sc.metric(`sidecar_config_reloads_total{result="success"}`) < 1 {
		if time.Now().After(deadline) {
			t.Fatal("reload not applied")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if resp, _ := get(t, sc.url("/"), nil); resp.Header.Get("X-Sidecar-Fallback") != "open" {
		t.Fatalf("after the reload: %d %v, want the open-circuit fallback", resp.StatusCode, resp.Header)
	}
	if v := sc.metric(`sidecar_breaker_transitions_total{circuit="upstream:app",to="open"}`); v != 1 {
		t.Errorf("%v transitions to open, want 1 (the reload must not report another)", v)
	}
	// The upstream recovers: the probe after the sleep window closes it.
	failing.Store(false)
	waitClosed(t, sc)
	if v := sc.metric(`sidecar_breaker_transitions_total{circuit="upstream:app",to="closed"}`); v != 1 {
		t.Errorf("%v transitions to closed, want 1", v)
	}
}

// A request the bulkhead refuses goes to the fallback upstream the same
// way it would have gone to its own: its head rewritten (no client copy of
// the identity fields, X-Forwarded-For added) and its body forwarded.
// Before, the circuit's reroute skipped both: the client's forged
// X-Sidecar-Tier reached the fallback upstream, and the body did not.
func TestBulkheadRerouteRewritesTheRequest(t *testing.T) {
	release := make(chan struct{})
	var hits atomic.Int64
	primary := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		<-release
	})
	type seen struct{ tier, client, xff, body string }
	got := make(chan seen, 1)
	readonly := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- seen{r.Header.Get("X-Sidecar-Tier"), r.Header.Get("X-Sidecar-Client"), r.Header.Get("X-Forwarded-For"), string(b)}
		io.WriteString(w, "read-only copy")
	})
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.primary]
url = %q
[upstreams.primary.breaker]
max_concurrent = 1
[upstreams.primary.fallback]
upstream = "readonly"
[upstreams.readonly]
url = %q
[[routes]]
upstream = "primary"
`, primary.url(), readonly.url()))
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := http.Get(sc.url("/slow")); err == nil {
			resp.Body.Close()
		}
	}()
	for hits.Load() < 1 {
		time.Sleep(5 * time.Millisecond)
	}
	req, _ := http.NewRequest("POST", sc.url("/write"), strings.NewReader("the body"))
	req.Header.Set("X-Sidecar-Tier", "premium")
	req.Header.Set("X-Sidecar-Client", "key:admin")
	resp, err := http.DefaultClient.Do(req)
	close(release)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "read-only copy" || resp.Header.Get("X-Sidecar-Fallback") != "saturated" {
		t.Fatalf("rerouted request: %d %q %q", resp.StatusCode, b, resp.Header.Get("X-Sidecar-Fallback"))
	}
	s := <-got
	if s.tier != "anonymous" || s.client != "ip:127.0.0.1" || s.xff != "127.0.0.1" || s.body != "the body" {
		t.Errorf("the fallback upstream saw tier %q client %q X-Forwarded-For %q body %q", s.tier, s.client, s.xff, s.body)
	}
}

// TestRerouteNeverSendsAPartBody: a request whose body the sidecar has
// begun to take from the client is not rerouted to the fallback upstream
// when the write to the first upstream fails: the bytes taken are gone, and
// the fallback upstream would get a body missing its start. The primary
// resets every connection as soon as it is accepted; the client sends one
// byte of its body, pauses until the reset has reached the sidecar, then
// the rest, so the sidecar's first write upstream (head and body) fails.
func TestRerouteNeverSendsAPartBody(t *testing.T) {
	primary := rawBackend(t, func(c net.Conn) {
		_ = c.(*net.TCPConn).SetLinger(0) // closed with a reset
	})
	bodies := make(chan string, 4)
	readonly := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			b = append(b, " (cut: "+err.Error()+")"...)
		}
		bodies <- string(b)
		io.WriteString(w, "read-only copy")
	})
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.primary]
url = %q
response_timeout = "2s"
[upstreams.primary.fallback]
upstream = "readonly"
[upstreams.readonly]
url = %q
response_timeout = "2s"
[[routes]]
upstream = "primary"
`, primary, readonly.url()))
	// Whether the reset reaches the sidecar before it takes the body's
	// first byte varies: a few tries hit the case.
	for try := 0; try < 6; try++ {
		c, err := net.Dial("tcp", sc.Addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "POST /write HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\na")
		time.Sleep(200 * time.Millisecond)
		io.WriteString(c, "bcdefghij")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		c.Close()
		t.Logf("try %d: %d %q, X-Sidecar-Fallback %q", try, resp.StatusCode, b, resp.Header.Get("X-Sidecar-Fallback"))
		select {
		case got := <-bodies:
			if got != "abcdefghij" {
				t.Fatalf("the fallback upstream got body %q; the client got %d %q", got, resp.StatusCode, b)
			}
		default:
			if resp.StatusCode != 502 || resp.Header.Get("X-Sidecar-Fallback") == "" {
				t.Fatalf("not rerouted: %d %q, X-Sidecar-Fallback %q; want 502 with the reason",
					resp.StatusCode, b, resp.Header.Get("X-Sidecar-Fallback"))
			}
		}
	}
}

// A request rerouted to the fallback upstream is one of that upstream's
// requests: its bulkhead counts it and its open circuit keeps it away
// (found by a hostile review: rerouted requests skipped both).
func TestRerouteTakesTheFallbackUpstreamsCircuit(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := ln.Addr().String()
	ln.Close() // the primary refuses connections
	release := make(chan struct{})
	var hits atomic.Int64
	alt := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		switch r.URL.Path {
		case "/direct/slow":
			<-release
		case "/direct/fail":
			w.WriteHeader(503)
		}
	})
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.primary]
url = "http://%s"
[upstreams.primary.fallback]
upstream = "alt"
[upstreams.alt]
url = %q
[upstreams.alt.breaker]
max_concurrent = 1
consecutive_failures = 2
[[routes]]
path_prefix = "/direct"
upstream = "alt"
[[routes]]
upstream = "primary"
`, down, alt.url()))
	get := func(path string) (*http.Response, string) {
		resp, err := http.Get(sc.url(path))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(b)
	}
	if resp, _ := get("/x"); resp.StatusCode != 200 || resp.Header.Get("X-Sidecar-Fallback") != "error" {
		t.Fatalf("rerouted: %d %q", resp.StatusCode, resp.Header.Get("X-Sidecar-Fallback"))
	}
	// The bulkhead: one request in flight at alt fills it.
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := http.Get(sc.url("/direct/slow")); err == nil {
			resp.Body.Close()
		}
	}()
	for hits.Load() < 2 {
		time.Sleep(5 * time.Millisecond)
	}
	resp, body := get("/x")
	close(release)
	<-done
	if resp.StatusCode == 200 || hits.Load() != 2 {
		t.Errorf("rerouted while alt's bulkhead was full: %d %q, alt's requests %d (want 2)", resp.StatusCode, body, hits.Load())
	}
	// The circuit: two failures in a row open it.
	get("/direct/fail")
	get("/direct/fail")
	if resp, _ := get("/direct/x"); resp.Header.Get("X-Sidecar-Fallback") != "open" {
		t.Fatalf("alt's circuit is not open: %d %q", resp.StatusCode, resp.Header.Get("X-Sidecar-Fallback"))
	}
	before := hits.Load()
	for range 3 {
		if resp, body := get("/x"); resp.StatusCode == 200 {
			t.Errorf("rerouted to alt while its circuit is open: %d %q", resp.StatusCode, body)
		}
	}
	if n := hits.Load() - before; n != 0 {
		t.Errorf("alt got %d requests while its circuit was open", n)
	}
}
