package limiter

// Quota leases (Settings.Lease).
//
// Without leases every request of a client costs one script call in Redis
// (batched with others). With leases, a replica that sees a client often
// takes several units of the client's quota in one call and admits the
// client's next requests from them in memory:
//
//   - Grant. The sliding-window script, asked for n units, grants
//     g = min(n, limit - count) and records them in the current sub-window
//     exactly as g admissions; g = 0 is the usual denial (retry time, deny
//     cache). A GCRA rule uses redis_rate's AllowAtMost, which charges the
//     bucket for what it grants.
//   - Spend. While units are left and the lease is younger than
//     LeaseDuration, a request of that client is admitted from it with no
//     Redis call (Source FromLease). Units already granted are spent during
//     a store outage too: Redis counted them.
//   - Give back. Units left when a lease expires (or when its client is
//     evicted from the table, its rule changes, or the limiter closes) go
//     back (windowBatchLua's giveBack), queued for the batcher, off the
//     request path: they are subtracted from the sub-window they were
//     recorded in, unless it has left the window meanwhile (then they
//     expired with it).
//     GCRA units cannot be given back: the leftover of a GCRA lease expires.
//     Nothing is given back while Redis is being left alone (cool-down):
//     those units stay counted until they leave the window.
//   - Size. floor(r × LeaseDuration), r being the client's request rate at
//     this replica, capped at floor(LeaseOvershoot × limit ÷ N), N the live
//     replicas this replica last saw (the heartbeat). r is an exponentially
//     weighted moving average with time constant LeaseDuration, so
//     r × LeaseDuration is a count of the client's recent requests in which
//     each weighs e^(-age/LeaseDuration). A size of 1 or less means no
//     lease: a lone request counts 1, so a cold client is decided request
//     by request, exactly as without leases.
//   - One fetch at a time per client and replica: requests that find the
//     lease used up while the next one is being fetched wait for it and
//     spend from it; if it is used up again before they get a unit, they are
//     decided one by one.
//
// The bound. Take any interval [s, s+W) of one window's length W and one
// client. The units Redis granted at or after s are at most the limit L:
// at the last such grant, Redis' count covered at least W back, so all of
// them (less only units given back, which were not spent). Every other
// admission in the interval was granted before s and spent after it: it
// was held in a lease at s. A replica holds at most one lease per client
// (a new one is fetched only when the last is used up or expired, and
// expired units cannot be spent), of at most floor(f × L ÷ N) units. So
// while every replica's N is at least the number of replicas holding
// leases, no interval of length W admits more than L + f × L. N lags when
// replicas start (up to one heartbeat, plus LeaseDuration for leases
// sized before): then the bound is L + f × L × (replicas ÷ N).
//
// The cost on the other side: units held by one replica cannot be used by
// another until they are spent or given back (at most f × L at once, for at
// most LeaseDuration), and a GCRA lease's leftover is lost.

import (
	"context"
	"math"
	"time"
)

// leaseShards is the number of shards of the lease table (Limiter.leases).
const leaseShards = 16

// leaseEntry is one client at this replica: its recent requests and its
// lease, if any. Guarded by its shard's mutex.
type leaseEntry struct {
	recent float64 // requests, each weighted e^(-age/LeaseDuration): rate × LeaseDuration
	seenMs int64   // the latest request (local clock)

	units     int   // granted and not yet spent
	rule      Rule  // what the units were granted under
	idx       int64 // sliding window: Redis' sub-window of the grant, where unspent units go back
	limit     int   // the decision's Limit
	remaining int   // what Redis had left after the grant
	resetMs   int64 // when the whole quota is free again, per the grant (local clock)
	expiresMs int64 // units are not spent from this instant on (local clock)

	wait chan struct{} // while a request fetches the next lease; closed when it is settled
}

// observe counts one request at nowMs in e's decaying count.
func (e *leaseEntry) observe(nowMs int64, tau time.Duration) {
	if dt := nowMs - e.seenMs; e.seenMs != 0 && dt > 0 {
		e.recent *= math.Exp(-float64(dt) / float64(tau.Milliseconds()))
	}
	e.recent++
	e.seenMs = max(e.seenMs, nowMs)
}

// decision is what a request admitted from e's lease is told: Redis'
// remaining count after the grant plus the units still held here.
func (e *leaseEntry) decision(nowMs int64) Decision {
	return Decision{Allowed: true, Limit: e.limit, Remaining: e.remaining + e.units,
		ResetAfter: time.Duration(max(0, e.resetMs-nowMs)) * time.Millisecond}
}

