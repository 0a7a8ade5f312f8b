// Package breaker cuts off a failing upstream: a circuit per upstream (the
// only user of github.com/afex/hystrix-go in sidecar) and a bulkhead that
// bounds the requests in flight to it.
//
// hystrix-go judges the upstream's health: its rolling window (10 s in 1 s
// buckets) of the verdicts reported to it, against the error percentage
// and volume thresholds. It is used inline — IsOpen before a request,
// ReportEvent when the verdict is known — never through hystrix.Do, whose
// goroutines per call and uncancelled timeouts do not fit a proxy. This
// package decides which events reach it, and it runs the open state
// itself, because hystrix's raw semantics get four things wrong for a
// proxy:
//
//   - bulkhead rejections and short-circuits are not upstream failures:
//     they are never reported (hystrix counts them as errors and would keep
//     or trip the circuit on a healthy upstream);
//   - a verdict counts only in the period (closed, or one open spell) that
//     admitted its request: while open only the probe's verdict is
//     reported, so a success that started before the trip does not close
//     the circuit (hystrix closes on any success), and a failure that
//     started before the close does not count against the fresh window
//     (after a hang, the timeouts of requests sent before the trip would
//     re-open the circuit on a recovered upstream);
//   - the open period, its sleep window and its single probe are this
//     package's (issue 13, point 7). hystrix opens only inside an IsOpen
//     call that finds its window unhealthy, and it applies events on its
//     own goroutine, so its sleep window began whenever such a call came:
//     after a trip and a quiet spell, at the first request after the sleep
//     window, which it then refused. Here the circuit opens at the verdict
//     that crosses the thresholds, and the first request a sleep window
//     later is the probe. hystrix's own single test (AllowRequest) is not
//     used;
//   - the bulkhead is ours, so a reload can change its size (hystrix's pool
//     size is frozen when the circuit is created).
//
// hystrix computes health on its own goroutine, so on its own a trip lags
// the thresholds (by dozens of requests in a tight loop); a synchronous
// count of the same window opens the circuit as soon as they are crossed.
// When the probe succeeds both windows start again the way hystrix does
// (empty, then the probe's success), so that they keep agreeing; hystrix's
// opening, on its rounded percentage, also opens the circuit. (hystrix's
// window is emptied only if its goroutine has counted the failures within
// the sleep window; if not, it opens the circuit again on them: a trip
// too many, with its probe a sleep window later.)
//
// hystrix only trips on a percentage of its 10 s window: after a healthy
// spell at low volume, a hung upstream is cut off only once its failures
// outnumber the window's successes, each failure a full timeout. With
// Settings.ConsecutiveFailures the circuit also opens after that many
// failures in a row (Envoy's consecutive_5xx, Polly's basic breaker), into
// the same open state, sleep window and probe.
//
// Decisions use the time passed in, except hystrix's window, which reads
// time.Now.
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
	// ErrorPercent of failed requests opens the circuit once
	// VolumeThreshold requests were seen in hystrix's 10 s rolling window.
	// Defaults 50 and 20.
	ErrorPercent, VolumeThreshold int
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

var stateNames = [...]string{"closed", "open", "half_open"}

// String is the state's name in logs, /status and the access log.
func (s State) String() string { return stateNames[s] }

// Breaker is one circuit and its bulkhead. Safe for concurrent use.
type Breaker struct {
	name             string
	sleep            time.Duration
	volume, percent  int   // the thresholds, for the synchronous window
	consecutiveLimit int64 // 0: no consecutive-failures trip
	cb               *hystrix.CircuitBreaker
	slots            chan struct{}
	trans            func(to State)
	c                *circuit
}

// circuit is the state of one circuit name that this package keeps beside
// hystrix's. The Breakers that serve the name in turn, one per reload,
// share it (Inherit): a verdict from a request that the replaced Breaker
// admitted, the probe's included, still counts.
type circuit struct {
	period      atomic.Pointer[period]
	early       window
	consecutive atomic.Int64 // failures in a row in the current closed period
	// asks and lastAsk pace hystrix's health computation (healthCheck).
	asks    atomic.Uint32
	lastAsk atomic.Int64 // nanos
}

// period is one spell of the circuit: closed, or open. Every transition
// swaps in a new one, so a Ticket knows whether the period that admitted
// it is still current; a verdict from an earlier one is stale.
type period struct {
	open bool
	// since is when the sleep window began (nanos): the trip, the failed
	// probe's verdict, or the probe now out. The first request a sleep
	// window later is the (next) probe.
	since int64
}

// epoch is the origin of nanos.
var epoch = time.Now()

// nanos is t as an int64 for the atomically swapped periods: on the
// monotonic clock when t has a reading of it (time.Now's do), so a step of
// the wall clock does not stretch or cut a sleep window.
func nanos(t time.Time) int64 { return int64(t.Sub(epoch)) }

