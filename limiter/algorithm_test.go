package limiter

import (
	"math/rand/v2"
	"runtime"
	"strconv"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// maxInAnyWindow slides an exact window of length w over admission times
// (ascending) and returns the most admissions it ever holds.
func maxInAnyWindow(times []time.Time, w time.Duration) int {
	best, lo := 0, 0
	for hi := range times {
		for times[hi].Sub(times[lo]) >= w {
			lo++
		}
		best = max(best, hi-lo+1)
	}
	return best
}

func TestSlidingWindowNeverAdmitsMoreThanLimit(t *testing.T) {
	for _, c := range []struct {
		limit  int
		window time.Duration
	}{{10, time.Second}, {60, time.Minute}, {100, 10 * time.Second}, {7, 333 * time.Millisecond}} {
		rule := Rule{Limit: c.limit, Window: c.window}
		w, _ := geometry(c.window)
		sub := time.Duration(w) * time.Millisecond
		patterns := map[string]func(i int) time.Duration{
			// bursts right before and after each window edge
			"window edges": func(i int) time.Duration {
				return time.Duration(i/(2*c.limit))*c.window + c.window - time.Millisecond + time.Duration(i%2)*time.Millisecond
			},
			// bursts straddling sub-window edges
			"sub-window edges": func(i int) time.Duration {
				return time.Duration(i/3)*sub + sub - time.Millisecond + time.Duration(i%3)*time.Millisecond
			},
			"random": func(i int) time.Duration {
				return time.Duration(i)*c.window/time.Duration(3*c.limit) + time.Duration(rand.N(int64(sub)))
			},
		}
		for name, at := range patterns {
			m := NewMemory(0)
			var admitted []time.Time
			last := t0
			for i := 0; i < 40*c.limit; i++ {
				now := t0.Add(at(i))
				if now.Before(last) {
					now = last
				}
				last = now
				if d := m.AllowAt("k", rule, now, 1); d.Allowed {
					admitted = append(admitted, now)
				}
			}
			if got := maxInAnyWindow(admitted, c.window); got > c.limit {
				t.Errorf("limit %d per %v, %s: %d admitted within one window", c.limit, c.window, name, got)
			}
		}
	}
}

func TestSlidingWindowSteadyClientGetsItsLimit(t *testing.T) {
	for _, limit := range []int{10, 60, 6000} {
		rule := Rule{Limit: limit, Window: time.Minute}
		m := NewMemory(0)
		// Ask at twice the allowed rate for 10 windows.
		step := time.Minute / time.Duration(2*limit)
		admitted := 0
		var last time.Time
		for now := t0; now.Before(t0.Add(10 * time.Minute)); now = now.Add(step) {
			if m.AllowAt("k", rule, now, 1).Allowed {
				admitted++
				last = now
			}
		}
		_ = last
		perWindow := float64(admitted) / 10
		if perWindow < 0.98*float64(limit) || perWindow > float64(limit) {
			t.Errorf("limit %d/min: a steady client got %.1f per window (want >= 98%%)", limit, perWindow)
		}
	}
}

func TestSlidingWindowDecisionFields(t *testing.T) {
	m := NewMemory(0)
	rule := Rule{Limit: 3, Window: 10 * time.Second}
	for i := 0; i < 3; i++ {
		d := m.AllowAt("k", rule, t0.Add(time.Duration(i)*time.Second), 1)
		if !d.Allowed || d.Remaining != 2-i || d.Limit != 3 {
			t.Fatalf("request %d: %+v", i, d)
		}
	}
	d := m.AllowAt("k", rule, t0.Add(3*time.Second), 1)
	// The first admission (at t0, bucket 0..100ms) stops counting once its
	// bucket is older than the window: at t0+10.1s.
	if d.Allowed || d.Remaining != 0 || d.RetryAfter != 7100*time.Millisecond {
		t.Errorf("denied decision %+v, want retry after 7.1s", d)
	}
	if d := m.AllowAt("k", rule, t0.Add(3*time.Second+d.RetryAfter), 1); !d.Allowed {
		t.Errorf("not admitted at the promised retry time: %+v", d)
	}
}

func TestGCRARateAndBurst(t *testing.T) {
	rule := Rule{Limit: 10, Window: time.Second, Algorithm: GCRA, Burst: 5}
	m := NewMemory(0)
	var admitted []time.Time
	for now := t0; now.Before(t0.Add(5 * time.Second)); now = now.Add(10 * time.Millisecond) {
		if m.AllowAt("k", rule, now, 1).Allowed {
			admitted = append(admitted, now)
		}
	}
	// A burst of 5 back to back (10 ms apart), then one every 100 ms.
	if n := maxInAnyWindow(admitted, 60*time.Millisecond); n != 5 {
		t.Errorf("burst %d, want 5", n)
	}
	if n := maxInAnyWindow(admitted, time.Second); n > rule.Limit+rule.Burst-1 {
		t.Errorf("%d in one second, more than rate+burst-1 = %d", n, rule.Limit+rule.Burst-1)
	}
	if n := len(admitted); n < 5+48 || n > 5+50 {
		t.Errorf("%d admitted in 5 s at 10/s with burst 5", n)
	}
}

func TestMemoryIsBoundedWithAMillionClients(t *testing.T) {
	if testing.Short() {
		t.Skip("a million clients")
	}
	m := NewMemory(100_000)
	rule := Rule{Limit: 60, Window: time.Minute}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	key := make([]byte, 0, 32)
	for i := 0; i < 1_000_000; i++ {
		key = strconv.AppendInt(append(key[:0], "client-"...), int64(i), 10)
		m.AllowAt(string(key), rule, t0.Add(time.Duration(i)*time.Microsecond), 1)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if n := m.Len(); n > 100_000 {
		t.Errorf("%d states held, cap 100000", n)
	}
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("1M distinct clients: %d states held, heap grew %.1f MiB", m.Len(), float64(grown)/(1<<20))
	if grown > 64<<20 {
		t.Errorf("heap grew %.1f MiB for a 100k-key cap", float64(grown)/(1<<20))
	}
	m.Sweep(t0.Add(time.Hour))
	if n := m.Len(); n != 0 {
		t.Errorf("%d states left after every window expired", n)
	}
}

// A reload that changes a tier's window carries its counts over. The
// buckets counted in the old sub-window width: read in the new one, a
// longer window's full count never aged out (a client locked out for
// decades, its Retry-After 57 years) and a shorter window's vanished (the
// limit admitted again at once).
func TestMemoryWindowChangeCarriesTheCount(t *testing.T) {
	for _, tc := range []struct{ from, to time.Duration }{{10 * time.Second, 20 * time.Second}, {20 * time.Second, 10 * time.Second}} {
		m := NewMemory(0)
		now := t0.Add(123 * time.Millisecond)
		for i := range 3 {
			if d := m.AllowAt("c", Rule{Limit: 3, Window: tc.from}, now, 1); !d.Allowed {
				t.Fatalf("%s: request %d denied", tc.from, i)
			}
		}
		to := Rule{Limit: 3, Window: tc.to}
		d := m.AllowAt("c", to, now.Add(time.Second), 1)
		if d.Allowed {
			t.Errorf("%s → %s: a fourth request admitted within a second: the count was lost", tc.from, tc.to)
		}
		if d.RetryAfter > tc.to+tc.to/Subwindows { // counted to the end of its sub-window
			t.Errorf("%s → %s: Retry-After %s, more than the window", tc.from, tc.to, d.RetryAfter)
		}
		if d := m.AllowAt("c", to, now.Add(tc.to+time.Second), 1); !d.Allowed {
			t.Errorf("%s → %s: still denied a window later (Retry-After %s)", tc.from, tc.to, d.RetryAfter)
		}
	}
}
