package overload

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// fixed is Settings with the limit pinned at n (MinLimit = MaxLimit), so
// that the controller cannot move it under a test of the queue.
func fixed(n, queueSize int) Settings {
	return Settings{MinLimit: n, MaxLimit: n, InitialLimit: n, QueueTimeout: time.Second, QueueSize: queueSize}
}

func mustNew(t testing.TB, s Settings) *Limiter {
	t.Helper()
	l, err := New(s)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func mustAcquire(t *testing.T, l *Limiter, priority int) Token {
	t.Helper()
	tok, err := l.Acquire(context.Background(), priority)
	if err != nil {
		t.Fatalf("priority %d refused: %v (in flight %d, limit %d)", priority, err, l.InFlight(), l.Limit())
	}
	return tok
}

type outcome struct {
	name string
	tok  Token
	err  error
}

// arrive starts a request that may wait and, in a synctest bubble, waits
// until it is admitted, shed or blocked in the queue, so that arrivals
// reach the queue in the order of the calls.
func arrive(l *Limiter, priority int, name string, out chan<- outcome) {
	go func() {
		tok, err := l.Acquire(context.Background(), priority)
		out <- outcome{name, tok, err}
	}()
	synctest.Wait()
}

// next returns the outcome that arrived, or fails if none did.
func next(t *testing.T, out <-chan outcome) outcome {
	t.Helper()
	synctest.Wait()
	select {
	case o := <-out:
		return o
	default:
		t.Fatal("no request admitted or shed")
		return outcome{}
	}
}

func none(t *testing.T, out <-chan outcome) {
	t.Helper()
	synctest.Wait()
	select {
	case o := <-out:
		t.Fatalf("%s: unexpected outcome %v", o.name, o.err)
	default:
	}
}

func TestAdmitBelowLimitAndRelease(t *testing.T) {
	l := mustNew(t, fixed(3, 0))
	a, b, c := mustAcquire(t, l, 0), mustAcquire(t, l, 0), mustAcquire(t, l, 0)
	if got := l.InFlight(); got != 3 {
		t.Fatalf("in flight %d, want 3", got)
	}
	if _, err := l.Acquire(context.Background(), 0); err != ShedQueueFull {
		t.Fatalf("4th request at limit 3 without a queue: %v, want ShedQueueFull", err)
	}
	a.Done(time.Millisecond, false, t0)
	b.Ignore()
	if got := l.InFlight(); got != 1 {
		t.Fatalf("in flight %d after two releases, want 1", got)
	}
	mustAcquire(t, l, 0).Ignore()
	c.Done(time.Millisecond, true, t0)
	if got := l.InFlight(); got != 0 {
		t.Errorf("in flight %d after every release", got)
	}
	Token{}.Done(time.Millisecond, false, t0) // the zero Token releases nothing
	Token{}.Ignore()
}

func TestQueueOrderPriorityThenFIFO(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustNew(t, fixed(1, 10))
		held := mustAcquire(t, l, 0)
		out := make(chan outcome, 10)
		for _, a := range []struct {
			prio int
			name string
		}{{1, "a1"}, {3, "b3"}, {1, "c1"}, {2, "d2"}, {3, "e3"}, {-1, "f-1"}} {
			arrive(l, a.prio, a.name, out)
		}
		none(t, out)
		if got := l.Queued(); got != 6 {
			t.Fatalf("%d queued, want 6", got)
		}
		var order []string
		for range 6 {
			held.Ignore()
			o := next(t, out)
			if o.err != nil {
				t.Fatalf("%s: %v", o.name, o.err)
			}
			order = append(order, o.name)
			held = o.tok
			none(t, out) // one release admits one waiter
		}
		if got, want := strings.Join(order, " "), "b3 e3 d2 a1 c1 f-1"; got != want {
			t.Errorf("admitted in order %q, want %q", got, want)
		}
		held.Ignore()
	})
}

