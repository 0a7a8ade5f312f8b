package limiter

import (
	"context"
	"time"
)

// Refund gives back one request that Allow admitted for key under rule at
// the instant at (from source src) and that was then not served at all:
// overload protection shed it before it reached the upstream, so it should
// not count against the client's limit. It never blocks on Redis: a
// refund to Redis is queued with the batched decisions (sliding window)
// or sent by a goroutine of its own (GCRA), and dropped when Redis is
// failing. A refund is best effort and never more than the one request:
// a unit whose sub-window has left the window, or whose GCRA credit has
// lapsed, is not given back.
func (l *Limiter) Refund(key string, rule Rule, src Source, at time.Time) {
	if !rule.valid() {
		return
	}
	now := l.s.Now()
	switch src {
	case FromMemory:
		l.mem.refund(key, rule, at, now)
	case FromFallback:
		if l.s.OnStoreError == FailLocal {
			l.mem.refund(key, l.localShare(rule), at, now)
		}
	case FromLease, FromStore:
		if l.leases != nil && l.refundToLease(key, rule, now.UnixMilli()) {
			return
		}
		if src == FromStore && l.openUntil.Load() == 0 {
			l.refundToStore(key, rule, at)
		}
	}
	// FromDenyCache: a denial, nothing was charged.
}

// refundToLease puts the unit back into key's lease when one is being
// spent under rule: it goes back to Redis with the lease's other unspent
// units, or serves the client's next request.
func (l *Limiter) refundToLease(key string, rule Rule, nowMs int64) bool {
	sh := l.leases.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.m[key]
	if e == nil || e.rule != rule || nowMs >= e.expiresMs {
		return false
	}
	e.units++
	return true
}

// maxGCRARefunds bounds the GCRA refunds in flight to Redis.
const maxGCRARefunds = 64

// refundToStore gives one unit back to Redis: for a sliding window, from
// the sub-window the admission was recorded in (at's by the local clock;
// a skew of a sub-window takes it from a neighbour, which only moves when
// it expires), with the lease-return script; for GCRA, as a decision of
// gcraRefundLua, which moves the client's TAT back by one emission interval.
func (l *Limiter) refundToStore(key string, rule Rule, at time.Time) {
	if rule.Algorithm == GCRA {
		// Refunds come in bursts (an overload sheds many at once): at
		// most maxGCRARefunds run at a time, the rest stay counted.
		if l.gcraRefunds.Add(1) > maxGCRARefunds {
			l.gcraRefunds.Add(-1)
			return
		}
		go func() {
			defer l.gcraRefunds.Add(-1)
			ctx, cancel := context.WithTimeout(context.Background(), l.s.StoreTimeout)
			defer cancel()
			l.m.commands.Inc()
			if err := l.store.gcraRefund(ctx, key, rule); err != nil {
				l.m.storeErrors.Inc()
			}
		}()
		return
	}
	w, _ := geometry(rule.Window)
	c := callPool.Get().(*call)
	c.key, c.rule, c.kind, c.cost, c.idx, c.granted, c.err = key, rule, returnUnits, 1, at.UnixMilli()/w, 0, nil
	select {
	case l.calls <- c:
	default:
		callPool.Put(c) // the queue is full: the unit stays counted
	}
}

// refund undoes one admission of key made at the instant at: the count of
// at's sub-window goes down by one (sliding window), or the TAT back by
// one emission interval, never behind now (GCRA). A key no longer held
// has nothing to give back.
func (m *Memory) refund(key string, rule Rule, at, now time.Time) {
	s := m.states.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.m[key]
	if e == nil {
		return
	}
	if rule.Algorithm == GCRA {
		emission := float64(rule.Window.Milliseconds()) / float64(rule.Limit)
		e.tat = max(e.tat-emission, float64(now.UnixMilli()))
		return
	}
	e.rescale(rule.Window)
	idx := at.UnixMilli() / e.width
	for i := range e.buckets {
		if b := &e.buckets[i]; b.idx == idx && b.n > 0 {
			b.n--
			return
		}
	}
}
