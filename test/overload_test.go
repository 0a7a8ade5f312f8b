package test

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// capacityBackend is a real HTTP server on 127.0.0.1 that holds the
// requests to /hold/NAME until release(NAME) (or 10 s), answers others at
// once, and records the most requests it ever had in flight.
type capacityBackend struct {
	*backend
	inFlight, peak atomic.Int64
	mu             sync.Mutex
	gates          map[string]chan struct{}
}

func startCapacityBackend(t *testing.T) *capacityBackend {
	cb := &capacityBackend{gates: map[string]chan struct{}{}}
	cb.backend = startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		n := cb.inFlight.Add(1)
		defer cb.inFlight.Add(-1)
		for p := cb.peak.Load(); n > p && !cb.peak.CompareAndSwap(p, n); p = cb.peak.Load() {
		}
		if name, ok := strings.CutPrefix(r.URL.Path, "/hold/"); ok {
			select {
			case <-cb.gate(name):
			case <-time.After(10 * time.Second):
			}
		} else if r.URL.Path == "/slow" {
			time.Sleep(20 * time.Millisecond)
		}
		fmt.Fprint(w, "ok")
	})
	return cb
}

func (cb *capacityBackend) gate(name string) chan struct{} {
	cb.mu.Lock()
	defer cb.mu.Unlock()
	g := cb.gates[name]
	if g == nil {
		g = make(chan struct{})
		cb.gates[name] = g
	}
	return g
}

func (cb *capacityBackend) release(name string) { close(cb.gate(name)) }

// waitInFlight waits (at most 5 s) until the backend holds n requests.
func (cb *capacityBackend) waitInFlight(t *testing.T, n int64) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); cb.inFlight.Load() != n; time.Sleep(2 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("backend has %d requests in flight, want %d", cb.inFlight.Load(), n)
		}
	}
}

// answer is what a client got: for requests sent from goroutines, where a
// test cannot Fatal.
type answer struct {
	status   int
	fallback string
	retry    string
	err      error
}