// An admitted waiter's slot is counted when it is woken, so a request
// arriving between the release and the waiter's return does not take it.
func TestReleasedSlotGoesToWaiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustNew(t, fixed(1, 10))
		held := mustAcquire(t, l, 5)
		out := make(chan outcome, 1)
		arrive(l, 0, "waiter", out)
		held.Ignore() // the waiter has the slot now, whether it runs yet or not
		if got := l.InFlight(); got != 1 {
			t.Fatalf("%d in flight after the release to the waiter, want 1", got)
		}
		// A cancelled context makes Acquire give up instead of waiting.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := l.Acquire(ctx, 9); !errors.Is(err, context.Canceled) {
			t.Fatalf("a new request got %v; the slot was released to the waiter", err)
		}
		o := next(t, out)
		if o.err != nil {
			t.Fatalf("waiter: %v", o.err)
		}
		if o.tok.inFlight != 1 {
			t.Errorf("waiter admitted with %d in flight, want 1", o.tok.inFlight)
		}
		o.tok.Ignore()
	})
}

func TestFullQueueShedsAndEvicts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustNew(t, fixed(1, 3))
		held := mustAcquire(t, l, 0)
		out := make(chan outcome, 10)
		arrive(l, 0, "a0", out)
		arrive(l, 1, "b1", out)
		arrive(l, 0, "c0", out)
		none(t, out)

		// Full: the same or a lower priority than the lowest waiting is
		// shed at once.
		for _, prio := range []int{0, -1} {
			if _, err := l.Acquire(context.Background(), prio); err != ShedQueueFull {
				t.Fatalf("priority %d at a full queue: %v, want ShedQueueFull", prio, err)
			}
		}
		// A higher one evicts the newest of the lowest priority.
		arrive(l, 2, "d2", out)
		if o := next(t, out); o.name != "c0" || o.err != ShedEvicted {
			t.Fatalf("%s: %v, want c0 evicted", o.name, o.err)
		}
		arrive(l, 1, "e1", out)
		if o := next(t, out); o.name != "a0" || o.err != ShedEvicted {
			t.Fatalf("%s: %v, want a0 evicted", o.name, o.err)
		}
		// Now the lowest waiting are priority 1: a 1 is shed.
		if _, err := l.Acquire(context.Background(), 1); err != ShedQueueFull {
			t.Fatalf("priority 1 with b1, e1, d2 waiting: %v, want ShedQueueFull", err)
		}
		if got := l.Queued(); got != 3 {
			t.Fatalf("%d queued, want 3", got)
		}
		var order []string
		for range 3 {
			held.Ignore()
			o := next(t, out)
			if o.err != nil {
				t.Fatalf("%s: %v", o.name, o.err)
			}
			order = append(order, o.name)
			held = o.tok
		}
		if got, want := strings.Join(order, " "), "d2 b1 e1"; got != want {
			t.Errorf("admitted %q, want %q", got, want)
		}
		held.Ignore()
	})
}

func TestQueueTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := fixed(1, 10)
		s.QueueTimeout = 50 * time.Millisecond
		l := mustNew(t, s)
		held := mustAcquire(t, l, 0)
		out := make(chan outcome, 2)
		start := time.Now()
		arrive(l, 0, "late", out)
		time.Sleep(50*time.Millisecond - time.Nanosecond)
		none(t, out)
		time.Sleep(time.Nanosecond)
		o := next(t, out)
		if o.err != ShedQueueTimeout {
			t.Fatalf("after QueueTimeout: %v, want ShedQueueTimeout", o.err)
		}
		if waited := time.Since(start); waited != 50*time.Millisecond {
			t.Errorf("waited %v (fake clock), want 50ms", waited)
		}
		if got := l.Queued(); got != 0 {
			t.Errorf("%d still queued after the timeout", got)
		}
		// The timed-out waiter took no slot: a release leaves none in flight.
		held.Ignore()
		if got := l.InFlight(); got != 0 {
			t.Errorf("%d in flight", got)
		}
		// A pooled waiter's timer starts afresh: no stale timeout.
		held = mustAcquire(t, l, 0)
		arrive(l, 0, "again", out)
		time.Sleep(40 * time.Millisecond)
		none(t, out)
		held.Ignore()
		if o := next(t, out); o.err != nil {
			t.Fatalf("second waiter: %v", o.err)
		} else {
			o.tok.Ignore()
		}
	})
}

func TestContextEndsWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustNew(t, fixed(1, 10))
		held := mustAcquire(t, l, 0)
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			_, err := l.Acquire(ctx, 0)
			errc <- err
		}()
		synctest.Wait()
		cancel()
		err := <-errc
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrShed) {
			t.Errorf("cancelled wait: %v, want context.Canceled and not ErrShed", err)
		}
		if got := l.Queued(); got != 0 {
			t.Errorf("%d queued after the cancel", got)
		}
		held.Ignore()
	})
}

func TestReservedShare(t *testing.T) {
	s := fixed(10, 0)
	s.Reserved = 0.2
	s.TopPriority = 2
	l := mustNew(t, s)
	var toks []Token
	for i := 0; i < 8; i++ { // 10 − ⌈10 × 0.2⌉
		toks = append(toks, mustAcquire(t, l, 1))
	}
	if _, err := l.Acquire(context.Background(), 1); err != ShedQueueFull {
		t.Fatalf("priority 1 with 8 of 10 in flight and 2 reserved: %v, want refused", err)
	}
	toks = append(toks, mustAcquire(t, l, 2), mustAcquire(t, l, 3)) // above TopPriority counts as top
	if _, err := l.Acquire(context.Background(), 2); err != ShedQueueFull {
		t.Fatalf("top priority at the limit: %v, want refused", err)
	}
	toks[0].Ignore()
	toks[1].Ignore()
	if _, err := l.Acquire(context.Background(), 1); err != ShedQueueFull {
		t.Fatalf("priority 1 with 8 in flight: %v, want refused", err)
	}
	toks = append(toks[2:], mustAcquire(t, l, 2))
	toks[0].Ignore()
	toks[1].Ignore()
	mustAcquire(t, l, 0).Ignore() // 7 in flight: lower priorities fit again
	for _, tok := range toks[2:] {
		tok.Ignore()
	}
	if got := l.InFlight(); got != 0 {
		t.Errorf("%d in flight", got)
	}

	// Rounded up: at limit 5 a reservation of 0.1 holds one slot.
	if got := lowLimit(5, 0.1); got != 4 {
		t.Errorf("lowLimit(5, 0.1) = %d, want 4", got)
	}
	if got := lowLimit(15, 0.2); got != 12 {
		t.Errorf("lowLimit(15, 0.2) = %d, want 12", got)
	}
	if got := lowLimit(15, 0); got != 15 {
		t.Errorf("lowLimit(15, 0) = %d, want 15", got)
	}
}

// Waiting for a slot in the reserved share: the top priority goes first,
// and a top-priority arrival passes lower waiters that do not fit.
func TestReservedShareInQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := fixed(4, 10)
		s.Reserved = 0.25
		s.TopPriority = 1
		l := mustNew(t, s)
		var toks []Token
		for range 3 {
			toks = append(toks, mustAcquire(t, l, 0))
		}
		out := make(chan outcome, 4)
		arrive(l, 0, "low", out)
		none(t, out)
		top := mustAcquire(t, l, 1) // 4th slot, reserved, while low waits
		arrive(l, 1, "top", out)
		top.Ignore() // 3 in flight: only the top waiter fits
		if o := next(t, out); o.name != "top" || o.err != nil {
			t.Fatalf("%s: %v, want top admitted", o.name, o.err)
		} else {
			toks = append(toks, o.tok)
		}
		toks[0].Ignore()
		none(t, out) // 3 in flight: still no room below the reservation
		toks[1].Ignore()
		if o := next(t, out); o.name != "low" || o.err != nil {
			t.Fatalf("%s: %v, want low admitted", o.name, o.err)
		} else {
			toks = append(toks, o.tok)
		}
		for _, tok := range toks[2:] {
			tok.Ignore()
		}
	})
}

