package limiter

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/redis/go-redis/v9"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// fakeClock is a Settings.Now that moves only when told.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *fakeClock) Advance(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

// patientClient is client with a timeout of 1 s instead of 50 ms, for
// tests about counts rather than failures: a shared machine may pause
// Redis (or the test) for longer than 50 ms, and a fallback decision
// would then change the counts.
func patientClient(t testing.TB, addr string) redis.UniversalClient {
	t.Helper()
	rdb := NewRedisClient(RedisOptions{Addrs: []string{addr}, Timeout: time.Second})
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// waitUntil polls cond (every 5 ms, at most 5 s) for something another
// goroutine does: the batcher sending give-backs, heartbeats.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not done after 5 s: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The grant and give-back scripts at fixed instants, against slide() as
// the reference.
func TestLeaseScripts(t *testing.T) {
	srv := redistest.Start(t)
	store := newRedisStore(patientClient(t, srv.Addr), "test")
	ctx := context.Background()
	rule := Rule{Limit: 10, Window: time.Second} // sub-windows of 10 ms
	run := func(c *call, now int64) *call {
		t.Helper()
		if store.slidingBatch(ctx, []*call{c}, now); c.err != nil {
			t.Fatal(c.err)
		}
		return c
	}
	grant := func(key string, n int, now int64) *call {
		return run(&call{key: key, rule: rule, kind: lease, cost: n}, now)
	}
	decide1 := func(key string, now int64) Decision {
		return run(&call{key: key, rule: rule, kind: decide, cost: 1}, now).d
	}
	back := func(key string, idx int64, n int, now int64) int {
		return run(&call{key: key, rule: rule, kind: returnUnits, cost: n, idx: idx}, now).granted
	}
	now := t0.UnixMilli()
	sub := now / 10

	t.Run("a grant is that many admissions, partial at the limit", func(t *testing.T) {
		var ref []bucket
		for i, want := range []int{4, 4, 2, 0} {
			c := grant("grant", 4, now)
			var d Decision
			if want > 0 {
				ref, d = slide(ref, rule, now, int64(want))
			} else {
				ref, d = slide(ref, rule, now, 1) // nothing left: the denial of one request
			}
			if c.granted != want || c.d != d || c.idx != sub {
				t.Fatalf("lease %d: granted %d in sub-window %d, %+v; want %d in %d, %+v", i, c.granted, c.idx, c.d, want, sub, d)
			}
		}
		for _, at := range []int64{now + 500, now + 1009, now + 1010, now + 1011} {
			var want Decision
			ref, want = slide(ref, rule, at, 1)
			if got := decide1("grant", at); got != want {
				t.Fatalf("decision at +%d ms: redis %+v, memory %+v", at-now, got, want)
			}
		}
	})

	t.Run("give back into a live sub-window, never below zero", func(t *testing.T) {
		key := "back"
		c := grant(key, 8, now)
		ttl, _ := redistest.Do(srv.Addr, "PTTL", store.windowKey(key, rule.Window))
		if got := back(key, c.idx, 3, now+300); got != 3 {
			t.Fatalf("gave back %d of 3", got)
		}
		if after, _ := redistest.Do(srv.Addr, "PTTL", store.windowKey(key, rule.Window)); after.(int64) <= 0 || after.(int64) > ttl.(int64) {
			t.Errorf("TTL %v before the give-back, %v after", ttl, after)
		}
		// Redis counts 5: five more fit (in another sub-window), not six.
		for i := range 5 {
			if d := decide1(key, now+400); !d.Allowed || d.Remaining != 4-i {
				t.Fatalf("decision %d after the give-back: %+v", i, d)
			}
		}
		if d := decide1(key, now+400); d.Allowed {
			t.Fatalf("11th admission: %+v", d)
		}
		// The grant's sub-window holds 5 now: asked for 100, it gives 5.
		if got := back(key, c.idx, 100, now+500); got != 5 {
			t.Fatalf("gave back %d, want the 5 the sub-window holds", got)
		}
		if got := back(key, c.idx, 1, now+500); got != 0 {
			t.Fatalf("gave back %d from an empty sub-window", got)
		}
		for i := range 5 {
			if d := decide1(key, now+500); !d.Allowed || d.Remaining != 4-i {
				t.Fatalf("decision %d after emptying the grant's sub-window: %+v", i, d)
			}
		}
		if d := decide1(key, now+500); d.Allowed || d.Remaining != 0 {
			t.Fatalf("total went wrong: %+v", d)
		}
	})

	t.Run("give back into an expired sub-window changes nothing", func(t *testing.T) {
		key := "expired"
		c := grant(key, 10, now)
		// At +1010 ms the grant's sub-window has left the window: its
		// units expired with it, before any decision cleared its slot.
		if got := back(key, c.idx, 10, now+1010); got != 0 {
			t.Fatalf("gave back %d into an expired sub-window", got)
		}
		ref := []bucket{{idx: sub, n: 10}}
		for _, at := range []int64{now + 1010, now + 1010, now + 1500} {
			var want Decision
			ref, want = slide(ref, rule, at, 1)
			if got := decide1(key, at); got != want {
				t.Fatalf("decision at +%d ms: redis %+v, memory %+v", at-now, got, want)
			}
		}
	})

	t.Run("give back after the key was lost and created afresh", func(t *testing.T) {
		key := "lost"
		c := grant(key, 10, now)
		if _, err := redistest.Do(srv.Addr, "DEL", store.windowKey(key, rule.Window)); err != nil { // as a failover can
			t.Fatal(err)
		}
		if d := decide1(key, now+200); !d.Allowed || d.Remaining != 9 {
			t.Fatalf("first decision on the new key: %+v", d)
		}
		if got := back(key, c.idx, 10, now+300); got != 0 {
			t.Fatalf("gave back %d units the new key never counted", got)
		}
		if d := decide1(key, now+300); !d.Allowed || d.Remaining != 8 {
			t.Fatalf("after the give-back: %+v", d)
		}
	})
}

// The bound is reached, and why: units granted at t0 are counted from
// t0's sub-window, so Redis frees them one window after the grant even
// if they were spent later. With a limit of 100 and a lease of 10 granted
// at t0 and spent at t0+900ms, Redis admits 100 more from t0+1010ms: the
// window [t0+900ms, t0+1900ms) holds 110, the limit plus the lease.
func TestLeaseOvershootIsTheLeaseHeld(t *testing.T) {
	srv := redistest.Start(t)
	store := newRedisStore(patientClient(t, srv.Addr), "test")
	rule := Rule{Limit: 100, Window: time.Second}
	now := t0.UnixMilli()
	var admitted []time.Time
	at := func(ms int64) time.Time { return time.UnixMilli(now + ms) }

	c := &call{key: "k", rule: rule, kind: lease, cost: 10}
	if store.slidingBatch(context.Background(), []*call{c}, now); c.granted != 10 {
		t.Fatal(c.err, c.granted)
	}
	for range 10 {
		admitted = append(admitted, at(900)) // spent from the lease, 900 ms after the grant
	}
	var calls []*call
	for range 90 { // the rest of the quota, at once
		calls = append(calls, &call{key: "k", rule: rule, kind: decide, cost: 1})
	}
	store.slidingBatch(context.Background(), calls, now)
	for _, c := range calls {
		if !c.d.Allowed {
			t.Fatalf("the rest of the quota: %+v", c.d)
		}
		admitted = append(admitted, at(0))
	}
	for ms := int64(1000); ms < 1900; ms += 5 {
		c := &call{key: "k", rule: rule, kind: decide, cost: 1}
		if store.slidingBatch(context.Background(), []*call{c}, now+ms); c.err != nil {
			t.Fatal(c.err)
		}
		if c.d.Allowed {
			admitted = append(admitted, at(ms))
		}
	}
	slices.SortFunc(admitted, func(a, b time.Time) int { return a.Compare(b) })
	if got := maxInAnyWindow(admitted, rule.Window); got != 110 {
		t.Errorf("max admitted in one window: %d, want 110 (limit 100 + the lease of 10)", got)
	}
}

// seedReplicas makes a limiter created next count n live replicas (itself
// and n-1 others) at its first heartbeat.
func seedReplicas(t *testing.T, addr, prefix string, at time.Time, n int) {
	t.Helper()
	for i := 1; i < n; i++ {
		ms := strconv.FormatInt(at.UnixMilli(), 10)
		if _, err := redistest.Do(addr, "ZADD", "{"+prefix+":replicas}", ms, fmt.Sprintf("other-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
}

// A cold client never leases; a hot client's leases grow with its rate
// up to floor(f × limit ÷ replicas) and never beyond; what a lease did
// not spend goes back when it expires, so that Redis counts exactly what
// was admitted.
func TestLeaseSizeAdapts(t *testing.T) {
	srv := redistest.Start(t)
	clock := &fakeClock{now: t0}
	seedReplicas(t, srv.Addr, "size", t0, 3)
	l := New(Settings{Redis: patientClient(t, srv.Addr), KeyPrefix: "size", Heartbeat: time.Hour, Now: clock.Now, Lease: true, StoreTimeout: time.Second})
	defer l.Close()
	waitUntil(t, "3 replicas seen", func() bool { return l.replicas.Load() == 3 })
	rule := Rule{Limit: 10_000, Window: time.Minute}
	const most = 33 // floor(0.01 × 10,000 ÷ 3)

	// Cold: one request every 2 s (LeaseDuration is 1 s).
	for i := range 20 {
		if d, src := l.Allow("cold", rule); !d.Allowed || src != FromStore {
			t.Fatalf("cold request %d: %+v from %v", i, d, src)
		}
		clock.Advance(2 * time.Second)
	}
	if n := l.m.leases.Get(); n != 0 {
		t.Fatalf("a cold client took %d leases", n)
	}

	// Hot: 100 requests per second.
	var sizes []int
	fromLease := 0
	rounds := l.m.commands.Get()
	for i := range 600 {
		granted := l.m.unitsGranted.Get()
		d, src := l.Allow("hot", rule)
		if !d.Allowed {
			t.Fatalf("hot request %d: %+v", i, d)
		}
		if g := int(l.m.unitsGranted.Get() - granted); g > 0 {
			sizes = append(sizes, g)
		}
		if src == FromLease {
			fromLease++
		}
		// Remaining is what Redis has left plus the units held here.
		if d.Remaining != rule.Limit-i-1 {
			t.Fatalf("request %d from %v: remaining %d, want %d", i, src, d.Remaining, rule.Limit-i-1)
		}
		clock.Advance(10 * time.Millisecond)
	}
	rounds = l.m.commands.Get() - rounds
	t.Logf("hot client, 600 requests at 100/s: leases of %v; %d decided from a lease; %d Redis round trips", sizes, fromLease, rounds)
	if len(sizes) == 0 || sizes[0] < 2 || sizes[len(sizes)-1] != most {
		t.Fatalf("lease sizes %v: want growing from 2 to %d", sizes, most)
	}
	for i, s := range sizes {
		if s > most || (i > 0 && s < sizes[i-1]) {
			t.Fatalf("lease sizes %v: want non-decreasing, at most %d", sizes, most)
		}
	}
	if rounds > 600/10 {
		t.Errorf("%d Redis round trips for 600 requests of a hot client", rounds)
	}

	// The last lease expires with units left: they go back, and Redis
	// counts exactly the requests admitted.
	hot := 600
	held := func() int {
		sh := l.leases.shard("hot")
		sh.mu.Lock()
		defer sh.mu.Unlock()
		return sh.m["hot"].units
	}
	for held() == 0 { // the last lease was used up: take another
		l.Allow("hot", rule)
		hot++
		clock.Advance(10 * time.Millisecond)
	}
	left := held()
	clock.Advance(time.Second)
	l.sweepLeases(clock.Now().UnixMilli())
	waitUntil(t, "the expired lease given back", func() bool { return int(l.m.unitsReturned.Get()) == left })
	check := newRedisStore(patientClient(t, srv.Addr), "size")
	c := &call{key: "hot", rule: rule, kind: decide, cost: 1}
	if check.slidingBatch(context.Background(), []*call{c}, 0); c.err != nil {
		t.Fatal(c.err)
	}
	if counted := rule.Limit - c.d.Remaining - 1; counted != hot {
		t.Errorf("Redis counts %d admissions of the hot client after %d units went back, want %d", counted, left, hot)
	}
}

// At the limit: a partial grant, then denials; a lone replica never
// admits a unit more than the limit.
func TestLeaseAtTheLimit(t *testing.T) {
	srv := redistest.Start(t)
	clock := &fakeClock{now: t0}
	l := New(Settings{Redis: patientClient(t, srv.Addr), KeyPrefix: "limit", Heartbeat: time.Hour, Now: clock.Now, Lease: true, StoreTimeout: time.Second})
	defer l.Close()
	rule := Rule{Limit: 600, Window: time.Minute} // leases of at most 6
	admitted, bySrc := 0, map[Source]int{}
	for range 1000 {
		d, src := l.Allow("hammer", rule)
		bySrc[src]++
		if d.Allowed {
			admitted++
		} else if src != FromStore && src != FromDenyCache {
			t.Fatalf("denial from %v", src)
		}
	}
	t.Logf("1000 requests at one instant, limit 600: %v; %d leases, %d Redis round trips", bySrc, l.m.leases.Get(), l.m.commands.Get())
	if admitted != 600 {
		t.Errorf("admitted %d, limit 600", admitted)
	}
	if bySrc[FromLease] < 450 || l.m.commands.Get() > 150 {
		t.Errorf("leases hardly used: %v, %d round trips", bySrc, l.m.commands.Get())
	}
}

// Units already granted are spent while Redis is down (Redis counted
// them): no byte goes to Redis until the lease is used up; then the
// usual fallback.
func TestLeaseSpentDuringOutage(t *testing.T) {
	srv := redistest.Start(t)
	counter := redistest.CountBytes(t, srv.Addr)
	clock := &fakeClock{now: t0}
	l := New(Settings{Redis: client(t, counter.Addr), KeyPrefix: "outage", Heartbeat: time.Hour, Now: clock.Now, Lease: true})
	defer l.Close()
	rule := Rule{Limit: 6000, Window: time.Minute} // leases of at most 60
	held := askUntilHeld(t, l, "client", rule, 10, 1000, func() { clock.Advance(time.Millisecond) })
	srv.Kill()
	sent := counter.Sent()
	for i := range held {
		if d, src := l.Allow("client", rule); !d.Allowed || src != FromLease {
			t.Fatalf("unit %d of %d held: %+v from %v", i, held, d, src)
		}
	}
	if got := counter.Sent() - sent; got != 0 {
		t.Errorf("%d bytes sent to Redis while spending the lease", got)
	}
	for i := range 5 {
		if d, src := l.Allow("client", rule); !d.Allowed || src != FromFallback {
			t.Fatalf("request %d after the lease: %+v from %v", i, d, src)
		}
	}
	if !l.CoolingDown() {
		t.Error("no cool-down after the lease was spent and Redis failed")
	}
}

// GCRA leases take units with AllowAtMost; an expired leftover cannot be
// given back and is counted as expired.
func TestLeaseGCRA(t *testing.T) {
	srv := redistest.Start(t)
	clock := &fakeClock{now: t0}
	l := New(Settings{Redis: patientClient(t, srv.Addr), KeyPrefix: "gcra", Heartbeat: time.Hour, Now: clock.Now, Lease: true, StoreTimeout: time.Second})
	defer l.Close()
	// 600 per hour, burst 600: a token every 6 s, so at most one more
	// arrives while the test runs.
	rule := Rule{Limit: 600, Window: time.Hour, Algorithm: GCRA, Burst: 600}
	admitted, bySrc := 0, map[Source]int{}
	for range 1000 {
		d, src := l.Allow("gcra", rule)
		bySrc[src]++
		if d.Allowed {
			admitted++
		}
	}
	t.Logf("GCRA, 1000 requests at one instant, burst 600: %d admitted %v; %d leases, %d Redis calls", admitted, bySrc, l.m.leases.Get(), l.m.commands.Get())
	// A partial grant wastes the fraction of a token it was charged for.
	if admitted > 601 || admitted < 590 {
		t.Errorf("admitted %d of a burst of 600", admitted)
	}
	if bySrc[FromLease] < 450 {
		t.Errorf("leases hardly used: %v", bySrc)
	}

	held := askUntilHeld(t, l, "other", rule, 1, 100, nil)
	expired := l.m.unitsExpired.Get()
	clock.Advance(2 * time.Second)
	l.sweepLeases(clock.Now().UnixMilli())
	if got := int(l.m.unitsExpired.Get() - expired); got != held || l.m.unitsReturned.Get() != 0 {
		t.Errorf("GCRA leftover of %d: %d counted expired, %d returned", held, got, l.m.unitsReturned.Get())
	}
}

// The table is capped; an evicted client's units go back.
func TestLeaseTableBounded(t *testing.T) {
	srv := redistest.Start(t)
	clock := &fakeClock{now: t0}
	l := New(Settings{Redis: patientClient(t, srv.Addr), KeyPrefix: "bounded", Heartbeat: time.Hour, Now: clock.Now,
		Lease: true, MaxLeaseKeys: leaseShards, StoreTimeout: time.Second}) // one client per shard
	defer l.Close()
	rule := Rule{Limit: 6000, Window: time.Minute}
	held := askUntilHeld(t, l, "hot", rule, 1, 100, nil)
	for i := range 2000 {
		l.Allow(fmt.Sprintf("cold-%d", i), rule)
	}
	if n := l.leases.Len(); n > leaseShards {
		t.Errorf("%d clients tracked, cap %d", n, leaseShards)
	}
	waitUntil(t, "the evicted lease given back", func() bool { return int(l.m.unitsReturned.Get()) == held })
}

// redisCalls reads how many script calls (EVALSHA and EVAL) Redis ran.
func redisCalls(t *testing.T, addr string) int {
	t.Helper()
	v, err := redistest.Do(addr, "INFO", "commandstats")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for line := range strings.SplitSeq(v.(string), "\n") {
		for _, cmd := range []string{"cmdstat_evalsha:", "cmdstat_eval:"} {
			if rest, ok := strings.CutPrefix(strings.TrimSpace(line), cmd+"calls="); ok {
				c, _ := strconv.Atoi(rest[:strings.IndexByte(rest, ',')])
				n += c
			}
		}
	}
	return n
}

// replicas starts n limiters sharing one Redis, each with its own client
// and settings s otherwise, and waits until each sees n live replicas.
// The caller closes them. The store timeout is long: these tests are about
// counts, and a shared machine may pause Redis longer than 50 ms.
func replicas(t *testing.T, addr string, n int, s Settings) []*Limiter {
	t.Helper()
	var ls []*Limiter
	for range n {
		s.Redis, s.Heartbeat, s.StoreTimeout = patientClient(t, addr), 200*time.Millisecond, time.Second
		ls = append(ls, New(s))
	}
	for _, l := range ls {
		waitUntil(t, fmt.Sprintf("%d replicas seen", n), func() bool { return l.replicas.Load() == int64(n) })
	}
	return ls
}

// Three replicas, one hot client over its limit, leases on: no interval
// of one window admits more than limit × (1 + f) (plus the decisions in
// flight when it starts, see below), and the client gets close to what an
// exact window admits for the same arrivals. Run twice: f = 1 % at about
// twice the limit, and f = 20 % (leases of 200) at about 1.3 times it,
// where each lease lasts long enough to be spent well after its grant.
func TestLeaseBoundThreeReplicas(t *testing.T) {
	srv := redistest.Start(t)
	for _, c := range []struct {
		f    float64
		most int           // floor(f × limit ÷ 3)
		gap  time.Duration // between a worker's requests
	}{{0.01, 10, 2 * time.Millisecond}, {0.2, 200, 3 * time.Millisecond}} {
		t.Run(fmt.Sprintf("f=%v", c.f), func(t *testing.T) {
			ls := replicas(t, srv.Addr, 3, Settings{KeyPrefix: fmt.Sprintf("bound-%v", c.f), Lease: true, LeaseOvershoot: c.f})
			for _, l := range ls {
				defer l.Close()
			}
			leaseBound(t, ls, c.most, c.gap)
		})
	}
}

func leaseBound(t *testing.T, ls []*Limiter, most int, gap time.Duration) {
	rule := Rule{Limit: 3000, Window: 2 * time.Second}
	const workers = 2 // per replica
	var mu sync.Mutex
	var arrived, admitted []time.Time
	bySrc := map[Source]int{}
	minReplicas := int64(len(ls))
	end := time.Now().Add(5 * time.Second)
	var wg sync.WaitGroup
	for _, l := range ls {
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var arr, adm []time.Time
				src := map[Source]int{}
				seen := l.replicas.Load()
				for time.Now().Before(end) {
					seen = min(seen, l.replicas.Load())
					arr = append(arr, time.Now())
					d, s := l.Allow("hot", rule)
					if d.Allowed {
						adm = append(adm, time.Now())
						src[s]++
					}
					time.Sleep(gap)
				}
				mu.Lock()
				arrived, admitted = append(arrived, arr...), append(admitted, adm...)
				for s, n := range src {
					bySrc[s] += n
				}
				minReplicas = min(minReplicas, seen)
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	slices.SortFunc(arrived, func(a, b time.Time) int { return a.Compare(b) })
	slices.SortFunc(admitted, func(a, b time.Time) int { return a.Compare(b) })

	// What an exact sliding window (a log) admits for the same arrivals.
	ideal := 0
	var log []time.Time
	for _, a := range arrived {
		for len(log) > 0 && a.Sub(log[0]) >= rule.Window {
			log = log[1:]
		}
		if len(log) < rule.Limit {
			log = append(log, a)
			ideal++
		}
	}
	// The bound: the limit, plus the leases held at the interval's start
	// (at most floor(f × limit ÷ N) per replica), plus the decisions Redis
	// made before the interval whose answers arrived in it — admission
	// times are taken when Allow returns; at most one per worker.
	if minReplicas < int64(len(ls)) { // a late heartbeat: leases sized for fewer replicas
		most = most * len(ls) / int(minReplicas)
	}
	bound := rule.Limit + len(ls)*most + len(ls)*workers
	got := maxInAnyWindow(admitted, rule.Window)
	leases := 0
	for _, l := range ls {
		leases += int(l.m.leases.Get())
	}
	t.Logf("offered %d in 5 s (%.0f/s), admitted %d (an exact window: %d, %.3f of it); sources %v; %d leases; "+
		"max in any %v: %d = limit + %d; limit + leases held (%d × %d) = %d; asserted bound %d (live replicas seen >= %d)",
		len(arrived), float64(len(arrived))/5, len(admitted), ideal, float64(len(admitted))/float64(ideal), bySrc, leases,
		rule.Window, got, got-rule.Limit, len(ls), most, rule.Limit+len(ls)*most, bound, minReplicas)
	if got > bound {
		t.Errorf("%d admitted within one window, bound %d", got, bound)
	}
	if float64(len(admitted)) < 0.9*float64(ideal) {
		t.Errorf("admitted %d, an exact window admits %d for the same arrivals", len(admitted), ideal)
	}
	if bySrc[FromLease] < len(admitted)/2 {
		t.Errorf("leases hardly used: %v", bySrc)
	}
}

// Redis commands for the same load with and without leases: one hot
// client at 150 requests per second over three replicas, a limit of
// 10,000 per minute, f = 1 %.
func TestLeaseCommands(t *testing.T) {
	srv := redistest.Start(t)
	rule := Rule{Limit: 10_000, Window: time.Minute}
	run := func(leased bool) (calls, admitted, requests int) {
		ls := replicas(t, srv.Addr, 3, Settings{KeyPrefix: fmt.Sprintf("cmds-%v", leased), Lease: leased})
		if _, err := redistest.Do(srv.Addr, "CONFIG", "RESETSTAT"); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, l := range ls {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tick := time.NewTicker(20 * time.Millisecond) // 50 per second per replica
				defer tick.Stop()
				n, ok := 0, 0
				for range 200 {
					<-tick.C
					n++
					if d, _ := l.Allow("hot", rule); d.Allowed {
						ok++
					}
				}
				mu.Lock()
				requests, admitted = requests+n, admitted+ok
				mu.Unlock()
			}()
		}
		wg.Wait()
		for _, l := range ls {
			l.Close() // gives back what is held
		}
		return redisCalls(t, srv.Addr), admitted, requests
	}
	without, okWithout, n1 := run(false)
	with, okWith, n2 := run(true)
	ratio := float64(without) / float64(max(1, with))
	t.Logf("%d requests without leases: %d admitted, %d script calls (%.0f per 1,000); with leases: %d of %d admitted, %d script calls (%.1f per 1,000): %.1fx fewer",
		n1, okWithout, without, 1000*float64(without)/float64(n1), okWith, n2, with, 1000*float64(with)/float64(n2), ratio)
	if okWithout != n1 || okWith != n2 {
		t.Errorf("requests under the limit were denied")
	}
	if ratio < 10 {
		t.Errorf("leases cut script calls %.1fx, want at least 10x", ratio)
	}
}

// The gauges of a metrics set read the limiter created last on it: a
// reload that rebuilds the limiter (turning leases on, say) must not leave
// them reading the closed one.
func TestGaugesFollowTheNewestLimiter(t *testing.T) {
	set := metrics.NewSet()
	gauge := func(name string) string {
		var b strings.Builder
		set.WritePrometheus(&b)
		for line := range strings.SplitSeq(b.String(), "\n") {
			if v, ok := strings.CutPrefix(line, name+" "); ok {
				return v
			}
		}
		return "absent"
	}
	rule := Rule{Limit: 10, Window: time.Minute}
	old := New(Settings{Metrics: set})
	for i := range 5 {
		old.Allow(fmt.Sprint("client-", i), rule)
	}
	if got := gauge("sidecar_ratelimit_memory_keys"); got != "5" {
		t.Fatalf("memory keys %s, want 5", got)
	}
	next := New(Settings{Metrics: set})
	defer next.Close()
	old.Close()
	next.Allow("client-0", rule)
	if got := gauge("sidecar_ratelimit_memory_keys"); got != "1" {
		t.Errorf("memory keys %s after the limiter was replaced, want the new one's 1", got)
	}
}

// askUntilHeld asks as key until its lease holds at least min units, at
// most tries times (calling between after each ask, when set), and
// returns the units held.
func askUntilHeld(t *testing.T, l *Limiter, key string, rule Rule, min, tries int, between func()) int {
	t.Helper()
	for range tries {
		l.Allow(key, rule)
		if between != nil {
			between()
		}
		sh := l.leases.shard(key)
		sh.mu.Lock()
		held := 0
		if e := sh.m[key]; e != nil {
			held = e.units
		}
		sh.mu.Unlock()
		if held >= min {
			return held
		}
	}
	t.Fatalf("no lease of %d units or more for %q after %d requests", min, key, tries)
	return 0
}
