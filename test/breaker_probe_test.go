package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// faultyUpstream is a raw upstream whose answer a test switches: "ok"
// (200 "upstream ok"), or one fault: "hang" (no answer: the sidecar's
// response_timeout fires), "reset" (RST after the request), "fin" (a clean
// close without a response), "garbage" (bytes that are not HTTP) or "5xx"
// (a 503, a failure status of the breaker). It counts the request heads it
// reads.
type faultyUpstream struct {
	url  string
	mode atomic.Pointer[string]
	hits atomic.Int64
}

func startFaulty(t *testing.T) *faultyUpstream {
	f := &faultyUpstream{}
	f.set("ok")
	f.url = rawBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			if _, err := readRequestHead(br); err != nil {
				return
			}
			f.hits.Add(1)
			switch *f.mode.Load() {
			case "ok":
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nupstream ok")
				continue // keep-alive
			case "hang":
				io.Copy(io.Discard, br) // until the sidecar gives up and closes
			case "reset":
				c.(*net.TCPConn).SetLinger(0)
			case "fin":
			case "garbage":
				io.WriteString(c, "\x16\x03\x01\x00\xa5garbage \x00\xff not http\r\n\r\n")
			case "5xx":
				io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
				continue
			}
			return
		}
	})
	return f
}

func (f *faultyUpstream) set(mode string) { f.mode.Store(&mode) }

// probeConfig: volume_threshold 5 (50 %), a fixed fallback, no retries.
func probeConfig(upstreamURL, sleep string, extra string) string {
	return extra + routeTo(upstreamURL, fmt.Sprintf(`
response_timeout = "300ms"
retries = 0
[upstreams.app.breaker]
volume_threshold = 5
error_percent = 50
sleep_window = %q
[upstreams.app.fallback]
status = 503
content_type = "text/plain"
body = "fallback"
`, sleep))
}