// The limiter feeds its controller: with the upstream kept busy at a
// steady latency the limit grows, and when latency doubles it shrinks.
func TestLimiterLearns(t *testing.T) {
	s := DefaultSettings()
	s.InitialLimit = 20
	l := mustNew(t, s)
	now := t0
	var toks []Token
	fill := func() {
		for len(toks) < l.Limit() {
			toks = append(toks, mustAcquire(t, l, 0))
		}
	}
	// 100 windows; each request is replaced as it ends, so in flight stays
	// at the limit.
	run := func(latency time.Duration, windows int) {
		for range windows * 20 {
			now = now.Add(windowMax / 20)
			fill()
			toks[0].Done(latency, false, now)
			toks = toks[1:]
		}
	}
	run(10*time.Millisecond, 100)
	grown := l.Limit()
	if grown < 60 {
		t.Fatalf("limit %d after 100 busy windows at a steady latency, from 20", grown)
	}
	run(20*time.Millisecond, 20)
	if got := l.Limit(); got > grown*3/4 {
		t.Errorf("limit %d 20 windows after latency doubled, from %d", got, grown)
	}
	for _, tok := range toks {
		tok.Ignore()
	}
	if got := l.InFlight(); got != 0 {
		t.Errorf("%d in flight", got)
	}
}

func TestUpdateKeepsAccounting(t *testing.T) {
	l := mustNew(t, fixed(4, 0))
	toks := []Token{mustAcquire(t, l, 0), mustAcquire(t, l, 0), mustAcquire(t, l, 0)}
	if err := l.Update(fixed(2, 0)); err != nil {
		t.Fatal(err)
	}
	if got := l.InFlight(); got != 3 {
		t.Fatalf("in flight %d after Update, want 3", got)
	}
	if got := l.Limit(); got != 2 {
		t.Fatalf("limit %d after Update to MaxLimit 2", got)
	}
	if _, err := l.Acquire(context.Background(), 0); err != ShedQueueFull {
		t.Fatalf("3 in flight, limit 2: %v, want refused", err)
	}
	toks[0].Done(time.Millisecond, false, t0)
	toks[1].Ignore()
	toks = append(toks[2:], mustAcquire(t, l, 0)) // 1 in flight: one fits
	if _, err := l.Acquire(context.Background(), 0); err != ShedQueueFull {
		t.Fatalf("2 in flight, limit 2: %v, want refused", err)
	}

	// A bad Update changes nothing.
	bad := fixed(8, 0)
	bad.MinLimit = 0
	if err := l.Update(bad); err == nil {
		t.Fatal("Update accepted MinLimit 0")
	}
	if got := l.Limit(); got != 2 {
		t.Errorf("limit %d after a rejected Update", got)
	}
	for _, tok := range toks {
		tok.Ignore()
	}
	if got := l.InFlight(); got != 0 {
		t.Errorf("%d in flight", got)
	}
}

// Update keeps the learned limit (InitialLimit is for new Limiters only).
func TestUpdateKeepsLearnedLimit(t *testing.T) {
	s := DefaultSettings()
	l := mustNew(t, s)
	l.mu.Lock()
	l.ctl.limit = 321.5
	l.setLimitLocked()
	l.mu.Unlock()
	s.QueueTimeout = time.Second
	s.InitialLimit = 17
	if err := l.Update(s); err != nil {
		t.Fatal(err)
	}
	if got := l.Limit(); got != 321 {
		t.Errorf("limit %d after Update, want the learned 321", got)
	}
}

func TestUpdateWakesAndTrimsQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustNew(t, fixed(1, 5))
		held := mustAcquire(t, l, 0)
		out := make(chan outcome, 5)
		for _, name := range []string{"a", "b", "c", "d", "e"} {
			arrive(l, 0, name, out)
		}
		// Limit 2: "a" is admitted; queue 2: the newest two of the rest are shed.
		if err := l.Update(fixed(2, 2)); err != nil {
			t.Fatal(err)
		}
		got := map[string]error{}
		for range 3 {
			o := next(t, out)
			got[o.name] = o.err
			if o.err == nil {
				defer o.tok.Ignore()
			}
		}
		none(t, out)
		if got["a"] != nil || got["d"] != ShedEvicted || got["e"] != ShedEvicted || len(got) != 3 {
			t.Errorf("after Update: %v, want a admitted, d and e evicted", got)
		}
		if q, f := l.Queued(), l.InFlight(); q != 2 || f != 2 {
			t.Errorf("%d queued, %d in flight; want 2, 2", q, f)
		}
		held.Ignore()
		o := next(t, out)
		if o.name != "b" || o.err != nil {
			t.Fatalf("%s: %v, want b admitted", o.name, o.err)
		}
		o.tok.Ignore()
		o = next(t, out)
		if o.name != "c" || o.err != nil {
			t.Fatalf("%s: %v, want c admitted", o.name, o.err)
		}
		o.tok.Ignore()
	})
}

func TestReleaseTwicePanics(t *testing.T) {
	l := mustNew(t, fixed(2, 0))
	tok := mustAcquire(t, l, 0)
	tok.Ignore()
	defer func() {
		if recover() == nil {
			t.Error("a second release did not panic")
		}
		if got := l.InFlight(); got != 0 {
			t.Errorf("in flight %d after the panic", got)
		}
		mustAcquire(t, l, 0).Ignore() // still usable
	}()
	tok.Done(time.Millisecond, false, t0)
}

func TestValidate(t *testing.T) {
	f := func(edit func(*Settings), want string) {
		t.Helper()
		s := DefaultSettings()
		edit(&s)
		err := s.Validate()
		if want == "" {
			if err != nil {
				t.Errorf("%+v: %v", s, err)
			}
			return
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%+v: error %v, want it to contain %q", s, err, want)
		}
		if _, nerr := New(s); nerr == nil {
			t.Errorf("New accepted %+v", s)
		}
	}
	f(func(*Settings) {}, "")
	f(func(s *Settings) { s.QueueSize, s.QueueTimeout = 0, 0 }, "") // no queue
	f(func(s *Settings) { s.Reserved = 0 }, "")
	f(func(s *Settings) { s.MinLimit, s.MaxLimit, s.InitialLimit, s.Reserved = 1, 1, 1, 0 }, "")
	f(func(s *Settings) { s.MinLimit = 0 }, "overload: MinLimit 0: must be at least 1")
	f(func(s *Settings) { s.MaxLimit = 9 }, "MaxLimit 9: must not be below MinLimit 10")
	f(func(s *Settings) { s.InitialLimit = 9 }, "InitialLimit 9: must be within MinLimit 10 and MaxLimit 1000")
	f(func(s *Settings) { s.InitialLimit = 1001 }, "InitialLimit 1001")
	f(func(s *Settings) { s.QueueSize = -1 }, "QueueSize -1: must not be negative")
	f(func(s *Settings) { s.QueueTimeout = 0 }, "QueueTimeout 0s: must be positive with QueueSize 1000")
	f(func(s *Settings) { s.QueueTimeout = -time.Second }, "QueueTimeout -1s")
	f(func(s *Settings) { s.Reserved = 1 }, "Reserved 1: must be at least 0 and below 1")
	f(func(s *Settings) { s.Reserved = -0.1 }, "Reserved -0.1")
	f(func(s *Settings) { s.Reserved = nan() }, "Reserved NaN")
	f(func(s *Settings) { s.MinLimit, s.InitialLimit = 1, 1 }, "Reserved 0.1: leaves priorities below TopPriority no slot at MinLimit 1")

	// Every problem is reported.
	err := Settings{MaxLimit: -1, QueueSize: -1, Reserved: 2}.Validate()
	for _, want := range []string{"MinLimit", "MaxLimit", "InitialLimit", "QueueSize", "Reserved"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("zero-ish settings: %v, want it to name %s", err, want)
		}
	}
}

