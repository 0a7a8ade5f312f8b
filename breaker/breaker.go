// Package breaker cuts off a failing upstream: a circuit per upstream (the
// only user of github.com/afex/hystrix-go in sidecar) and a bulkhead that
// bounds the requests in flight to it.
//
// hystrix-go is the circuit: rolling health window, open and half-open
// states, sleep window. It is used inline — AllowRequest before a request,
// ReportEvent when the verdict is known — never through hystrix.Do, whose
// goroutines per call and uncancelled timeouts do not fit a proxy. This
// package decides which events reach it, because hystrix's raw semantics
// get three things wrong for a proxy:
//
//   - bulkhead rejections and short-circuits are not upstream failures:
//     they are never reported (hystrix counts them as errors and would keep
//     or trip the circuit on a healthy upstream);
//   - a success from a request that started before the circuit opened does
//     not close it (hystrix closes on any success): while open, only the
//     half-open probe's verdict is reported;
//   - the bulkhead is ours, so a reload can change its size (hystrix's pool
//     size is frozen when the circuit is created).
//
// hystrix computes health on its own goroutine, so on its own a trip lags
// the thresholds (by dozens of requests in a tight loop); a synchronous
// count of the same window refuses requests as soon as they are crossed.
//
// hystrix only trips on a percentage of its 10 s window: after a healthy
// spell at low volume, a hung upstream is cut off only once its failures
// outnumber the window's successes, each failure a full timeout. With
// Settings.ConsecutiveFailures the circuit also opens after that many
// failures in a row (Envoy's consecutive_5xx, Polly's basic breaker). That
// trip is this package's own state beside hystrix's, with the same sleep
// window and single probe.
package breaker

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/afex/hystrix-go/hystrix"
)

// Errors returned by Allow.
var (
	ErrOpen      = errors.New("breaker: circuit open")
	ErrSaturated = errors.New("breaker: too many requests in flight")
)

// Settings of one circuit. Zero values are the documented defaults.
type Settings struct {
	// Name identifies the circuit; hystrix keeps circuits in a global
	// registry by name, so names must come from configuration only.
	Name string
	// ErrorPercent of failed requests opens the circuit ... Default 50.
	ErrorPercent int
	// ... once VolumeThreshold requests were seen in hystrix's 10 s
	// rolling window. Default 20.
	VolumeThreshold int
	// SleepWindow is how long the circuit stays open before one probe is
	// let through. Default 5 s.
	SleepWindow time.Duration
	// MaxConcurrent bounds requests in flight (the bulkhead). Default 1000.
	MaxConcurrent int
	// ConsecutiveFailures opens the circuit after this many failures in a
	// row, whatever the window says. 0 (the default): off.
	ConsecutiveFailures int
}

// State of a circuit, as exported in metrics.
type State int

const (
	Closed   State = 0
	Open     State = 1
	HalfOpen State = 2 // open, and the sleep window is over: the next request probes
)

// Breaker is one circuit and its bulkhead. Safe for concurrent use.
type Breaker struct {
	name   string
	sleep  time.Duration
	cb     *hystrix.CircuitBreaker
	slots  chan struct{}
	opened atomic.Int64 // unix ns the current open period (or last probe) began; 0: closed
	trans  func(to State)
	early  window // our synchronous view of hystrix's window, see Allow

	// The consecutive-failures trip (see the package doc).
	consecutiveLimit int64
	consecutive      atomic.Int64 // failures since the last success
	tripped          atomic.Int64 // unix ns of the trip or of the last probe; 0: not tripped
}

// window counts requests and failures over the last 10 s in 1 s buckets,
// as hystrix does, but synchronously: hystrix applies events on its own
// goroutine, so under load it can admit dozens of requests past the
// thresholds before it opens. Allow consults this first and refuses as
// soon as the thresholds are crossed; hystrix catches up and then runs the
// open and half-open states as usual.
type window struct {
	mu      sync.Mutex
	volume  int
	percent int
	buckets [10]struct{ sec, total, failed int64 }
	tripped bool
}

func (w *window) add(now time.Time, failed bool) {
	sec := now.Unix()
	w.mu.Lock()
	b := &w.buckets[sec%10]
	if b.sec != sec {
		b.sec, b.total, b.failed = sec, 0, 0
	}
	b.total++
	if failed {
		b.failed++
	}
	w.mu.Unlock()
}

