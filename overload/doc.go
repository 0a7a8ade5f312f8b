// Package overload protects an upstream from more concurrent requests
// than it can serve: an adaptive concurrency limit per upstream, a short
// queue at the limit ordered by priority (tier), and a share of the limit
// reserved for the top priority.
//
// # Use
//
// Make one Limiter per upstream with New(Settings) and, on a reload, call
// Update with the new Settings (in-flight requests and waiters carry
// over). For each request:
//
//	tok, err := lim.Acquire(ctx, priority) // a ShedReason (503), or ctx's error
//	...                                    // forward; measure the upstream's latency
//	tok.Done(latency, timedOut, time.Now()) // or tok.Ignore() if the upstream was never measured
//
// Limit, InFlight and Queued are the gauges.
//
// # The limit
//
// The limit follows Netflix concurrency-limits' Gradient2 (Gradient2Limit.java,
// https://github.com/Netflix/concurrency-limits/blob/main/concurrency-limits-core/src/main/java/com/netflix/concurrency/limits/limit/Gradient2Limit.java,
// as of the main branch at 78a74b98, January 2026) over the sample windows of
// its WindowedLimit (limit/WindowedLimit.java, window/ImmutableAverageSampleWindow.java),
// the pairing that project's README shows. Each window of at least 10
// samples gives a short RTT, its mean latency; a long RTT is an
// exponential average of those over ten minutes. Then
//
//	gradient = clamp(1.5 × long/short, 0.5, 1)
//	limit    = 0.8 × limit + 0.2 × (gradient × limit + growth)
//
// clamped to [MinLimit, MaxLimit]. The limit does not move at all after
// a window whose busiest moment had fewer than limit/2 requests in flight
// (the upstream was never asked for more, so nothing was learned), and
// when the long RTT exceeds twice the short one (latency came back after a
// long overload) it is cut by 5 % a window rather than waiting out its
// average. As in Java, a dropped request's latency is sampled like any
// other and the drop itself does not change the limit (Gradient2 ignores
// didDrop; AIMD and Vegas are the algorithms that back off on it).
//
// Three deliberate departures, all explained in gradient2.go: windows
// are 100 ms (Envoy adaptive_concurrency's update interval), not Java's
// 1 s, so that the limit finds an overloaded upstream's level in seconds
// rather than tens of seconds; growth is
// max(4, ⌊√limit⌋), Java's SquareRootFunction.create(4) (the default of
// its GradientLimit) instead of Gradient2's constant 4, so that the limit
// can climb to hundreds in minutes rather than tens of minutes; and
// latencies under 1 µs are ignored instead of under 100 µs, because an
// in-pod upstream answers in less.
//
// # Priorities
//
// Priorities are integers, higher first. A request below the limit is
// admitted at once. At the limit it waits for up to QueueTimeout in a
// queue of QueueSize, highest priority first and first come, first
// served within one; a full queue sheds its lowest, newest waiter for a
// higher-priority arrival, and otherwise sheds the arrival. Requests below
// TopPriority get only limit − ⌈Reserved × limit⌉ of the slots, so the
// top priority always finds room first (Stripe's reserved share for
// critical traffic; Netflix's partitioned limiter gives batch 0.1 the
// same way). Waiting is bounded and brief, after the queue timeouts of
// Facebook's "Fail at Scale".
//
// Time is passed in to the controller (Done's now), so tests use fixed
// instants; only the queue timeout uses a timer, which tests drive with
// testing/synctest.
package overload
