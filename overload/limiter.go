package overload

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

// Recommended settings. This package applies none of them by itself: a
// Settings field means what it says, zero included (zero QueueSize: no
// queue; zero Reserved: no reservation), and the config layer fills in
// the defaults of the keys a config leaves out.
const (
	// DefaultMinLimit is the floor under the adaptive limit, so that a
	// run of slow windows cannot starve an upstream that is merely slow.
	// Gradient2 has a floor of its own: at the smallest gradient (0.5)
	// and growth (4) the limit settles at 8 (0.9 × limit + 0.8), so a
	// MinLimit under 8 would never bind. 10 is just above it, a real
	// floor that still lets a struggling upstream recover with few
	// requests in flight (Gradient2's builder uses 20, Envoy 3). With
	// DefaultReserved it leaves 9 slots to the lower priorities.
	DefaultMinLimit = 10
	// DefaultMaxLimit is the ceiling. It matches the breaker's bulkhead
	// (1000 in flight) and is just below the upstream connection pool
	// (1024): above it those bound concurrency anyway.
	DefaultMaxLimit = 1000
	// DefaultInitialLimit is where a new Limiter starts (a reload keeps
	// the learned limit): Gradient2's own 20. A limit above what the
	// upstream can take is paid for at the start of the first overload,
	// by every priority: an upstream of 8 workers with 100 admitted
	// queues 92 of them, and the latency of all is 12 × its own until
	// the limit comes down (10 % a window, ~2 s). Starting low costs an
	// upstream that needs more some queueing or shedding while the limit
	// climbs (0.8 a window up to 16, then 0.2 × √limit: from 20 to 100
	// in ~5 s of busy windows).
	DefaultInitialLimit = 20
	// DefaultQueueTimeout bounds how long a request waits for a slot.
	// Waiting is only worth it for the slots that free up within a small
	// fraction of a typical response time budget; past that a fast 503
	// (and the client's retry elsewhere) beats a slow one, the reasoning
	// of CoDel-style queue timeouts in Facebook's "Fail at Scale".
	DefaultQueueTimeout = 50 * time.Millisecond
	// DefaultQueueSize caps the waiters. QueueTimeout bounds the wait;
	// the size only bounds memory and parked request goroutines in a
	// burst. Each waiter costs ~250 bytes here plus its request; 1000,
	// like DefaultMaxLimit, absorbs a burst as large as the largest limit.
	DefaultQueueSize = 1000
	// DefaultReserved is the share of the limit held for TopPriority:
	// Netflix's partitioned limiter example gives batch traffic 0.1, and
	// Stripe reserves a share for critical traffic. A tenth is enough for
	// health checks and the top tier at small limits (it rounds up to
	// one slot) without idling much capacity at large ones.
	DefaultReserved = 0.1
)

// DefaultSettings returns the recommended settings, with TopPriority 0.
func DefaultSettings() Settings {
	return Settings{
		MinLimit:     DefaultMinLimit,
		MaxLimit:     DefaultMaxLimit,
		InitialLimit: DefaultInitialLimit,
		QueueTimeout: DefaultQueueTimeout,
		QueueSize:    DefaultQueueSize,
		Reserved:     DefaultReserved,
	}
}

