package overload

import (
	"math"
	"time"
)

// The constants of Netflix concurrency-limits' Gradient2Limit and of the
// WindowedLimit that wraps it in that project's README (both cited in
// doc.go), with the defaults of their builders unless a comment says
// otherwise. They are not settings: the algorithm's authors tuned them
// together, and a per-upstream knob for each would be a knob nobody can
// set well.
const (
	// tolerance is Gradient2's rttTolerance: the short RTT may grow to
	// 1.5 × the long RTT before the limit shrinks.
	tolerance = 1.5
	// smoothing is how much of each new estimate replaces the limit.
	smoothing = 0.2
	// longWindow and longWarmup shape the long RTT (ExpAvgMeasurement(600,
	// 10) over 1 s windows in Java): the plain mean of the first 10
	// windows, then an exponential average over some ten minutes, which
	// at our 100 ms windows is 6000 of them (factor 2/(6000+1)).
	longWindow = int(10 * time.Minute / windowMax)
	longWarmup = 10
	// driftRatio and driftDecay are the drift recovery: while the long RTT
	// is over twice the short one (latency came back down after a long
	// overload), it is cut by 5 % a window instead of waiting out the
	// ten-minute average.
	driftRatio = 2
	driftDecay = 0.95
	// growthFloor is the least the limit may grow by per window
	// (Gradient2's queueSize) before smoothing; see growth.
	growthFloor = 4

	// A sample window closes at the first sample after
	// clamp(2 × its fastest sample, windowMin, windowMax) and counts only
	// if it holds windowSamples samples. WindowedLimit's defaults are 1 s,
	// 1 s and 10; ours are 100 ms, Envoy adaptive_concurrency's
	// concurrency_update_interval. At 1 s, with the limit cut by at most
	// 10 % a window, an upstream that can take 16 needs ~17 s to bring a
	// limit of 100 down to it, shedding nothing and queueing 84 requests
	// at the upstream all the while; at 100 ms it takes ~2 s. Growth is
	// per window too, so the limit also climbs ten times faster (0.8 a
	// window at small limits: 8/s). Under 100 requests a second (10 a
	// window) the limit does not move.
	windowMin     = 100 * time.Millisecond
	windowMax     = 100 * time.Millisecond
	windowSamples = 10
	// minSampleRTT drops latencies that cannot be a round trip (zero, a
	// clock step). WindowedLimit's minRttThreshold is 100 µs, but a
	// sidecar's upstream is often in the same pod or host, where an HTTP
	// round trip takes 50–100 µs: at 100 µs the controller would be blind
	// to exactly those upstreams.
	minSampleRTT = time.Microsecond
)

// growth is Gradient2's queueSize, how far the limit may grow per window
// before smoothing: max(4, ⌊√limit⌋), concurrency-limits'
// SquareRootFunction.create(4), the default of its GradientLimit.
// Gradient2's own default is a constant 4, which after smoothing grows the
// limit by 0.8 a window: 1225 windows from 20 to 1000 (20 minutes of
// Java's 1 s windows, 2 of ours). With √ it grows by ~2 a window at 100
// and ~6 at 1000, as Envoy's adaptive_concurrency (+√limit) does, while at
// small limits it is the same 4.
func growth(limit float64) float64 {
	return max(growthFloor, math.Floor(math.Sqrt(limit)))
}

// gradient2 is the Gradient2 concurrency-limit controller over 100 ms
// sample windows. It is not safe for concurrent use: the Limiter that owns it
// calls it under its lock. Time is only what the caller passes in.
type gradient2 struct {
	minLimit, maxLimit float64
	limit              float64 // the estimate; Limit truncates it, as Java does

	// long is the long-term RTT in nanoseconds (ExpAvgMeasurement): the
	// mean of the first longWarmup windows, then an exponential average.
	long      float64
	longSum   float64
	longCount int

	// win is the open sample window; next is when it may close (zero:
	// at the first sample, which closes a window too small to count, as
	// Java's nextUpdateTime of 0 does).
	win  window
	next time.Time
}

// window accumulates one sample window (ImmutableAverageSampleWindow).
type window struct {
	n           int
	sum         time.Duration
	fastest     time.Duration
	maxInFlight int
	dropped     bool
}

func newGradient2(minLimit, maxLimit, initialLimit int) gradient2 {
	return gradient2{minLimit: float64(minLimit), maxLimit: float64(maxLimit), limit: float64(initialLimit)}
}

// current is the concurrency limit.
func (g *gradient2) current() int { return int(g.limit) }

// setBounds applies new bounds on a reload, keeping what was learned: the
// limit is clamped into them, the RTTs are kept.
func (g *gradient2) setBounds(minLimit, maxLimit int) {
	g.minLimit, g.maxLimit = float64(minLimit), float64(maxLimit)
	g.limit = min(g.maxLimit, max(g.minLimit, g.limit))
}

// sample records one finished request: its latency, the number of
// requests in flight when it was admitted (itself included), and whether
// it was dropped (timed out, or refused by the upstream). It reports
// whether the limit changed, which happens only when the sample closes a
// window.
//
// Like WindowedLimit, a dropped request's latency is a sample like any
// other and the window only remembers that it saw a drop; Gradient2
// ignores that flag (its _update never reads didDrop: only AIMD and Vegas
// back off on a drop). A timeout's latency is long, so timeouts raise the
// window's RTT and shrink the limit; a request that failed fast without
// measuring the upstream should not be sampled at all (Token.Ignore, as
// Java's Listener.onIgnore).
func (g *gradient2) sample(latency time.Duration, inFlight int, dropped bool, now time.Time) (changed bool) {
	if latency < minSampleRTT {
		return false
	}
	w := &g.win
	if w.n == 0 || latency < w.fastest {
		w.fastest = latency
	}
	w.n++
	w.sum += latency
	w.maxInFlight = max(w.maxInFlight, inFlight)
	w.dropped = w.dropped || dropped
	if !now.After(g.next) {
		return false
	}
	closed := *w
	*w = window{}
	g.next = now.Add(min(max(2*closed.fastest, windowMin), windowMax))
	if closed.n < windowSamples {
		return false
	}
	before := g.current()
	g.update(float64(closed.sum)/float64(closed.n), closed.maxInFlight)
	return g.current() != before
}

// update is Gradient2Limit._update for one closed window whose mean RTT
// is short (ns) and whose busiest moment had inFlight requests.
func (g *gradient2) update(short float64, inFlight int) {
	queue := growth(g.limit)

	if g.longCount < longWarmup {
		g.longCount++
		g.longSum += short
		g.long = g.longSum / float64(g.longCount)
	} else {
		const factor = 2.0 / float64(longWindow+1)
		g.long = g.long*(1-factor) + short*factor
	}
	long := g.long // the gradient uses the value before the drift decay, as Java does

	// Latency came back down after a long overload: pull the long RTT
	// down faster than its average would.
	if long/short > driftRatio {
		g.long *= driftDecay
	}

	// App-limited: the upstream was never asked for even half the limit,
	// so this window says nothing about what it could take. Java returns
	// here, so the limit neither grows nor shrinks.
	if float64(inFlight) < g.limit/2 {
		return
	}

	// Below 1 when the short RTT exceeds the long one by more than the
	// tolerance; never under 0.5, so one outlier window can at most
	// halve the estimate (and, after smoothing, cut the limit by 10 %).
	gradient := max(0.5, min(1.0, tolerance*long/short))
	next := g.limit*gradient + queue
	next = g.limit*(1-smoothing) + next*smoothing
	g.limit = max(g.minLimit, min(g.maxLimit, next))
}