// window counts requests and failures over the last 10 s in 1 s buckets,
// as hystrix does, but synchronously: hystrix applies events on its own
// goroutine, so under load it can admit dozens of requests past the
// thresholds before it opens. Report opens the circuit as soon as a
// verdict makes this window cross them.
type window struct {
	mu      sync.Mutex
	buckets [10]struct{ sec, total, failed int64 }
}

// add counts one verdict and reports whether the window now crosses the
// thresholds.
func (w *window) add(now time.Time, failed bool, volume, percent int) (unhealthy bool) {
	sec := now.Unix()
	w.mu.Lock()
	defer w.mu.Unlock()
	b := &w.buckets[sec%10]
	if b.sec != sec {
		b.sec, b.total, b.failed = sec, 0, 0
	}
	b.total++
	if failed {
		b.failed++
	}
	return w.unhealthyLocked(sec, volume, percent)
}

// unhealthy reports whether the last 10 s cross the thresholds.
func (w *window) unhealthy(now time.Time, volume, percent int) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.unhealthyLocked(now.Unix(), volume, percent)
}

func (w *window) unhealthyLocked(sec int64, volume, percent int) bool {
	var total, failed int64
	for i := range w.buckets {
		if b := &w.buckets[i]; sec-b.sec < 10 {
			total += b.total
			failed += b.failed
		}
	}
	return total >= int64(volume) && failed*100 >= int64(percent)*total
}

func (w *window) reset() {
	w.mu.Lock()
	w.buckets = [10]struct{ sec, total, failed int64 }{}
	w.mu.Unlock()
}

// New configures the named circuit (hystrix keeps its window by name: a
// reload carries it over) and returns a Breaker with a fresh bulkhead of
// s.MaxConcurrent and, until Inherit, a closed circuit. onTransition, if
// not nil, is called on each change between Open and Closed that this
// Breaker makes.
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
		SleepWindow:            int(s.SleepWindow / time.Millisecond), // unused: the sleep window is ours
		ErrorPercentThreshold:  s.ErrorPercent,
	})
	cb, _, err := hystrix.GetCircuit(s.Name)
	if err != nil {
		return nil, err
	}
	if onTransition == nil {
		onTransition = func(State) {}
	}
	b := &Breaker{name: s.Name, sleep: s.SleepWindow, volume: s.VolumeThreshold, percent: s.ErrorPercent,
		consecutiveLimit: int64(max(0, s.ConsecutiveFailures)), cb: cb, slots: make(chan struct{}, s.MaxConcurrent),
		trans: onTransition, c: &circuit{}}
	b.c.period.Store(&period{})
	return b, nil
}

// Inherit makes b share the state this package keeps beside hystrix's
// (the open period, the synchronous window, the consecutive-failures
// count) with prev, the Breaker of the same name that b replaces on a
// reload; hystrix keeps its own by name. Requests prev admitted report to
// the same circuit. Call it before b is used.
func (b *Breaker) Inherit(prev *Breaker) {
	if prev == nil || prev == b {
		return
	}
	b.c = prev.c
}

// Ticket is one admitted request. Report its verdict once the response
// head is known (or the attempt failed), and call Done when the request
// is over (its body included): the bulkhead slot is held until then.
type Ticket struct {
	b     *Breaker
	p     *period // the period that admitted the request
	start time.Time
	probe bool
}

// Allow admits a request, or says why not: ErrOpen (retry after the
// returned duration) or ErrSaturated (the bulkhead is full; no waiting).
func (b *Breaker) Allow(now time.Time) (Ticket, time.Duration, error) {
	p := b.c.period.Load()
	if p.open {
		return b.allowProbe(p, now)
	}
	// IsOpen is hystrix's health computation (sums over its rolling
	// window): once per request while closed. It opens hystrix's circuit
	// when the window is unhealthy, and ours with it. The synchronous
	// window has opened ours already, at the verdict that crossed the
	// thresholds, unless successes have aged out of it since.
	if b.c.early.unhealthy(now, b.volume, b.percent) || b.hystrixOpen(now) {
		b.open(p, now)
		return Ticket{}, max(time.Second, b.sleep), ErrOpen
	}
	select {
	case b.slots <- struct{}{}:
	default:
		return Ticket{}, 0, ErrSaturated
	}
	return Ticket{b: b, p: p, start: now}, 0, nil
}

// hystrixOpen asks hystrix whether its window is unhealthy (IsOpen, which
// opens its circuit when it is): for every 16th request, and at least
// once per 10 ms of requests. Its sums over the window under a lock were
// a third of the breaker's cost per request; it computes health on its
// own goroutine, so its verdict lags the events anyway, and the
// synchronous window above opens the circuit at the exact request that
// crosses the thresholds. Asked less often, hystrix's own opening (on its
// rounded percentage) comes at most 15 requests or 10 ms later.
func (b *Breaker) hystrixOpen(now time.Time) bool {
	n, t := b.c.asks.Add(1), nanos(now)
	if last := b.c.lastAsk.Load(); n%16 != 0 && t-last < int64(10*time.Millisecond) {
		return false
	}
	b.c.lastAsk.Store(t)
	return b.cb.IsOpen()
}