// maxLease is the largest lease a replica takes under rule:
// floor(LeaseOvershoot × limit ÷ live replicas).
func (l *Limiter) maxLease(rule Rule) int {
	n := max(1, l.replicas.Load())
	// The epsilon keeps 0.29 × 100 at 29, not 28.999999999999996.
	return int(math.Floor(l.s.LeaseOvershoot*float64(rule.Limit)/float64(n) + 1e-9))
}

// leaseSize is the lease to ask for a client whose recent requests are e.
func (l *Limiter) leaseSize(e *leaseEntry, rule Rule) int {
	return min(int(e.recent), l.maxLease(rule))
}

// leaseStep is what take found.
type leaseStep uint8

const (
	leaseSpent leaseStep = iota // a unit was spent: the request is admitted
	leaseWait                   // another request is fetching the next lease
	leaseFetch                  // this request must fetch it, then settle
	leaseNone                   // no lease: decide this request alone
)

type taken struct {
	step leaseStep
	d    Decision      // leaseSpent
	e    *leaseEntry   // leaseFetch
	wait chan struct{} // leaseWait
	size int           // leaseFetch
}

// take is the in-memory half of a leased decision for key at nowMs:
// observe counts the request in the client's rate (once per request);
// fetch false (Redis failing) never starts a fetch.
func (l *Limiter) take(key string, rule Rule, nowMs int64, observe, fetch bool) taken {
	sh := l.leases.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := getOrAdd(l.leases, sh, key, nowMs, l.evictLease)
	if observe {
		e.observe(nowMs, l.s.LeaseDuration)
	}
	if e.units > 0 {
		if nowMs < e.expiresMs && e.rule == rule {
			e.units--
			return taken{step: leaseSpent, d: e.decision(nowMs)}
		}
		l.returnUnspent(key, e) // expired, or the limit changed under it
	}
	if e.wait != nil {
		return taken{step: leaseWait, wait: e.wait}
	}
	size := l.leaseSize(e, rule)
	if size <= 1 || !fetch {
		return taken{step: leaseNone}
	}
	e.wait = make(chan struct{})
	return taken{step: leaseFetch, e: e, size: size}
}

// settle ends a fetch of key's lease: units are what is left of the grant
// after the fetching request took its own (0 when denied or failed), and
// the requests waiting for it go on.
func (l *Limiter) settle(key string, e *leaseEntry, rule Rule, units int, idx int64, d Decision, nowMs int64) {
	sh := l.leases.shard(key)
	sh.mu.Lock()
	e.units, e.rule, e.idx = units, rule, idx
	e.limit, e.remaining = d.Limit, d.Remaining
	e.resetMs = nowMs + d.ResetAfter.Milliseconds()
	e.expiresMs = nowMs + l.s.LeaseDuration.Milliseconds()
	close(e.wait)
	e.wait = nil
	sh.mu.Unlock()
}

// allowLeased decides key's request from this replica's lease, fetching
// a new lease when the client is hot enough. ok false leaves the request to
// the ordinary path: a cold client, Redis failing (once the lease is spent),
// or a lease used up again while this request waited for it.
func (l *Limiter) allowLeased(key string, rule Rule, now time.Time) (d Decision, src Source, ok bool) {
	nowMs := now.UnixMilli()
	t := l.take(key, rule, nowMs, true, l.openUntil.Load() == 0)
	if t.step == leaseWait {
		<-t.wait // the fetch is bounded by the store timeout
		now = l.s.Now()
		nowMs = now.UnixMilli()
		if until, ok := l.denied.get(key, nowMs); ok { // the fetch was denied
			return l.denyCached(rule, until, nowMs), FromDenyCache, true
		}
		if t = l.take(key, rule, nowMs, false, l.openUntil.Load() == 0); t.step == leaseWait {
			t.step = leaseNone
		}
	}
	switch t.step {
	case leaseSpent:
		return t.d, FromLease, true
	case leaseNone:
		return Decision{}, 0, false
	}
	d, granted, idx, err := l.request(key, rule, lease, t.size)
	if err != nil {
		l.settle(key, t.e, rule, 0, 0, Decision{}, nowMs)
		l.failed(nowMs, err)
		return l.fallback(key, rule, now), FromFallback, true
	}
	l.succeeded()
	if granted == 0 {
		if d.RetryAfter > 0 {
			l.denied.put(key, nowMs+d.RetryAfter.Milliseconds()) // before the waiters look
		}
		l.settle(key, t.e, rule, 0, 0, d, nowMs)
		return d, FromStore, true
	}
	l.m.leases.Inc()
	l.m.unitsGranted.Add(granted)
	l.settle(key, t.e, rule, granted-1, idx, d, l.s.Now().UnixMilli())
	d.Remaining += granted - 1
	return d, FromStore, true
}