func send(url, apiKey string) answer {
	req, _ := http.NewRequest("GET", url, nil)
	if apiKey != "" {
		req.Header.Set("X-API-Key", apiKey)
	} else {
		// An anonymous client's claims of the top tier, in two spellings:
		// its priority is its verified tier's, never a field it sends.
		req.Header.Set("X-Sidecar-Tier", "premium")
		req.Header["X_sidecar_tier"] = []string{"premium"}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return answer{err: err}
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return answer{status: resp.StatusCode, fallback: resp.Header.Get("X-Sidecar-Fallback"), retry: resp.Header.Get("Retry-After")}
}

func (a answer) shed() bool {
	return a.err == nil && a.status == 503 && a.fallback == "shed" && a.retry == "1"
}

const overloadConfig = `
[identity]
api_keys_file = "keys.toml"

# 7 a minute: the 3 held and 4 concurrent extra requests are all admitted
# by the rate limit before any of them is shed; only refunds leave room
# for the 2 after them.
[tiers.anonymous]
limit = 7
window = "1m"

[tiers.premium]
limit = 1000
window = "1m"
priority = 100

[upstreams.app]
url = %q

# A fixed limit of 4 (the bounds pin it): 3 slots for anonymous, the 4th
# reserved for premium; one queue place.
[upstreams.app.overload]
min_limit = 4
max_limit = 4
initial_limit = 4
reserved = 0.25
queue_size = 1
queue_timeout = "2s"

[upstreams.app.breaker]
consecutive_failures = 1

[[routes]]
name = "app"
upstream = "app"
`

// Cause and effect against a backend with a fixed capacity: with the
// lower priorities' share of the limit full, anonymous requests are shed
// at once (503, X-Sidecar-Fallback: shed, Retry-After) or after their
// queue wait, while premium is admitted in the reserved slot; a premium
// arrival takes a full queue's place from an anonymous waiter; shed
// requests are given back to the rate limit and are no breaker failures;
// and the upstream never has more than the limit in flight.
func TestOverloadProtectsPremium(t *testing.T) {
	cb := startCapacityBackend(t)
	dir := t.TempDir()
	writeKeys(t, dir) // "acme-secret-key": premium
	sc := startSidecarIn(t, dir, fmt.Sprintf(overloadConfig, cb.url()))
	const premium = "acme-secret-key"

	// Anonymous fills its 3 slots.
	held := make(chan answer, 4)
	for i := range 3 {
		go func() { held <- send(sc.url(fmt.Sprintf("/hold/a%d", i)), "") }()
	}
	cb.waitInFlight(t, 3)

	// More anonymous requests: one waits in the queue for its 2 s and is
	// shed; the others find the queue full and are shed at once.
	var wg sync.WaitGroup
	extra := make([]answer, 4)
	start := time.Now()
	for i := range extra {
		wg.Add(1)
		go func() { defer wg.Done(); extra[i] = send(sc.url("/fast"), "") }()
	}
	// Meanwhile premium gets the reserved slot, at once.
	if a := send(sc.url("/fast"), premium); a.err != nil || a.status != 200 {
		t.Fatalf("premium with anonymous at its share of the limit: %+v, want 200", a)
	}
	wg.Wait()
	waited := time.Since(start)
	for i, a := range extra {
		if !a.shed() {
			t.Errorf("anonymous request %d beyond its share: %+v, want 503 shed with Retry-After 1", i, a)
		}
	}
	if waited < 2*time.Second {
		t.Errorf("the queued anonymous request was shed after %v, before its 2 s queue timeout", waited)
	}
	t.Logf("anonymous shed: 3 at once, 1 after its queue wait (%v)", waited.Round(time.Millisecond))

	// Premium holds the 4th slot; an anonymous request waits in the one
	// queue place; a premium arrival takes it, and is admitted as soon as
	// a slot frees.
	go func() { held <- send(sc.url("/hold/p"), premium) }()
	cb.waitInFlight(t, 4)
	evicted := make(chan answer, 1)
	go func() { evicted <- send(sc.url("/fast"), "") }()
	waitMetric(t, sc, `sidecar_overload_queued{upstream="app"}`, 1)
	queued := make(chan answer, 1)
	go func() { queued <- send(sc.url("/fast"), premium) }()
	select {
	case a := <-evicted:
		if !a.shed() {
			t.Errorf("the anonymous waiter a premium arrival replaced: %+v, want 503 shed", a)
		}
	case <-time.After(1500 * time.Millisecond): // before its own 2 s queue timeout
		t.Fatal("the anonymous waiter was not evicted by a premium arrival")
	}
	select {
	case a := <-queued:
		t.Fatalf("premium answered while the limit was full: %+v", a)
	case <-time.After(100 * time.Millisecond):
	}
	cb.release("a0")
	if a := <-queued; a.err != nil || a.status != 200 {
		t.Errorf("queued premium after a slot freed: %+v, want 200", a)
	}
	for _, name := range []string{"a1", "a2", "p"} {
		cb.release(name)
	}
	for range 4 {
		if a := <-held; a.err != nil || a.status != 200 {
			t.Errorf("a held request: %+v, want 200", a)
		}
	}

	// Five anonymous requests were shed and given back: of its 7 a minute,
	// anonymous has spent 3, so the 4th is admitted (without refunds the
	// evicted one above was the 8th, refused with 429, and this is the 9th),
	// and the circuit (open after one failure)
	// stayed closed.
	if a := send(sc.url("/fast"), ""); a.status != 200 {
		t.Errorf("anonymous after 5 shed requests, 3 of its 7 spent: %+v, want 200 (shed requests are not charged)", a)
	}
	for series, want := range map[string]float64{
		`sidecar_overload_shed_total{upstream="app",tier="anonymous"}`: 5,
		`sidecar_fallbacks_total{upstream="app",reason="shed"}`:        5,
		`sidecar_overload_limit{upstream="app"}`:                       4,
		`sidecar_breaker_state{circuit="upstream:app"}`:                0,
		`sidecar_overload_in_flight{upstream="app"}`:                   0,
	} {
		if got := sc.metric(series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if got := sc.metric(`sidecar_overload_queue_wait_seconds_count{upstream="app"}`); got < 3 {
		t.Errorf("queue waits recorded: %v, want the 3 requests that waited", got)
	}

	// A flood of premium requests: the upstream never has more than the
	// limit in flight, and whatever is not admitted is shed.
	cb.peak.Store(0)
	flood := make([]answer, 40)
	for i := range flood {
		wg.Add(1)
		go func() { defer wg.Done(); flood[i] = send(sc.url("/slow"), premium) }()
	}
	wg.Wait()
	ok, shed := 0, 0
	for _, a := range flood {
		switch {
		case a.err == nil && a.status == 200:
			ok++
		case a.shed():
			shed++
		default:
			t.Errorf("flood: %+v, want 200 or shed", a)
		}
	}
	if peak := cb.peak.Load(); peak > 4 || peak < 1 {
		t.Errorf("the upstream had %d requests in flight at most, want at most the limit 4", peak)
	}
	t.Logf("flood of 40 premium requests: %d served, %d shed, upstream peak in flight %d", ok, shed, cb.peak.Load())
}
