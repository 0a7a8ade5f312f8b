package test

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// Quota leases through three sidecar processes sharing one Redis: a hot
// client under its limit is never refused, most of its requests are
// decided from leases (source="lease"), and Redis runs far fewer scripts
// than there were requests.
func TestQuotaLeasesThroughThreeSidecars(t *testing.T) {
	rs := redistest.Start(t)
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	// A long store timeout: this is about counts, on a shared machine.
	cfg := fmt.Sprintf("[rate_limit]\nstore = \"redis\"\nlease = true\nstore_timeout = \"500ms\"\n[redis]\naddrs = [%q]\n[tiers.anonymous]\nlimit = 3000\nwindow = \"1m\"\n",
		rs.Addr) + routeTo(be.url(), "")
	var replicas []*sidecar
	for range 3 {
		replicas = append(replicas, startSidecar(t, cfg))
	}
	// Leases are sized by the live replicas seen (one heartbeat, 2 s).
	deadline := time.Now().Add(10 * time.Second)
	for _, sc := range replicas {
		for sc.metric("sidecar_ratelimit_live_replicas") != 3 {
			if time.Now().After(deadline) {
				t.Fatal("the sidecars do not see 3 live replicas")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if _, err := redistest.Do(rs.Addr, "CONFIG", "RESETSTAT"); err != nil {
		t.Fatal(err)
	}
	const n = 900
	for i := range n {
		resp, err := http.Get(replicas[i%3].url("/"))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d of a client under its limit: %d", i, resp.StatusCode)
		}
	}
	const series = `sidecar_ratelimit_decisions_total{route="app",tier="anonymous",result="allowed",source="%s"}`
	fromLease, fromStore, other := 0.0, 0.0, 0.0
	for _, sc := range replicas {
		l, s := max(0, sc.metric(fmt.Sprintf(series, "lease"))), max(0, sc.metric(fmt.Sprintf(series, "store")))
		if l <= 0 || sc.metric("sidecar_ratelimit_leases_total") <= 0 {
			t.Errorf("sidecar %s: no decision from a lease", sc.Addr)
		}
		fromLease, fromStore = fromLease+l, fromStore+s
		other += max(0, sc.metric(fmt.Sprintf(series, "store_error_fallback")))
	}
	info, err := redistest.Do(rs.Addr, "INFO", "commandstats")
	if err != nil {
		t.Fatal(err)
	}
	scripts := 0
	for line := range strings.SplitSeq(info.(string), "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_evalsha:calls="); ok {
			scripts, _ = strconv.Atoi(rest[:strings.IndexByte(rest, ',')])
		}
	}
	t.Logf("%d requests over 3 sidecars: %.0f decided from leases, %.0f by Redis, %.0f by on_store_error; %d script calls",
		n, fromLease, fromStore, other, scripts)
	if fromLease+fromStore+other != n || fromLease < n/2 {
		t.Errorf("decisions: %.0f from leases, %.0f from Redis, %.0f by on_store_error, for %d requests", fromLease, fromStore, other, n)
	}
	if scripts > n/4 {
		t.Errorf("%d script calls for %d requests", scripts, n)
	}
}
