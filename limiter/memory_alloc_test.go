//go:build !race

package limiter

import (
	"testing"
	"time"
)

// A decision of the memory store for a known client, and a deny-cache
// look-up, run for every request: they must not allocate.
func TestMemoryDecisionDoesNotAllocate(t *testing.T) {
	clock := &fakeClock{now: t0}
	l := New(Settings{Now: clock.Now})
	defer l.Close()
	rule := Rule{Limit: 1_000_000, Window: time.Minute}
	l.Allow("client", rule)
	l.Remember("denied", Decision{RetryAfter: time.Hour})
	if allocs := testing.AllocsPerRun(200, func() { l.Allow("client", rule) }); allocs != 0 {
		t.Errorf("%.1f allocations per decision of the memory store", allocs)
	}
	if allocs := testing.AllocsPerRun(200, func() { l.Denied("denied", rule) }); allocs != 0 {
		t.Errorf("%.1f allocations per deny-cache look-up", allocs)
	}
}
