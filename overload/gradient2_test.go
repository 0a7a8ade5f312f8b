package overload

import (
	"testing"
	"time"
)

var t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

// driver feeds a gradient2 on a fake clock: ten samples a window, a tenth
// of a window apart, so that each window closes on its eleventh sample.
type driver struct {
	t   testing.TB
	g   gradient2
	now time.Time
}

func newDriver(t testing.TB, minLimit, maxLimit, initial int) *driver {
	d := &driver{t: t, g: newGradient2(minLimit, maxLimit, initial), now: t0}
	// The first sample closes an empty window; start the first real one.
	d.g.sample(time.Millisecond, 0, false, d.now)
	return d
}

// windows feeds n complete windows of the given latency; busy is the
// share of the current limit in flight at each sample.
func (d *driver) windows(n int, latency time.Duration, busy float64, dropped bool) {
	for closed, samples := 0, 0; closed < n; samples++ {
		if samples > 20*n {
			d.t.Fatalf("%d samples closed only %d of %d windows", samples, closed, n)
		}
		d.now = d.now.Add(windowMax / 10)
		before := d.g.win.n
		d.g.sample(latency, int(busy*d.g.limit+0.5), dropped, d.now)
		if d.g.win.n == 0 && before >= windowSamples {
			closed++
		}
	}
}

func TestGradient2GrowsAtBaselineUpToMax(t *testing.T) {
	d := newDriver(t, 5, 300, 20)
	prev := d.g.current()
	for i := 0; i < 30; i++ {
		d.windows(1, 10*time.Millisecond, 1, false)
		if got := d.g.current(); got < prev {
			t.Fatalf("window %d at a steady latency, busy: limit fell from %d to %d", i, prev, got)
		}
		prev = d.g.current()
	}
	// 0.2 × max(4, √limit) a window: from 20, 30 windows give ~24 more.
	if prev < 40 {
		t.Errorf("limit %d after 30 steady busy windows from 20, want at least 40", prev)
	}
	d.windows(2000, 10*time.Millisecond, 1, false)
	if got := d.g.current(); got != 300 {
		t.Errorf("limit %d after 2000 steady busy windows, want MaxLimit 300", got)
	}
}

// Java's app-limited check: fewer than limit/2 in flight says nothing
// about what the upstream could take, so the limit neither grows nor,
// with a slow upstream, shrinks.
func TestGradient2AppLimitedHolds(t *testing.T) {
	d := newDriver(t, 5, 1000, 100)
	d.windows(100, 10*time.Millisecond, 0.4, false)
	if got := d.g.current(); got != 100 {
		t.Errorf("limit %d after steady windows at 40%% in flight, want 100", got)
	}
	d.windows(20, 100*time.Millisecond, 0.4, false)
	if got := d.g.current(); got != 100 {
		t.Errorf("limit %d after slow windows at 40%% in flight, want 100", got)
	}
	d.windows(1, 10*time.Millisecond, 0.5, false) // limit/2 is enough
	if got := d.g.current(); got <= 100 {
		t.Errorf("limit %d after a window at half the limit in flight, want it above 100", got)
	}
}

func TestGradient2ShrinksWhenLatencyDoublesAndRecovers(t *testing.T) {
	d := newDriver(t, 5, 1000, 100)
	d.windows(50, 10*time.Millisecond, 1, false)
	base := d.g.current()

	// Latency doubles: gradient 1.5 × 10/20 = 0.75, smoothed a 5 % cut a
	// window less the growth.
	prev := base
	for i := 0; i < 20; i++ {
		d.windows(1, 20*time.Millisecond, 1, false)
		got := d.g.current()
		if got >= prev {
			t.Fatalf("window %d at twice the latency: limit %d, was %d", i, got, prev)
		}
		prev = got
	}
	if prev > base*3/4 {
		t.Errorf("limit %d after 20 windows at twice the latency, from %d: want at most %d", prev, base, base*3/4)
	}

	// Back to baseline: the limit grows again.
	low := prev
	d.windows(60, 10*time.Millisecond, 1, false)
	if got := d.g.current(); got < low+30 {
		t.Errorf("limit %d after 60 windows back at baseline, from %d: want at least %d", got, low, low+30)
	}
}