// unhealthy reports whether the last 10 s cross the thresholds.
func (w *window) unhealthy(now time.Time) bool {
	sec := now.Unix()
	var total, failed int64
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := range w.buckets {
		if b := &w.buckets[i]; sec-b.sec < 10 {
			total += b.total
			failed += b.failed
		}
	}
	return total >= int64(w.volume) && failed*100 >= int64(w.percent)*total
}

func (w *window) reset() {
	w.mu.Lock()
	w.buckets = [10]struct{ sec, total, failed int64 }{}
	w.mu.Unlock()
}

// New configures the named circuit (keeping its state if it exists: a
// reload carries it over) and returns a Breaker with a fresh bulkhead of
// s.MaxConcurrent. onTransition, if not nil, is called on each change of
// state this Breaker observes.
func New(s Settings, onTransition func(to State)) (*Breaker, error) {
	if s.Name == "" {
		return nil, errors.New("breaker: a circuit needs a name")
	}
	if s.ErrorPercent <= 0 {
		s.ErrorPercent = 50
	}
	if s.VolumeThreshold <= 0 {
		s.VolumeThreshold = 20
	}
	if s.SleepWindow <= 0 {
		s.SleepWindow = 5 * time.Second
	}
	if s.MaxConcurrent <= 0 {
		s.MaxConcurrent = 1000
	}
	hystrix.ConfigureCommand(s.Name, hystrix.CommandConfig{
		Timeout:                int(time.Hour / time.Millisecond), // unused: timeouts are the proxy's
		MaxConcurrentRequests:  1,                                 // unused: the bulkhead is ours
		RequestVolumeThreshold: s.VolumeThreshold,
		SleepWindow:            int(s.SleepWindow / time.Millisecond),
		ErrorPercentThreshold:  s.ErrorPercent,
	})
	cb, _, err := hystrix.GetCircuit(s.Name)
	if err != nil {
		return nil, err
	}
	if onTransition == nil {
		onTransition = func(State) {}
	}
	b := &Breaker{name: s.Name, sleep: s.SleepWindow, cb: cb, slots: make(chan struct{}, s.MaxConcurrent), trans: onTransition,
		consecutiveLimit: int64(max(0, s.ConsecutiveFailures))}
	b.early.volume, b.early.percent = s.VolumeThreshold, s.ErrorPercent
	return b, nil
}

// Inherit carries the state this package keeps beside hystrix's (the
// synchronous window, the open period, the consecutive-failures count and
// trip) over from the circuit prev that b replaces on a reload; hystrix
// keeps its own by name. Call it before b is used.
func (b *Breaker) Inherit(prev *Breaker) {
	if prev == nil || prev == b {
		return
	}
	prev.early.mu.Lock()
	b.early.buckets = prev.early.buckets
	prev.early.mu.Unlock()
	b.opened.Store(prev.opened.Load())
	b.consecutive.Store(prev.consecutive.Load())
	b.tripped.Store(prev.tripped.Load())
}

// Ticket is one admitted request. Report its verdict once the response
// head is known (or the attempt failed), and call Done when the request
// is over (its body included): the bulkhead slot is held until then.
type Ticket struct {
	b     *Breaker
	start time.Time
	probe bool
	// tripProbe: the probe of a consecutive-failures trip, not hystrix's.
	tripProbe bool
}