// allowProbe lets the first request a sleep window after p began through
// as the probe, by swapping in the period of the probe; every other
// request is refused until the probe's verdict, or until another sleep
// window passed without one.
func (b *Breaker) allowProbe(p *period, now time.Time) (Ticket, time.Duration, error) {
	if wait := b.sleep - time.Duration(nanos(now)-p.since); wait > 0 {
		return Ticket{}, max(time.Second, wait), ErrOpen
	}
	select { // before the swap: a full bulkhead does not spend the probe
	case b.slots <- struct{}{}:
	default:
		return Ticket{}, 0, ErrSaturated
	}
	probe := &period{open: true, since: nanos(now)}
	if !b.c.period.CompareAndSwap(p, probe) {
		<-b.slots
		return Ticket{}, max(time.Second, b.sleep), ErrOpen // another request is the probe
	}
	return Ticket{b: b, p: probe, start: now, probe: true}, 0, nil
}

// open ends the closed period p: a full sleep window from now.
func (b *Breaker) open(p *period, now time.Time) {
	if b.c.period.CompareAndSwap(p, &period{open: true, since: nanos(now)}) {
		b.trans(Open)
	}
}

var (
	evSuccess = []string{"success"}
	evFailure = []string{"failure"}
)

// Report gives the request's verdict to the circuit. It is dropped if the
// circuit opened or closed since the request was admitted (a probe's, if
// another probe replaced it).
func (t Ticket) Report(failed bool, now time.Time) {
	b := t.b
	if b == nil || b.c.period.Load() != t.p {
		return
	}
	if t.probe {
		b.reportProbe(t, failed, now)
		return
	}
	unhealthy := b.c.early.add(now, failed, b.volume, b.percent)
	var inARow bool
	if failed {
		_ = b.cb.ReportEvent(evFailure, t.start, now.Sub(t.start))
		n := b.c.consecutive.Add(1)
		inARow = b.consecutiveLimit > 0 && n >= b.consecutiveLimit
	} else {
		b.c.consecutive.Store(0)
		_ = b.cb.ReportEvent(evSuccess, t.start, now.Sub(t.start))
	}
	if unhealthy || inARow {
		// The sleep window starts at the verdict that crossed the
		// thresholds (a success too, when it brings the window to the
		// volume threshold: hystrix would open on it).
		b.open(t.p, now)
	}
}

// reportProbe closes the circuit on the probe's success, or starts another
// full sleep window on its failure.
func (b *Breaker) reportProbe(t Ticket, failed bool, now time.Time) {
	if failed {
		b.c.early.add(now, true, b.volume, b.percent)
		_ = b.cb.ReportEvent(evFailure, t.start, now.Sub(t.start))
		b.c.period.CompareAndSwap(t.p, &period{open: true, since: nanos(now)})
		return
	}
	// A success closes hystrix's circuit if it is open: hystrix empties its
	// window and counts the success in the fresh one. IsOpen first, so that
	// it is open if its window is unhealthy (it may not have looked since
	// the trip; its goroutine has had a sleep window to count the
	// failures). The synchronous window starts again the same way, whatever
	// tripped the circuit.
	_ = b.cb.IsOpen()
	_ = b.cb.ReportEvent(evSuccess, t.start, now.Sub(t.start))
	b.c.early.reset()
	b.c.early.add(now, false, b.volume, b.percent)
	b.c.consecutive.Store(0)
	if b.c.period.CompareAndSwap(t.p, &period{}) {
		b.trans(Closed)
	}
}

// Done frees the request's bulkhead slot. A probe done without a verdict
// (the request ended on the client's side) tells nothing about the
// upstream: the next request probes.
func (t Ticket) Done() {
	if t.b == nil {
		return
	}
	<-t.b.slots
	if t.probe {
		t.b.c.period.CompareAndSwap(t.p, &period{open: true, since: t.p.since - int64(t.b.sleep)})
	}
}

// State reports the circuit's state at now.
func (b *Breaker) State(now time.Time) State {
	p := b.c.period.Load()
	switch {
	case p.open && nanos(now)-p.since >= int64(b.sleep):
		return HalfOpen
	case p.open:
		return Open
	case b.c.early.unhealthy(now, b.volume, b.percent):
		return Open // successes aged out of the window: the next request opens it
	}
	return Closed
}

// InFlight is the number of bulkhead slots taken.
func (b *Breaker) InFlight() int { return len(b.slots) }
