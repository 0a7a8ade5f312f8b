// Package limiter decides whether a request fits its client's rate limit.
//
// Two algorithms, each in memory and in Redis with identical answers:
//
//   - SlidingWindow (the default) keeps the promise users read into the
//     name: never more than Limit requests admitted in any window of length
//     Window, whatever the timing of the bursts. It counts admissions in
//     Subwindows buckets of Window/Subwindows and counts the oldest,
//     partly expired bucket whole, so it can only under-admit: a steady
//     client loses at most one bucket's worth, 1 % of the window.
//   - GCRA is a token bucket (the generic cell rate algorithm of
//     github.com/go-redis/redis_rate): Limit per Window sustained, with
//     bursts of up to Burst. In any window it may admit Limit + Burst - 1.
//
// Time is passed in (milliseconds since the Unix epoch) so that decisions
// are reproducible; the Redis scripts take it from Redis' TIME unless a
// test passes it explicitly.
//
// With Redis, Settings.Lease lets a replica take a slice of a hot client's
// quota in one call and spend it in memory; lease.go states how the slice
// is sized and what that does to the bounds above.
package limiter

import (
	"time"
)

// Algorithm selects how a Rule is enforced.
type Algorithm uint8

const (
	// SlidingWindow: at most Limit per any Window (see the package doc).
	SlidingWindow Algorithm = iota
	// GCRA: a token bucket of depth Burst refilled at Limit per Window.
	GCRA
)

func (a Algorithm) String() string {
	if a == GCRA {
		return "gcra"
	}
	return "sliding_window"
}

// Subwindows is the number of buckets a sliding window is counted in; the
// under-admission it costs is at most 1/Subwindows of the limit. The Redis
// scripts are passed it with every call rather than holding their own copy.
const Subwindows = 100

// Rule is one limit. The zero value is invalid: Limit and Window must be
// positive.
type Rule struct {
	Limit     int
	Window    time.Duration
	Algorithm Algorithm
	// Burst is GCRA's bucket depth; 0 means Limit.
	Burst int
}

func (r Rule) valid() bool { return r.Limit > 0 && r.Window >= time.Millisecond }

func (r Rule) burst() int {
	if r.Burst > 0 {
		return r.Burst
	}
	return r.Limit
}

// Decision is the answer for one request.
type Decision struct {
	Allowed   bool
	Limit     int
	Remaining int
	// RetryAfter is how long a denied client must wait before a request
	// can be admitted; 0 when allowed.
	RetryAfter time.Duration
	// ResetAfter is how long until the whole quota is available again.
	ResetAfter time.Duration
}

// bucket is one sub-window's admissions: idx is the sub-window number
// (milliseconds since the epoch divided by the sub-window width).
type bucket struct {
	idx int64
	n   int64
}

// geometry returns the sub-window width w (ms) and how many buckets back
// from the current one are counted (k): k*w >= window, so the counted
// buckets always cover the whole window.
func geometry(window time.Duration) (w, k int64) {
	ms := window.Milliseconds()
	w = max(1, ms/Subwindows)
	k = (ms + w - 1) / w
	return w, k
}

// slide applies one decision for cost requests at nowMs to a window's
// buckets (ascending by idx) and returns the buckets to keep. This is the
// reference implementation; windowBatchLua's slide is the same in Redis.
func slide(buckets []bucket, rule Rule, nowMs int64, cost int64) ([]bucket, Decision) {
	w, k := geometry(rule.Window)
	cur := nowMs / w
	oldest := cur - k
	drop := 0
	for drop < len(buckets) && buckets[drop].idx < oldest {
		drop++
	}
	buckets = buckets[:copy(buckets, buckets[drop:])]
	var total int64
	for _, b := range buckets {
		total += b.n
	}
	limit := int64(rule.Limit)
	d := Decision{Limit: rule.Limit}
	if total+cost > limit {
		// Denied: find when enough of the oldest buckets leave the count.
		// Bucket i stops being counted once oldest > i.idx, at
		// (i.idx+k+1)*w.
		retryAt := nowMs + rule.Window.Milliseconds()
		freed := int64(0)
		for _, b := range buckets {
			freed += b.n
			if total-freed+cost <= limit {
				retryAt = (b.idx + k + 1) * w
				break
			}
		}
		d.Remaining = int(max(0, limit-total))
		d.RetryAfter = time.Duration(max(1, retryAt-nowMs)) * time.Millisecond
		d.ResetAfter = resetAfter(buckets, nowMs, w, k)
		return buckets, d
	}
	if n := len(buckets); n > 0 && buckets[n-1].idx == cur {
		buckets[n-1].n += cost
	} else {
		buckets = append(buckets, bucket{idx: cur, n: cost})
	}
	d.Allowed = true
	d.Remaining = int(limit - total - cost)
	d.ResetAfter = resetAfter(buckets, nowMs, w, k)
	return buckets, d
}

func resetAfter(buckets []bucket, nowMs, w, k int64) time.Duration {
	if len(buckets) == 0 {
		return 0
	}
	return time.Duration(max(0, (buckets[len(buckets)-1].idx+k+1)*w-nowMs)) * time.Millisecond
}

// gcra applies one decision to a theoretical arrival time (tat, in ms;
// 0 for a new key) the way redis_rate's script does, and returns the new
// TAT.
func gcra(tat float64, rule Rule, nowMs int64, cost int64) (float64, Decision) {
	now := float64(nowMs)
	emission := float64(rule.Window.Milliseconds()) / float64(rule.Limit)
	increment := emission * float64(cost)
	burstOffset := emission * float64(rule.burst())
	t := max(tat, now)
	newTat := t + increment
	allowAt := newTat - burstOffset
	diff := now - allowAt
	remaining := diff / emission
	d := Decision{Limit: rule.burst()}
	if remaining < 0 {
		d.RetryAfter = time.Duration(max(1, int64(-diff+0.999))) * time.Millisecond
		d.ResetAfter = time.Duration(t-now) * time.Millisecond
		return tat, d
	}
	d.Allowed = true
	d.Remaining = int(remaining)
	d.ResetAfter = time.Duration(newTat-now) * time.Millisecond
	return newTat, d
}