// awaitClosed polls (every 25 ms) until the upstream answers through the
// sidecar and returns when it did (or the deadline's time, after an
// error).
func awaitClosed(t *testing.T, sc *sidecar, deadline time.Time) time.Time {
	t.Helper()
	for {
		resp, body := get(t, sc.url("/"), nil)
		if resp.StatusCode == 200 && body == "upstream ok" {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Errorf("the circuit never closed after the upstream recovered")
			return time.Now()
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// For each kind of upstream fault, in series on one circuit as in the bug
// report (issue 13, point 7): a healthy spell, failures until the circuit
// opens (the last failure trips it: no request is refused), the upstream
// recovers, and nothing is sent for the sleep window. The first request
// after it must be the probe: it reaches the upstream and closes the
// circuit. Before the fix the sleep window began at that request (hystrix
// opens only when an IsOpen call sees its window, updated on its own
// goroutine, unhealthy): it got the fallback, and the circuit closed one
// more sleep window later, or not for 10 s when the two windows disagreed.
// Then the same with a request every 25 ms: the upstream sees only the
// probe, which closes the circuit a sleep window after the trip.
func TestBreakerProbeAfterEachFault(t *testing.T) {
	const sleep = time.Second
	up := startFaulty(t)
	sc := startSidecar(t, probeConfig(up.url, sleep.String(), "[access_log]\nenabled = true\n"))
	state := func() float64 { return sc.metric(`sidecar_breaker_state{circuit="upstream:app"}`) }
	// trip runs a healthy spell of 5 requests, then kind's failures until
	// the circuit opens, and returns when the last one came back.
	trip := func(t *testing.T, kind string) time.Time {
		t.Helper()
		up.set("ok")
		for i := 0; i < 5; i++ {
			if resp, body := get(t, sc.url("/"), nil); resp.StatusCode != 200 || body != "upstream ok" {
				t.Fatalf("healthy spell: %d %q %v", resp.StatusCode, body, resp.Header)
			}
		}
		up.set(kind)
		for i := 1; ; i++ {
			if i > 20 {
				t.Fatalf("%d %s failures did not open the circuit", i-1, kind)
			}
			resp, body := get(t, sc.url("/"), nil)
			if resp.StatusCode == 200 || resp.Header.Get("X-Sidecar-Fallback") == "open" {
				t.Fatalf("failure %d (%s): %d %q %v", i, kind, resp.StatusCode, body, resp.Header)
			}
			if state() == 1 {
				return time.Now()
			}
		}
	}
	for _, kind := range []string{"hang", "reset", "fin", "garbage", "5xx"} {
		t.Run(kind, func(t *testing.T) {
			// Quiet: nothing is sent for the sleep window.
			tripped := trip(t, kind)
			up.set("ok")
			before := up.hits.Load()
			time.Sleep(time.Until(tripped.Add(sleep + 100*time.Millisecond)))
			resp, body := get(t, sc.url("/"), nil)
			closed := time.Now()
			if resp.StatusCode != 200 || body != "upstream ok" {
				t.Errorf("quiet: the first request %v after the trip got %d %q (X-Sidecar-Fallback %q), want the probe's answer; the upstream got %d requests",
					closed.Sub(tripped).Round(time.Millisecond), resp.StatusCode, body, resp.Header.Get("X-Sidecar-Fallback"), up.hits.Load()-before)
				closed = awaitClosed(t, sc, time.Now().Add(3*sleep))
			} else if got := up.hits.Load() - before; got != 1 {
				t.Errorf("quiet: the upstream got %d requests for one probe", got)
			}
			if st := state(); st != 0 {
				t.Errorf("quiet: state gauge %v after the probe's success, want 0", st)
			}
			quiet := closed.Sub(tripped)

			// Busy: a request every 25 ms; the upstream sees only the probe.
			tripped = trip(t, kind)
			up.set("ok")
			before = up.hits.Load()
			closed = awaitClosed(t, sc, time.Now().Add(3*sleep))
			busy := closed.Sub(tripped)
			if got := up.hits.Load() - before; got != 1 {
				t.Errorf("busy: the upstream got %d requests until the circuit closed, want 1 (the probe)", got)
			}
			if busy < sleep-50*time.Millisecond || busy > sleep+time.Second {
				t.Errorf("busy: closed %v after the trip, want the sleep window (%v) plus one probe", busy, sleep)
			}
			t.Logf("%-7s closed after the trip: quiet %v (first request at +%v), busy %v (sleep_window %v)", kind,
				quiet.Round(time.Millisecond), sleep+100*time.Millisecond, busy.Round(time.Millisecond), sleep)
		})
	}
}

// The exact sequence of the bug report: sleep_window 2s, volume 5, a
// fallback. Trip; a probe closes; 5 requests; 2.2 s; 5 failures; 2.1 s
// later one request must reach the upstream (it was the fallback, four
// runs out of four, and the upstream never saw it).
func TestBreakerProbeBugReportSequence(t *testing.T) {
	be, failing, hits := failingBackend(t)
	sc := startSidecar(t, probeConfig(be.url(), "2s", ""))
	probe := func(step string, since time.Time) {
		t.Helper()
		failing.Store(false)
		before := hits.Load()
		resp, body := get(t, sc.url("/"), nil)
		if resp.StatusCode != 200 || body != "upstream ok" || hits.Load()-before != 1 {
			t.Errorf("%s: the request %v later got %d %q (X-Sidecar-Fallback %q), the upstream %d requests; want the probe",
				step, time.Since(since).Round(time.Millisecond), resp.StatusCode, body, resp.Header.Get("X-Sidecar-Fallback"), hits.Load()-before)
			closed := awaitClosed(t, sc, time.Now().Add(6*time.Second))
			t.Logf("%s: closed %v after the trip", step, closed.Sub(since).Round(time.Millisecond))
			return
		}
		t.Logf("%s: the probe %v after the trip closed the circuit", step, time.Since(since).Round(time.Millisecond))
	}

	failing.Store(true)
	var opened time.Time
	for i := 0; i < 20 && opened.IsZero(); i++ {
		if resp, _ := get(t, sc.url("/"), nil); resp.Header.Get("X-Sidecar-Fallback") == "open" {
			opened = time.Now()
		}
	}
	if opened.IsZero() {
		t.Fatal("circuit never opened")
	}
	time.Sleep(2100 * time.Millisecond)
	probe("first trip", opened)

	for i := 0; i < 5; i++ {
		if resp, _ := get(t, sc.url("/"), nil); resp.StatusCode != 200 {
			t.Fatalf("request %d after the close: %d", i+1, resp.StatusCode)
		}
	}
	time.Sleep(2200 * time.Millisecond)
	failing.Store(true)
	before := hits.Load()
	for i := 0; i < 5; i++ {
		if resp, _ := get(t, sc.url("/"), nil); resp.StatusCode != 503 || resp.Header.Get("X-Sidecar-Fallback") != "" {
			t.Fatalf("failure %d: %d %v, want the upstream's 503", i+1, resp.StatusCode, resp.Header)
		}
	}
	if got := hits.Load() - before; got != 5 {
		t.Fatalf("the upstream got %d of the 5 failing requests", got)
	}
	// Do these 5 open the circuit? hystrix counts the probe's success in
	// the window it empties on closing: 6 successes and 5 failures (45 %),
	// and ours now agrees. Before the fix ours left the probe out (50 %):
	// it refused every request, while hystrix, never open, let no probe
	// through. Fail until it opens (quietly: nothing is refused), then
	// the first request after the sleep window must be the probe.
	extra := 0
	for sc.metric(`sidecar_breaker_state{circuit="upstream:app"}`) != 1 {
		if extra++; extra > 20 {
			t.Fatal("the circuit did not open again")
		}
		if resp, _ := get(t, sc.url("/"), nil); resp.StatusCode != 503 || resp.Header.Get("X-Sidecar-Fallback") != "" {
			t.Fatalf("failure %d: %d %v, want the upstream's 503", 5+extra, resp.StatusCode, resp.Header)
		}
	}
	tripped := time.Now()
	time.Sleep(2100 * time.Millisecond)
	probe(fmt.Sprintf("second trip (after 5+%d failures)", extra), tripped)
	opens := sc.metric(`sidecar_breaker_transitions_total{circuit="upstream:app",to="open"}`)
	if closes := sc.metric(`sidecar_breaker_transitions_total{circuit="upstream:app",to="closed"}`); closes != opens {
		t.Errorf("%v transitions to open, %v to closed", opens, closes)
	}
	if v := sc.metric(`sidecar_breaker_state{circuit="upstream:app"}`); v != 0 {
		t.Errorf("state gauge %v at the end, want 0", v)
	}
}