// Settings of one Limiter. It is comparable: a reload can compare the old
// and new settings with ==. The zero value is not valid (MinLimit 0).
type Settings struct {
	// MinLimit and MaxLimit bound the adaptive limit; 1 ≤ MinLimit ≤
	// MaxLimit. Recommended: DefaultMinLimit, DefaultMaxLimit.
	MinLimit, MaxLimit int
	// InitialLimit is the limit of a new Limiter, within [MinLimit,
	// MaxLimit]. Update ignores it and keeps the learned limit.
	// Recommended: DefaultInitialLimit.
	InitialLimit int
	// QueueTimeout is the longest a request waits for a slot before it
	// is shed; it must be positive when QueueSize is. A change applies to
	// requests that start waiting after it. Recommended:
	// DefaultQueueTimeout.
	QueueTimeout time.Duration
	// QueueSize is how many requests may wait; 0: none, a request that
	// finds the limit reached is shed at once. Recommended:
	// DefaultQueueSize.
	QueueSize int
	// Reserved is the share of the limit, in [0, 1), that only requests
	// of TopPriority (or higher) may use: a lower priority is admitted
	// only while fewer than limit − ⌈limit × Reserved⌉ requests are in
	// flight. Rounded up, so any Reserved > 0 holds at least one slot,
	// and it must leave a lower priority at least one slot at MinLimit.
	// Recommended: DefaultReserved.
	Reserved float64
	// TopPriority is the highest configured priority, the one the
	// reservation is for. Priorities are ordered integers, higher first;
	// any value is allowed.
	TopPriority int
}

// Validate reports every invalid field, naming it.
func (s Settings) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("overload: "+format, args...))
	}
	if s.MinLimit < 1 {
		bad("MinLimit %d: must be at least 1", s.MinLimit)
	}
	if s.MaxLimit < s.MinLimit {
		bad("MaxLimit %d: must not be below MinLimit %d", s.MaxLimit, s.MinLimit)
	}
	if s.InitialLimit < s.MinLimit || s.InitialLimit > s.MaxLimit {
		bad("InitialLimit %d: must be within MinLimit %d and MaxLimit %d", s.InitialLimit, s.MinLimit, s.MaxLimit)
	}
	if s.QueueSize < 0 {
		bad("QueueSize %d: must not be negative (0: no queue)", s.QueueSize)
	}
	if s.QueueTimeout < 0 || s.QueueTimeout == 0 && s.QueueSize > 0 {
		bad("QueueTimeout %v: must be positive with QueueSize %d (for no queue, set QueueSize 0)", s.QueueTimeout, s.QueueSize)
	}
	switch {
	case !(s.Reserved >= 0 && s.Reserved < 1): // also catches NaN
		bad("Reserved %v: must be at least 0 and below 1", s.Reserved)
	case s.MinLimit >= 1 && lowLimit(s.MinLimit, s.Reserved) < 1:
		bad("Reserved %v: leaves priorities below TopPriority no slot at MinLimit %d; lower Reserved or raise MinLimit", s.Reserved, s.MinLimit)
	}
	return errors.Join(errs...)
}

// lowLimit is how many requests of a priority below TopPriority may be in
// flight under limit. The epsilon keeps float error from rounding an
// exact product up (15 × 0.2 is 3.0000000000000004).
func lowLimit(limit int, reserved float64) int {
	if reserved <= 0 {
		return limit
	}
	return limit - int(math.Ceil(float64(limit)*reserved-1e-9))
}

// ErrShed matches (errors.Is) every error of type ShedReason.
var ErrShed = errors.New("overload: shed")

// ShedReason says why Acquire refused a request. It is the error Acquire
// returns: compare it with ==, errors.Is(err, ErrShed) or errors.As.
type ShedReason uint8

const (
	// ShedQueueFull: the limit was reached and the queue was full of
	// requests of the same or a higher priority (or there is no queue).
	ShedQueueFull ShedReason = iota + 1
	// ShedQueueTimeout: no slot freed up within QueueTimeout.
	ShedQueueTimeout
	// ShedEvicted: the request waited, and a request of a higher priority
	// took its place in a full queue (or a reload shrank the queue).
	ShedEvicted
)

// String is the reason's name for metric labels and logs.
func (r ShedReason) String() string {
	switch r {
	case ShedQueueFull:
		return "queue_full"
	case ShedQueueTimeout:
		return "queue_timeout"
	case ShedEvicted:
		return "evicted"
	}
	return fmt.Sprintf("ShedReason(%d)", uint8(r))
}

// Error does not allocate: the messages are constants, and a ShedReason
// fits in an interface without an allocation.
func (r ShedReason) Error() string {
	switch r {
	case ShedQueueFull:
		return "overload: shed: queue full"
	case ShedQueueTimeout:
		return "overload: shed: queue timeout"
	case ShedEvicted:
		return "overload: shed: evicted from the queue"
	}
	return "overload: shed: " + r.String()
}