// Within tolerance (1.5 × the long RTT) latency noise does not shrink the
// limit.
func TestGradient2ToleratesModestLatencyRise(t *testing.T) {
	d := newDriver(t, 5, 1000, 100)
	d.windows(20, 10*time.Millisecond, 1, false)
	before := d.g.current()
	d.windows(10, 14*time.Millisecond, 1, false)
	if got := d.g.current(); got < before {
		t.Errorf("limit fell from %d to %d at 1.4 × the latency", before, got)
	}
}

func TestGradient2StaysWithinBounds(t *testing.T) {
	d := newDriver(t, 10, 50, 30)
	for i := 0; i < 200; i++ {
		d.windows(1, 10*time.Millisecond, 1, false)
		if got := d.g.current(); got > 50 {
			t.Fatalf("limit %d above MaxLimit 50", got)
		}
	}
	if got := d.g.current(); got != 50 {
		t.Errorf("limit %d after 200 steady busy windows, want MaxLimit 50", got)
	}
	// Far above the long RTT the gradient is 0.5: the limit would settle
	// at 8 (0.1 × limit = 0.2 × growth) but for MinLimit. (Within 40
	// windows the long RTT stays under 150 ms.)
	for i := 0; i < 40; i++ {
		d.windows(1, time.Second, 1, false)
		if got := d.g.current(); got < 10 {
			t.Fatalf("limit %d below MinLimit 10", got)
		}
	}
	if got := d.g.current(); got != 10 {
		t.Errorf("limit %d after 40 windows far above the long RTT, want MinLimit 10", got)
	}
	d.g.setBounds(12, 20)
	if got := d.g.current(); got != 12 {
		t.Errorf("limit %d after raising MinLimit to 12, want 12", got)
	}
	d.g.setBounds(5, 8)
	if got := d.g.current(); got != 8 {
		t.Errorf("limit %d after lowering MaxLimit to 8, want 8", got)
	}
}

// After a long overload the long RTT has climbed; once latency is back,
// the drift recovery brings it within twice the short RTT in a few dozen
// windows, where its ten-minute average alone would take hundreds.
func TestGradient2DriftRecovery(t *testing.T) {
	d := newDriver(t, 5, 1000, 100)
	d.windows(10, 10*time.Millisecond, 1, false)
	d.windows(3*longWindow, 50*time.Millisecond, 1, false)
	if d.g.long < float64(45*time.Millisecond) {
		t.Fatalf("long RTT %v after %d windows at 50 ms", time.Duration(d.g.long), 3*longWindow)
	}
	d.windows(30, 10*time.Millisecond, 1, false)
	if d.g.long > float64(2*10*time.Millisecond)*1.01 {
		t.Errorf("long RTT %v 30 windows after latency came back to 10 ms, want ≤ 20 ms", time.Duration(d.g.long))
	}
}

// As in concurrency-limits: a dropped request's latency is a sample like
// any other, and the drop alone changes nothing.
func TestGradient2DropIsALatencySample(t *testing.T) {
	a, b := newDriver(t, 5, 1000, 100), newDriver(t, 5, 1000, 100)
	a.windows(20, 10*time.Millisecond, 1, false)
	b.windows(20, 10*time.Millisecond, 1, false)
	a.windows(5, 40*time.Millisecond, 1, false)
	b.windows(5, 40*time.Millisecond, 1, true)
	if a.g.current() != b.g.current() || a.g.long != b.g.long {
		t.Errorf("dropped samples: limit %d long %v; the same latencies not dropped: limit %d long %v",
			b.g.current(), b.g.long, a.g.current(), a.g.long)
	}
	if b.g.current() >= 100 {
		t.Errorf("limit %d after windows of slow drops, want it below 100", b.g.current())
	}
}

// A window needs ten samples: at lower traffic the limit does not move.
func TestGradient2SmallWindowsDoNotCount(t *testing.T) {
	g := newGradient2(5, 1000, 100)
	now := t0
	for i := 0; i < 100; i++ {
		now = now.Add(200 * time.Millisecond) // 5 samples a window
		if g.sample(time.Second, 100, false, now) {
			t.Fatalf("sample %d changed the limit to %d", i, g.current())
		}
	}
	if g.longCount != 0 {
		t.Errorf("%d windows counted", g.longCount)
	}
	// Nor do latencies too small to be a round trip.
	open := g.win.n
	for i := 0; i < 100; i++ {
		now = now.Add(100 * time.Millisecond)
		g.sample(0, 100, false, now)
	}
	if g.longCount != 0 || g.win.n != open {
		t.Errorf("zero latencies counted: %d windows, %d in the open one (was %d)", g.longCount, g.win.n, open)
	}
}
