package test

import (
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"time"
)

// flaky is a backend whose /healthz can be switched off and that counts
// the other requests it serves.
type flaky struct {
	*backend
	down atomic.Bool
	hits atomic.Int64
}

func startFlaky(t *testing.T, name string) *flaky {
	f := &flaky{}
	f.backend = startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			if f.down.Load() {
				w.WriteHeader(500)
			}
			return
		}
		f.hits.Add(1)
		io.WriteString(w, name)
	})
	return f
}

func waitMetric(t *testing.T, sc *sidecar, series string, want float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for sc.metric(series) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s never became %v (is %v)", series, want, sc.metric(series))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestActiveHealthChecks(t *testing.T) {
	a, b := startFlaky(t, "A"), startFlaky(t, "B")
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.app]
urls = [%q, %q]
required_for_readiness = true
[upstreams.app.health_check]
path = "/healthz"
interval = "50ms"
healthy_threshold = 1
unhealthy_threshold = 2
[[routes]]
upstream = "app"
`, a.url(), b.url()))
	const gauge = `sidecar_upstream_healthy_endpoints{upstream="app"}`
	waitMetric(t, sc, gauge, 2)
	a.down.Store(true)
	waitMetric(t, sc, gauge, 1)
	before := a.hits.Load()
	for i := 0; i < 20; i++ {
		if resp, body := get(t, sc.url("/"), nil); resp.StatusCode != 200 || body != "B" {
			t.Fatalf("with A failing its checks: %d %q", resp.StatusCode, body)
		}
	}
	if a.hits.Load() != before {
		t.Errorf("an endpoint failing its health checks got traffic")
	}
	// Both down: /readyz fails (the upstream is required for readiness).
	b.down.Store(true)
	waitMetric(t, sc, gauge, 0)
	if resp, body := get(t, "http://"+sc.Admin+"/readyz", nil); resp.StatusCode != 503 {
		t.Errorf("/readyz with no usable endpoint: %d %q", resp.StatusCode, body)
	}
	a.down.Store(false)
	b.down.Store(false)
	waitMetric(t, sc, gauge, 2)
	if resp, _ := get(t, "http://"+sc.Admin+"/readyz", nil); resp.StatusCode != 200 {
		t.Errorf("/readyz after recovery: %d", resp.StatusCode)
	}
	seen := map[string]int{}
	for i := 0; i < 10; i++ {
		_, body := get(t, sc.url("/"), nil)
		seen[body]++
	}
	if seen["A"] == 0 {
		t.Errorf("a recovered endpoint got no traffic: %v", seen)
	}
}

func TestConnectFailureRetriedAndEndpointEjected(t *testing.T) {
	b := startFlaky(t, "B")
	dead := "http://" + freeAddr(t)
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.app]
urls = [%q, %q]
passive_failures = 3
passive_ejection = "1m"
[[routes]]
upstream = "app"
`, dead, b.url()))
	for i := 0; i < 20; i++ {
		if resp, body := get(t, sc.url("/"), nil); resp.StatusCode != 200 || body != "B" {
			t.Fatalf("request %d with one dead endpoint: %d %q", i, resp.StatusCode, body)
		}
	}
	retries := sc.metric(`sidecar_upstream_retries_total{upstream="app"}`)
	if retries < 1 || retries > 3 {
		t.Errorf("retries %v: want a retry per refused connection until the dead endpoint is ejected after 3", retries)
	}
	if v := sc.metric(`sidecar_upstream_healthy_endpoints{upstream="app"}`); v != 1 {
		t.Errorf("usable endpoints %v after ejection, want 1", v)
	}
}

func TestRetryBudgetCapsRetries(t *testing.T) {
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.app]
urls = ["http://%s", "http://%s"]
passive_failures = 0
retries = 1
retry_budget = 0.2
[upstreams.app.breaker]
enabled = false   # count the retries of every request, without a circuit cutting them short
[[routes]]
upstream = "app"
`, freeAddr(t), freeAddr(t)))
	for i := 0; i < 100; i++ {
		if resp, _ := get(t, sc.url("/"), nil); resp.StatusCode != 502 {
			t.Fatalf("all endpoints dead: %d", resp.StatusCode)
		}
	}
	retries := sc.metric(`sidecar_upstream_retries_total{upstream="app"}`)
	t.Logf("100 requests to an upstream with every endpoint down: %v retries", retries)
	if retries > 0.2*100+3 {
		t.Errorf("%v retries for 100 requests: over the 20%% budget", retries)
	}
	if retries < 15 {
		t.Errorf("%v retries: the budget should allow about 20", retries)
	}
}

func TestLeastConnections(t *testing.T) {
	release := make(chan struct{})
	var slowHits atomic.Int64
	slow := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		slowHits.Add(1)
		<-release
	})
	defer close(release)
	fast := startFlaky(t, "fast")
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.app]
urls = [%q, %q]
balance = "least_connections"
[[routes]]
upstream = "app"
`, slow.url(), fast.url()))
	// Occupy the slow endpoint, then send more: they all go to the idle one.
	go func() {
		for i := 0; i < 2; i++ {
			go func() {
				if resp, err := http.Get(sc.url("/hold")); err == nil {
					resp.Body.Close()
				}
			}()
		}
	}()
	for slowHits.Load() < 1 {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	held := slowHits.Load()
	for i := 0; i < 20; i++ {
		if resp, body := get(t, sc.url("/"), nil); resp.StatusCode != 200 || body != "fast" {
			t.Fatalf("request %d went to the busy endpoint: %d %q", i, resp.StatusCode, body)
		}
	}
	if slowHits.Load() != held {
		t.Errorf("least_connections sent new requests to the endpoint with requests in flight")
	}
}