// Is makes every ShedReason match ErrShed.
func (r ShedReason) Is(target error) bool { return target == ErrShed }

// Limiter bounds the requests in flight to one upstream by an adaptive
// limit (Gradient2), queueing briefly and by priority at the limit. Make
// one with New; it is safe for concurrent use.
type Limiter struct {
	mu       sync.Mutex
	s        Settings
	ctl      gradient2
	limit    int // ctl.current()
	low      int // lowLimit(limit, s.Reserved)
	inFlight int
	q        queue
	waiters  sync.Pool // *waiter, each with its channel and timer
}

// New returns a Limiter at s.InitialLimit, or s.Validate's error.
func New(s Settings) (*Limiter, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	l := &Limiter{s: s, ctl: newGradient2(s.MinLimit, s.MaxLimit, s.InitialLimit)}
	l.waiters.New = func() any {
		t := time.NewTimer(time.Hour)
		t.Stop()
		return &waiter{ready: make(chan struct{}, 1), timer: t}
	}
	l.setLimitLocked()
	return l, nil
}

// Update applies s on a reload, or returns s.Validate's error and changes
// nothing. It keeps the requests in flight and their Tokens, the waiters
// (evicting the lowest if QueueSize shrank below their number), and the
// learned limit and latencies (the limit clamped into the new bounds);
// InitialLimit is not used.
func (l *Limiter) Update(s Settings) error {
	if err := s.Validate(); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.s = s
	l.ctl.setBounds(s.MinLimit, s.MaxLimit)
	l.setLimitLocked()
	l.wakeLocked()
	for l.q.n > s.QueueSize {
		w := l.q.back()
		l.q.remove(w)
		l.signalLocked(w, ShedEvicted)
	}
	return nil
}

// Limit is the current concurrency limit.
func (l *Limiter) Limit() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.limit
}

// InFlight is the number of admitted requests not yet released.
func (l *Limiter) InFlight() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.inFlight
}

// Queued is the number of requests waiting for a slot.
func (l *Limiter) Queued() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.q.n
}

// Token is one admitted request's slot. Release it exactly once, with
// Done or Ignore, when the request is over (its response body included).
// The zero Token, returned with every error, releases nothing.
type Token struct {
	l        *Limiter
	inFlight int  // requests in flight when it was admitted, itself included
	queued   bool // it waited in the queue before it was admitted
}

// Queued reports whether the request waited for its slot (the wait is
// worth measuring); a request admitted at once did not.
func (t Token) Queued() bool { return t.queued }

// Acquire admits a request of the given priority (higher is more
// important) or returns why not.
//
// Below the limit the request is admitted at once; a priority below
// TopPriority, only below the limit less the reserved share. Otherwise it
// waits, highest priority first and first come first served within one,
// for up to QueueTimeout. If the queue is full, a request of a higher
// priority than the lowest waiting takes the place of the newest of those,
// which is shed with ShedEvicted; any other is shed at once with
// ShedQueueFull. A wait ends early with ctx: the error then wraps
// ctx.Err() and is not a ShedReason.
//
// A request admitted at once costs one lock and no allocation; ctx is
// only looked at by a request that waits.
func (l *Limiter) Acquire(ctx context.Context, priority int) (Token, error) {
	l.mu.Lock()
	if l.admissibleLocked(priority) {
		l.inFlight++
		t := Token{l: l, inFlight: l.inFlight}
		l.mu.Unlock()
		return t, nil
	}
	if l.q.n >= l.s.QueueSize {
		last := l.q.back()
		if last == nil || priority <= last.prio {
			l.mu.Unlock()
			return Token{}, ShedQueueFull
		}
		l.q.remove(last)
		l.signalLocked(last, ShedEvicted)
	}
	w := l.waiters.Get().(*waiter)
	w.prio = priority
	l.q.push(w)
	timeout := l.s.QueueTimeout
	l.mu.Unlock()
	return l.wait(ctx, w, timeout)
}

