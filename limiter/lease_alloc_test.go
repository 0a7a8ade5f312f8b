//go:build !race

package limiter

import (
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// A decision spent from a lease runs for most requests of a hot client:
// it must not allocate.
func TestLeaseSpendDoesNotAllocate(t *testing.T) {
	srv := redistest.Start(t)
	clock := &fakeClock{now: t0}
	l := New(Settings{Redis: client(t, srv.Addr), KeyPrefix: "alloc", Heartbeat: time.Hour, Now: clock.Now, Lease: true})
	defer l.Close()
	rule := Rule{Limit: 1_000_000, Window: time.Minute} // leases of up to 10,000
	// At one instant the client's count grows by one a request.
	askUntilHeld(t, l, "hot", rule, 500, 5000, nil)
	src := FromLease
	allocs := testing.AllocsPerRun(200, func() {
		if _, s := l.Allow("hot", rule); s != FromLease {
			src = s
		}
	})
	if src != FromLease {
		t.Fatalf("a decision came from %v", src)
	}
	if allocs != 0 {
		t.Errorf("%.1f allocations per decision spent from a lease", allocs)
	}
}