// Allow admits a request, or says why not: ErrOpen (retry after the
// returned duration) or ErrSaturated (the bulkhead is full; no waiting).
func (b *Breaker) Allow(now time.Time) (Ticket, time.Duration, error) {
	if t := b.tripped.Load(); t != 0 {
		b.markOpen(now)
		// After the sleep window one request probes: the one that moves
		// the trip's time to now. A probe whose verdict never comes is
		// replaced after another sleep window.
		if now.Sub(time.Unix(0, t)) < b.sleep || !b.tripped.CompareAndSwap(t, now.UnixNano()) {
			return Ticket{}, b.retryIn(now), ErrOpen
		}
		b.opened.Store(now.UnixNano())
		select {
		case b.slots <- struct{}{}:
		default:
			return Ticket{}, 0, ErrSaturated
		}
		return Ticket{b: b, start: now, probe: true, tripProbe: true}, 0, nil
	}
	probe := false
	// IsOpen is hystrix's health computation (sums over its rolling
	// window) while the circuit is closed: once per request, and only
	// here. hystrix opens nowhere else than in IsOpen, so b.opened, set
	// whenever a call here or in State sees it open, tells the rest.
	open := b.cb.IsOpen()
	if !open && b.early.unhealthy(now) {
		// hystrix has not seen it yet: refuse now, it will open shortly.
		b.markOpen(now)
		return Ticket{}, b.retryIn(now), ErrOpen
	}
	if open {
		b.markOpen(now)
		if !b.cb.AllowRequest() {
			return Ticket{}, b.retryIn(now), ErrOpen
		}
		probe = true // the half-open test request
		b.opened.Store(now.UnixNano())
	} else if b.opened.Swap(0) != 0 {
		b.trans(Closed)
	}
	select {
	case b.slots <- struct{}{}:
	default:
		return Ticket{}, 0, ErrSaturated
	}
	return Ticket{b: b, start: now, probe: probe}, 0, nil
}

func (b *Breaker) markOpen(now time.Time) {
	if b.opened.CompareAndSwap(0, now.UnixNano()) {
		b.trans(Open)
	}
}

func (b *Breaker) retryIn(now time.Time) time.Duration {
	since := now.Sub(time.Unix(0, b.opened.Load()))
	return max(time.Second, b.sleep-since)
}

var (
	evSuccess = []string{"success"}
	evFailure = []string{"failure"}
)

// Report gives the request's verdict to the circuit.
func (t Ticket) Report(failed bool, now time.Time) {
	if t.b == nil {
		return
	}
	if t.tripProbe {
		t.b.reportTripProbe(failed, t.start, now)
		return
	}
	if failed {
		t.b.early.add(now, true)
		_ = t.b.cb.ReportEvent(evFailure, t.start, now.Sub(t.start))
		if n := t.b.consecutive.Add(1); t.b.consecutiveLimit > 0 && n >= t.b.consecutiveLimit &&
			t.b.tripped.CompareAndSwap(0, now.UnixNano()) {
			t.b.markOpen(now)
		}
		return
	}
	t.b.consecutive.Store(0)
	if !t.probe && t.b.opened.Load() != 0 {
		return // open, and this request started before the trip: only the probe decides
	}
	if t.probe {
		t.b.early.reset() // hystrix resets its window when the probe closes the circuit
	} else {
		t.b.early.add(now, false)
	}
	_ = t.b.cb.ReportEvent(evSuccess, t.start, now.Sub(t.start))
	if t.probe && t.b.opened.Swap(0) != 0 {
		t.b.trans(Closed)
	}
}

// reportTripProbe ends or renews a consecutive-failures trip. The probe's
// verdict reaches hystrix's window too, like any request's.
func (b *Breaker) reportTripProbe(failed bool, start, now time.Time) {
	if failed {
		b.tripped.Store(now.UnixNano()) // another sleep window
		b.early.add(now, true)
		_ = b.cb.ReportEvent(evFailure, start, now.Sub(start))
		return
	}
	b.consecutive.Store(0)
	b.tripped.Store(0)
	b.early.add(now, false)
	_ = b.cb.ReportEvent(evSuccess, start, now.Sub(start))
	if !b.cb.IsOpen() && b.opened.Swap(0) != 0 {
		b.trans(Closed)
	}
}

// Done frees the request's bulkhead slot.
func (t Ticket) Done() {
	if t.b != nil {
		<-t.b.slots
	}
}

// State reports the circuit's state now.
func (b *Breaker) State(now time.Time) State {
	if t := b.tripped.Load(); t != 0 {
		if now.Sub(time.Unix(0, t)) >= b.sleep {
			return HalfOpen
		}
		return Open
	}
	// Not seen open (b.opened == 0): hystrix is closed, and the cheap
	// synchronous window says whether it is about to open. The access log
	// asks this for every request.
	if b.opened.Load() == 0 || !b.cb.IsOpen() {
		if b.early.unhealthy(now) {
			return Open // hystrix is about to agree
		}
		return Closed
	}
	if now.Sub(time.Unix(0, b.opened.Load())) >= b.sleep {
		return HalfOpen
	}
	return Open
}

// InFlight is the number of bulkhead slots taken.
func (b *Breaker) InFlight() int { return len(b.slots) }