// wait blocks until w is admitted or shed, its timeout passes or ctx is
// done. Whoever takes w out of the queue under the lock decides its fate:
// a signaller sets it and sends on w.ready; a waiter that timed out
// removes w itself, or, finding it already out, takes the signal.
func (l *Limiter) wait(ctx context.Context, w *waiter, timeout time.Duration) (Token, error) {
	w.timer.Reset(timeout)
	var err error
	select {
	case <-w.ready:
	case <-w.timer.C:
		err = ShedQueueTimeout
	case <-ctx.Done():
		err = fmt.Errorf("overload: waiting for a slot: %w", ctx.Err())
	}
	if err != nil {
		l.mu.Lock()
		queued := w.queued
		if queued {
			l.q.remove(w)
		}
		l.mu.Unlock()
		if queued {
			l.putWaiter(w)
			return Token{}, err
		}
		<-w.ready // admitted or evicted just before: that decision stands
	}
	shed, inFlight := w.shed, w.inFlight
	l.putWaiter(w)
	if shed != 0 {
		return Token{}, shed
	}
	return Token{l: l, inFlight: inFlight, queued: true}, nil
}

func (l *Limiter) putWaiter(w *waiter) {
	w.timer.Stop() // since Go 1.23 no stale tick can be received after Stop
	w.shed, w.inFlight = 0, 0
	l.waiters.Put(w)
}

// Done releases the slot of a request that reached the upstream, with
// the latency the upstream took (not the time spent queueing here), and
// whether it was dropped: timed out or refused for overload. A dropped
// request's latency is a sample like any other, as in concurrency-limits;
// see gradient2.sample. now is when the request ended.
//
// Releasing more slots than were admitted panics.
func (t Token) Done(latency time.Duration, dropped bool, now time.Time) {
	l := t.l
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.releaseLocked()
	if l.ctl.sample(latency, t.inFlight, dropped, now) {
		l.setLimitLocked()
	}
	l.wakeLocked()
}

// Ignore releases the slot of a request that says nothing about the
// upstream's latency: refused further down the admission chain (by the
// circuit breaker), failed before it was sent, or abandoned by the client
// first (concurrency-limits' Listener.onIgnore). A fast failure sampled
// with Done would look like a fast upstream and raise the limit.
func (t Token) Ignore() {
	l := t.l
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.releaseLocked()
	l.wakeLocked()
}

func (l *Limiter) releaseLocked() {
	l.inFlight--
	if l.inFlight < 0 {
		l.inFlight = 0
		panic("overload: more Tokens released than admitted (Done or Ignore called twice)")
	}
}

func (l *Limiter) setLimitLocked() {
	l.limit = l.ctl.current()
	l.low = lowLimit(l.limit, l.s.Reserved)
}

func (l *Limiter) admissibleLocked(priority int) bool {
	if priority >= l.s.TopPriority {
		return l.inFlight < l.limit
	}
	return l.inFlight < l.low
}

// wakeLocked admits waiters, best first, while the best one fits. Every
// change that can free a slot (a release, a higher limit, a reload) calls
// it, so a waiter is never admissible for long, and a new arrival that
// is admissible is never behind a waiter that is: waiters of its own
// class would be admissible too, and lower classes are not ahead of it.
func (l *Limiter) wakeLocked() {
	for {
		w := l.q.front()
		if w == nil || !l.admissibleLocked(w.prio) {
			return
		}
		l.q.remove(w)
		l.signalLocked(w, 0)
	}
}

// signalLocked settles a waiter just taken out of the queue: admitted
// (shed 0), its slot counted now, or shed.
func (l *Limiter) signalLocked(w *waiter, shed ShedReason) {
	w.shed = shed
	if shed == 0 {
		l.inFlight++
		w.inFlight = l.inFlight
	}
	w.ready <- struct{}{} // never blocks: one signal per stay in the queue
}