func nan() float64 { zero := 0.0; return zero / zero }

func TestShedReason(t *testing.T) {
	for r, name := range map[ShedReason]string{ShedQueueFull: "queue_full", ShedQueueTimeout: "queue_timeout", ShedEvicted: "evicted", 0: "ShedReason(0)"} {
		if got := r.String(); got != name {
			t.Errorf("%d.String() = %q, want %q", r, got, name)
		}
		var err error = r
		if !errors.Is(err, ErrShed) || !strings.HasPrefix(err.Error(), "overload: shed: ") {
			t.Errorf("%v: not ErrShed, or a message without the prefix", err)
		}
		var got ShedReason
		if !errors.As(errors.Join(errors.New("x"), err), &got) || got != r {
			t.Errorf("errors.As gave %v, want %v", got, r)
		}
	}
}

// TestConcurrent runs mixed priorities, waits, timeouts, cancels and
// reloads at once (under -race) and checks the accounting: never more in
// flight than MaxLimit, every request admitted or refused exactly once,
// nothing left over.
func TestConcurrent(t *testing.T) {
	s := Settings{MinLimit: 2, MaxLimit: 6, InitialLimit: 4, QueueTimeout: time.Millisecond, QueueSize: 4, Reserved: 0.25, TopPriority: 2}
	l := mustNew(t, s)
	var holders, peak, admitted, shed, cancelled atomic.Int64
	const workers, each = 8, 2000
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var reloads sync.WaitGroup
	reloads.Go(func() {
		alt := s
		alt.MaxLimit, alt.InitialLimit, alt.QueueSize, alt.Reserved = 3, 3, 1, 0
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := l.Update([]Settings{s, alt}[i%2]); err != nil {
				t.Error(err)
				return
			}
			time.Sleep(100 * time.Microsecond)
		}
	})
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for i := range each {
				ctx, cancel := context.Background(), context.CancelFunc(func() {})
				if i%7 == 0 {
					ctx, cancel = context.WithCancel(ctx)
					cancel()
				}
				tok, err := l.Acquire(ctx, rng.IntN(4))
				cancel()
				switch {
				case err == nil:
					admitted.Add(1)
					n := holders.Add(1)
					for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
					}
					if rng.IntN(3) == 0 {
						time.Sleep(time.Duration(rng.IntN(50)) * time.Microsecond)
					}
					holders.Add(-1)
					if rng.IntN(4) == 0 {
						tok.Ignore()
					} else {
						tok.Done(time.Duration(1+rng.IntN(5))*time.Millisecond, rng.IntN(10) == 0, time.Now())
					}
				case errors.Is(err, ErrShed):
					shed.Add(1)
				case errors.Is(err, context.Canceled):
					cancelled.Add(1)
				default:
					t.Errorf("unexpected error %v", err)
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	reloads.Wait()
	if got := admitted.Load() + shed.Load() + cancelled.Load(); got != workers*each {
		t.Errorf("%d outcomes for %d requests", got, workers*each)
	}
	if p := peak.Load(); p > int64(s.MaxLimit) {
		t.Errorf("%d in flight at once, above MaxLimit %d", p, s.MaxLimit)
	}
	if admitted.Load() == 0 || shed.Load() == 0 {
		t.Errorf("admitted %d, shed %d: the test did not exercise both", admitted.Load(), shed.Load())
	}
	if f, q := l.InFlight(), l.Queued(); f != 0 || q != 0 {
		t.Errorf("left over: %d in flight, %d queued", f, q)
	}
	t.Logf("admitted %d, shed %d, cancelled %d, peak %d", admitted.Load(), shed.Load(), cancelled.Load(), peak.Load())
}
