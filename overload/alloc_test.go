//go:build !race

package overload

import (
	"context"
	"testing"
	"time"
)

// A request admitted at once and released is the path of every request
// while the upstream keeps up: it must not allocate, sample windows and
// limit updates included.
func TestFastPathDoesNotAllocate(t *testing.T) {
	l := mustNew(t, DefaultSettings())
	ctx := context.Background()
	now := t0
	var failed error
	allocs := testing.AllocsPerRun(10000, func() {
		now = now.Add(time.Millisecond) // a window closes every ~1000 runs
		tok, err := l.Acquire(ctx, 0)
		if err != nil {
			failed = err
			return
		}
		tok.Done(5*time.Millisecond, false, now)
	})
	if failed != nil {
		t.Fatal(failed)
	}
	if allocs != 0 {
		t.Errorf("%.2f allocations per Acquire and Done", allocs)
	}
	// Refusals do not allocate either: the ShedReason is the error.
	s := fixed(1, 0)
	l = mustNew(t, s)
	held := mustAcquire(t, l, 0)
	allocs = testing.AllocsPerRun(1000, func() {
		if _, err := l.Acquire(ctx, 0); err != ShedQueueFull {
			failed = err
		}
	})
	held.Ignore()
	if failed != nil {
		t.Fatal(failed)
	}
	if allocs != 0 {
		t.Errorf("%.2f allocations per refusal", allocs)
	}
}