// returnUnspent gives e's unspent units back: queued for the batcher
// (sliding window), or counted as expired (GCRA, Redis left alone, queue
// full). Called with e's shard locked.
func (l *Limiter) returnUnspent(key string, e *leaseEntry) {
	n := e.units
	e.units = 0
	if n <= 0 {
		return
	}
	if e.rule.Algorithm == GCRA || l.openUntil.Load() != 0 {
		l.m.unitsExpired.Add(n)
		return
	}
	c := callPool.Get().(*call)
	c.key, c.rule, c.kind, c.cost, c.idx, c.granted, c.err = key, e.rule, returnUnits, n, e.idx, 0, nil
	select {
	case l.calls <- c:
	default:
		callPool.Put(c)
		l.m.unitsExpired.Add(n)
	}
}

// countReturned counts the outcome of a returnUnits call the batcher
// sent: the units Redis took back, and the rest as expired.
func (l *Limiter) countReturned(c *call) {
	if c.err != nil {
		l.m.storeErrors.Inc()
		l.m.unitsExpired.Add(c.cost)
		return
	}
	l.m.unitsReturned.Add(c.granted)
	l.m.unitsExpired.Add(c.cost - c.granted)
}

// evictLease makes room in a full shard: of a few entries (map order is
// random, so this samples), one holding no units if there is one, else
// the least recently seen; its units go back. Entries being fetched stay:
// if only those were sampled the shard goes over its share for a while.
func (l *Limiter) evictLease(sh *mapShard[*leaseEntry], nowMs int64) {
	var victim string
	var ve *leaseEntry
	n := 0
	for k, e := range sh.m {
		if e.wait == nil && (ve == nil || evictBefore(e, ve)) {
			victim, ve = k, e
		}
		if n++; n == 8 {
			break
		}
	}
	if ve == nil {
		return
	}
	l.returnUnspent(victim, ve)
	delete(sh.m, victim)
}

// evictBefore says whether a goes before b: holding no units first, then
// the least recently seen.
func evictBefore(a, b *leaseEntry) bool {
	if (a.units == 0) != (b.units == 0) {
		return a.units == 0
	}
	return a.seenMs < b.seenMs
}

// sweepLeases gives back the units of leases expired at nowMs and forgets
// clients idle for ten LeaseDurations. New runs it about twice per
// LeaseDuration.
func (l *Limiter) sweepLeases(nowMs int64) {
	idle := 10 * l.s.LeaseDuration.Milliseconds()
	l.leases.sweep(func(k string, e *leaseEntry) bool {
		if e.wait != nil {
			return true
		}
		if e.units > 0 && nowMs >= e.expiresMs {
			l.returnUnspent(k, e)
		}
		return e.units != 0 || nowMs-e.seenMs <= idle
	})
}

// returnAll gives back, once the goroutines have stopped, the units still
// held and the give-backs still queued, in one batch; decisions still
// queued fail (their callers fall back).
func (l *Limiter) returnAll(ctx context.Context) {
	var calls []*call
	for drained := false; !drained; {
		select {
		case c := <-l.calls:
			if c.kind == returnUnits {
				calls = append(calls, c)
			} else {
				c.err = errClosed
				c.done <- struct{}{}
			}
		default:
			drained = true
		}
	}
	if l.leases != nil {
		l.leases.sweep(func(k string, e *leaseEntry) bool {
			if e.units > 0 && e.rule.Algorithm == SlidingWindow {
				calls = append(calls, &call{key: k, rule: e.rule, kind: returnUnits, cost: e.units, idx: e.idx})
			} else if e.units > 0 {
				l.m.unitsExpired.Add(e.units)
			}
			e.units = 0
			return true // the entries go with the limiter
		})
	}
	if len(calls) == 0 {
		return
	}
	if l.coolingDown(l.s.Now().UnixMilli()) {
		for _, c := range calls {
			l.m.unitsExpired.Add(c.cost)
		}
		return
	}
	l.m.commands.Inc()
	l.store.slidingBatch(ctx, calls, 0)
	for _, c := range calls {
		l.countReturned(c)
	}
}
