package limiter

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

func client(t testing.TB, addr string) redis.UniversalClient {
	t.Helper()
	rdb := NewRedisClient(RedisOptions{Addrs: []string{addr}})
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// The Lua script and the Go reference give the same answers for the same
// sequence of decisions at the same instants: one decision per script
// call, then batches that mix clients, rules, leases and give-backs, with
// a client several times in one batch.
func TestRedisScriptMatchesMemory(t *testing.T) {
	srv := redistest.Start(t)
	store := newRedisStore(client(t, srv.Addr), "test")
	t.Run("mixed batches", func(t *testing.T) { checkMixedBatches(t, store, "mixed", 300) })
	for _, rule := range []Rule{{Limit: 5, Window: time.Second}, {Limit: 60, Window: time.Minute}, {Limit: 7, Window: 333 * time.Millisecond}} {
		var buckets []bucket
		now := t0.UnixMilli()
		key := fmt.Sprintf("agree-%d-%d", rule.Limit, rule.Window)
		for i := 0; i < 400; i++ {
			now += rand.Int64N(rule.Window.Milliseconds()/int64(rule.Limit)) + 1
			var want Decision
			buckets, want = slide(buckets, rule, now, 1)
			c := &call{key: key, rule: rule, cost: 1}
			if store.slidingBatch(context.Background(), []*call{c}, now); c.err != nil {
				t.Fatal(c.err)
			}
			if c.d != want {
				t.Fatalf("%v step %d at %d: redis %+v, memory %+v", rule, i, now, c.d, want)
			}
		}
	}
}

// refKey is the reference state of one client in checkMixedBatches.
type refKey struct {
	rule    Rule
	buckets []bucket
	grants  []*call // leases granted, whose units may be given back
}

// checkMixedBatches sends steps batches of 1 to 24 calls at fixed
// instants: decisions, leases and give-backs for 8 clients under three
// rules, a client often several times in a batch. Each call's answer must
// be that of slide() applied call after call in batch order: the same
// client twice in one batch is two sequential decisions.
func checkMixedBatches(t *testing.T, store *redisStore, prefix string, steps int) {
	t.Helper()
	rules := []Rule{{Limit: 5, Window: time.Second}, {Limit: 60, Window: time.Minute}, {Limit: 7, Window: 333 * time.Millisecond}}
	ref := map[string]*refKey{}
	var names []string
	for i := range 8 {
		name := fmt.Sprintf("%s-%d", prefix, i)
		names = append(names, name)
		ref[name] = &refKey{rule: rules[i%len(rules)]}
	}
	now := t0.UnixMilli()
	kinds := map[callKind]int{}
	for step := range steps {
		now += rand.Int64N(150) + 1
		var calls []*call
		for range rand.IntN(24) + 1 {
			name := names[rand.IntN(len(names))]
			r := ref[name]
			c := &call{key: name, rule: r.rule, cost: 1}
			switch p := rand.IntN(10); {
			case p < 2:
				c.kind, c.cost = lease, rand.IntN(r.rule.Limit)+1
			case p < 4 && len(r.grants) > 0:
				g := r.grants[rand.IntN(len(r.grants))]
				c.kind, c.cost, c.idx = returnUnits, rand.IntN(g.granted)+1, g.idx
			}
			calls = append(calls, c)
		}
		store.slidingBatch(context.Background(), calls, now)
		for i, c := range calls {
			r := ref[c.key]
			if c.err != nil {
				t.Fatalf("step %d call %d (%s, kind %d): %v", step, i, c.key, c.kind, c.err)
			}
			kinds[c.kind]++
			var want Decision
			wantGranted, wantIdx := 0, c.idx
			w, k := geometry(r.rule.Window)
			cur := now / w
			switch c.kind {
			case decide:
				r.buckets, want = slide(r.buckets, r.rule, now, 1)
			case lease:
				var total int64
				for _, b := range r.buckets {
					if b.idx >= cur-k {
						total += b.n
					}
				}
				g := max(1, min(int64(c.cost), int64(r.rule.Limit)-total))
				if r.buckets, want = slide(r.buckets, r.rule, now, g); want.Allowed {
					wantGranted = int(g)
					r.grants = append(r.grants, c)
				}
				wantIdx = cur
			case returnUnits:
				if c.idx <= cur && cur-c.idx <= k {
					for j := range r.buckets {
						if b := &r.buckets[j]; b.idx == c.idx {
							n := min(int64(c.cost), b.n)
							b.n -= n
							wantGranted = int(n)
						}
					}
				}
			}
			if c.d != want || c.granted != wantGranted || c.idx != wantIdx {
				t.Fatalf("%v step %d call %d of %d (%s, kind %d, cost %d) at %d: redis %+v granted %d in %d; memory %+v granted %d in %d",
					r.rule, step, i, len(calls), c.key, c.kind, c.cost, now, c.d, c.granted, c.idx, want, wantGranted, wantIdx)
			}
		}
	}
	t.Logf("%d batches: %d decisions, %d leases, %d give-backs", steps, kinds[decide], kinds[lease], kinds[returnUnits])
}

func TestRedisSlidingWindowRealTime(t *testing.T) {
	srv := redistest.Start(t)
	l := New(Settings{Redis: client(t, srv.Addr)})
	defer l.Close()
	rule := Rule{Limit: 20, Window: time.Second}
	allowed := 0
	for i := 0; i < 50; i++ {
		if d, src := l.Allow("real", rule); d.Allowed {
			allowed++
		} else if src != FromStore && src != FromDenyCache {
			t.Fatalf("decision from %v", src)
		}
	}
	if allowed != 20 {
		t.Errorf("admitted %d of 50 immediate requests, limit 20", allowed)
	}
}

func TestRedisGCRA(t *testing.T) {
	srv := redistest.Start(t)
	l := New(Settings{Redis: client(t, srv.Addr)})
	defer l.Close()
	// A token every 6 s: the 20 calls cannot earn one back, however slow
	// the machine (at 10 per second, a token regrew after 100 ms).
	rule := Rule{Limit: 10, Window: time.Minute, Algorithm: GCRA, Burst: 4}
	allowed := 0
	for i := 0; i < 20; i++ {
		if d, _ := l.Allow("gcra", rule); d.Allowed {
			allowed++
		}
	}
	if allowed != 4 {
		t.Errorf("GCRA burst admitted %d at once, want the burst of 4", allowed)
	}
}

func TestBatchingUnderConcurrency(t *testing.T) {
	srv := redistest.Start(t)
	l := New(Settings{Redis: client(t, srv.Addr)})
	defer l.Close()
	rule := Rule{Limit: 1000, Window: time.Minute}
	var wg sync.WaitGroup
	var mu sync.Mutex
	allowed := 0
	for g := 0; g < 32; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				if d, _ := l.Allow("shared", rule); d.Allowed {
					mu.Lock()
					allowed++
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	rounds := l.m.commands.Get()
	if allowed != 1000 {
		t.Errorf("admitted %d of 3200 with a limit of 1000", allowed)
	}
	t.Logf("3200 concurrent decisions took %d Redis round trips (%.1f per 100 decisions)", rounds, float64(rounds)/32)
	if rounds >= 3200 {
		t.Errorf("no batching: %d round trips for 3200 decisions", rounds)
	}
}

func TestDenyCacheSparesRedis(t *testing.T) {
	srv := redistest.Start(t)
	counter := redistest.CountBytes(t, srv.Addr)
	l := New(Settings{Redis: client(t, counter.Addr), Heartbeat: time.Hour})
	defer l.Close()
	rule := Rule{Limit: 3, Window: 10 * time.Second}
	for i := 0; i < 4; i++ {
		l.Allow("abuser", rule)
	}
	before := counter.Sent()
	for i := 0; i < 1000; i++ {
		if d, src := l.Allow("abuser", rule); d.Allowed || src != FromDenyCache {
			t.Fatalf("over-limit client: %+v from %v", d, src)
		}
	}
	if sent := counter.Sent() - before; sent != 0 {
		t.Errorf("%d bytes went to Redis for 1000 requests of a client known to be over its limit", sent)
	}
}

// Redis killed, frozen and restarted: decisions never fail, Redis is left
// alone during the cool-down, and shared decisions resume by themselves.
func TestStoreOutages(t *testing.T) {
	srv := redistest.Start(t)
	counter := redistest.CountBytes(t, srv.Addr)
	var logs bytes.Buffer
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	l := New(Settings{Redis: client(t, counter.Addr), Cooldown: 5 * time.Second, Heartbeat: time.Hour,
		Now: clock, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	defer l.Close()
	rule := Rule{Limit: 1000, Window: time.Minute}
	if _, src := l.Allow("first", rule); src != FromStore {
		t.Fatalf("first decision from %v", src)
	}

	for name, outage := range map[string]struct{ down, up func() }{
		"killed": {srv.Kill, srv.Restart},
		"frozen": {srv.Freeze, srv.Thaw},
	} {
		outage.down()
		key := "client-" + name
		for i := 0; i < 3; i++ { // the failure threshold
			start := time.Now()
			d, src := l.Allow(key, rule)
			if src != FromFallback || !d.Allowed {
				t.Fatalf("%s: failure %d: %+v from %v", name, i, d, src)
			}
			t.Logf("%s: failing decision %d took %v", name, i, time.Since(start).Round(time.Microsecond))
		}
		if !l.CoolingDown() {
			t.Fatalf("%s: no cool-down after 3 failures", name)
		}
		sent := counter.Sent()
		start := time.Now()
		for i := 0; i < 1000; i++ {
			if _, src := l.Allow(key, rule); src != FromFallback {
				t.Fatalf("%s: decision during cool-down from %v", name, src)
			}
		}
		per := time.Since(start) / 1000
		if got := counter.Sent() - sent; got != 0 {
			t.Errorf("%s: %d bytes sent to Redis during the cool-down", name, got)
		}
		t.Logf("%s: a decision during the cool-down took %v", name, per)
		outage.up()
		// The cool-down is over: the next decision probes. On a loaded
		// machine a probe can miss its 50 ms (a pooled connection from
		// before the kill, the script reloaded after NOSCRIPT): then the
		// limiter cools down again and probes after the next cool-down.
		probes, src := 0, FromFallback
		for src != FromStore && probes < 5 {
			advance(6 * time.Second)
			_, src = l.Allow(key, rule)
			probes++
		}
		if src != FromStore {
			t.Errorf("%s: after Redis came back, %d probes did not return to it", name, probes)
		}
		t.Logf("%s: back on Redis after %d probe(s)", name, probes)
		if _, src := l.Allow(key, rule); src != FromStore {
			t.Errorf("%s: not back on Redis: %v", name, src)
		}
	}
	if n := strings.Count(logs.String(), "deciding locally"); n != 2 {
		t.Errorf("switch to fallback logged %d times for 2 outages:\n%s", n, logs.String())
	}
	if l.m.toFallback.Get() != 2 || l.m.toStore.Get() != 2 {
		t.Errorf("switches counted %d/%d", l.m.toFallback.Get(), l.m.toStore.Get())
	}
}

func TestLocalFallbackSharesTheLimit(t *testing.T) {
	srv := redistest.Start(t)
	var ls []*Limiter
	for i := 0; i < 3; i++ {
		l := New(Settings{Redis: client(t, srv.Addr), Heartbeat: 50 * time.Millisecond})
		defer l.Close()
		ls = append(ls, l)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, l := range ls {
		for l.replicas.Load() != 3 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := l.replicas.Load(); n != 3 {
			t.Fatalf("replicas seen: %d, want 3", n)
		}
	}
	srv.Kill()
	rule := Rule{Limit: 30, Window: time.Minute}
	total := 0
	for _, l := range ls {
		for i := 0; i < 30; i++ {
			if d, _ := l.Allow("shared-client", rule); d.Allowed {
				total++
			}
		}
	}
	if total != 30 {
		t.Errorf("3 replicas admitted %d during the outage, want each its third of 30", total)
	}
}

// A password Redis refuses is the error each decision reports (go-redis
// sends nothing on a connection it could not authenticate, and leaves the
// commands without reply or error): the operator reads WRONGPASS, not a
// puzzle about the script's reply.
func TestRedisRefusedCredentialsAreTheError(t *testing.T) {
	srv := redistest.StartProtected(t, redistest.Protected{User: "sidecar", UserPassword: "right"})
	rdb := NewRedisClient(RedisOptions{Addrs: []string{srv.Addr}, Username: "sidecar", Password: "wrong"})
	defer rdb.Close()
	store := newRedisStore(rdb, "test")
	c := &call{key: "k", rule: Rule{Limit: 5, Window: time.Second}, cost: 1}
	store.slidingBatch(context.Background(), []*call{c}, t0.UnixMilli())
	if c.err == nil || !strings.Contains(c.err.Error(), "WRONGPASS") {
		t.Fatalf("decision error %v, want Redis' WRONGPASS", c.err)
	}
	rdb2 := NewRedisClient(RedisOptions{Addrs: []string{srv.Addr}, Username: "sidecar", Password: "right"})
	defer rdb2.Close()
	c = &call{key: "k", rule: Rule{Limit: 5, Window: time.Second}, cost: 1}
	if newRedisStore(rdb2, "test").slidingBatch(context.Background(), []*call{c}, t0.UnixMilli()); c.err != nil || !c.d.Allowed {
		t.Fatalf("with the right password: %v %+v", c.err, c.d)
	}
}

// One script call carries a whole batch, but a call that fails in Redis
// (here: its key holds a list) fails alone: the calls before and after it
// in the batch, the same client's included, are decided and counted once.
func TestRedisBatchIsolatesAFailingKey(t *testing.T) {
	srv := redistest.Start(t)
	store := newRedisStore(client(t, srv.Addr), "test")
	if _, err := redistest.Do(srv.Addr, "RPUSH", store.windowKey("list", time.Minute), "x"); err != nil {
		t.Fatal(err)
	}
	rule := Rule{Limit: 5, Window: time.Minute}
	var calls []*call
	for _, k := range []string{"a", "list", "a", "b", "list", "a"} {
		calls = append(calls, &call{key: k, rule: rule, cost: 1})
	}
	calls = append(calls, &call{key: "list", rule: rule, kind: returnUnits, cost: 1, idx: t0.UnixMilli() / 600})
	store.slidingBatch(context.Background(), calls, t0.UnixMilli())
	remaining := map[string]int{"a": 5, "b": 5}
	for i, c := range calls {
		if c.key == "list" {
			if c.err == nil || !strings.Contains(c.err.Error(), "WRONGTYPE") || !strings.Contains(c.err.Error(), store.windowKey("list", time.Minute)) {
				t.Errorf("call %d on a list: %v, want a WRONGTYPE error naming the key", i, c.err)
			}
			continue
		}
		remaining[c.key]--
		if c.err != nil || !c.d.Allowed || c.d.Remaining != remaining[c.key] {
			t.Errorf("call %d (%s): %+v %v, want %d remaining", i, c.key, c.d, c.err, remaining[c.key])
		}
	}
}

// A batch larger than one script call may carry is split, in order: 600
// decisions of one client count down across the three calls.
func TestRedisBatchSplitsLargeBatches(t *testing.T) {
	srv := redistest.Start(t)
	store := newRedisStore(client(t, srv.Addr), "test")
	rule := Rule{Limit: 1000, Window: time.Minute}
	calls := make([]*call, 600)
	for i := range calls {
		calls[i] = &call{key: "many", rule: rule, cost: 1}
	}
	if err := store.loadScript(context.Background()); err != nil {
		t.Fatal(err)
	}
	store.slidingBatch(context.Background(), calls, t0.UnixMilli())
	for i, c := range calls {
		if c.err != nil || c.d.Remaining != rule.Limit-1-i {
			t.Fatalf("decision %d: %+v %v", i, c.d, c.err)
		}
	}
	if calls, _ := evalshaStat(t, srv.Addr); calls != 3 { // 600 = 256 + 256 + 88
		t.Errorf("%d script calls for 600 decisions, want 3", calls)
	}
}

// A Ring routes a command by its first key: there every script call
// carries one key, and a batch over both shards gets the same answers.
func TestRedisRing(t *testing.T) {
	a, b := redistest.Start(t), redistest.Start(t)
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": a.Addr, "b": b.Addr}, MaxRetries: -1})
	defer ring.Close()
	store := newRedisStore(ring, "test")
	if err := store.loadScript(context.Background()); err != nil {
		t.Fatal(err)
	}
	rule := Rule{Limit: 10, Window: time.Minute}
	var calls []*call
	for k := range 40 {
		for range 2 {
			calls = append(calls, &call{key: fmt.Sprintf("ring-%d", k), rule: rule, cost: 1})
		}
	}
	store.slidingBatch(context.Background(), calls, t0.UnixMilli())
	seen := map[string]int{}
	for _, c := range calls {
		seen[c.key]++
		if c.err != nil || c.d.Remaining != rule.Limit-seen[c.key] {
			t.Fatalf("%s decision %d: %+v %v", c.key, seen[c.key], c.d, c.err)
		}
	}
	ca, _ := evalshaStat(t, a.Addr)
	cb, _ := evalshaStat(t, b.Addr)
	if ca == 0 || cb == 0 || ca+cb != 80 {
		t.Errorf("script calls: %d on one shard, %d on the other, want 80 in all on both", ca, cb)
	}
}

// clusterSlot agrees with the cluster specification's examples; the
// cluster test checks it against CLUSTER KEYSLOT.
func TestClusterSlot(t *testing.T) {
	for _, c := range []struct {
		key  string
		slot uint16
	}{
		{"123456789", 0x31c3 & 16383}, // the spec's CRC16 check value
		{"foo", 12182},
		{"{user1000}.following", clusterSlot("user1000")},
		{"{user1000}.followers", clusterSlot("user1000")},
		{"foo{}{bar}", crc16("foo{}{bar}") & 16383}, // an empty tag: the whole key
		{"foo{{bar}}zap", clusterSlot("{bar")},
		{"foo{bar}{zap}", clusterSlot("bar")},
		{"{unclosed", crc16("{unclosed") & 16383},
	} {
		if got := clusterSlot(c.key); got != c.slot {
			t.Errorf("clusterSlot(%q) = %d, want %d", c.key, got, c.slot)
		}
	}
}

// With Redis, a reload that changes a tier's window starts a fresh count
// under a key of its own (the script's ring counts in sub-windows). Read
// in the new width, a longer window's count never aged out: the client
// was locked out for decades.
func TestRedisWindowChangeStartsAfresh(t *testing.T) {
	srv := redistest.Start(t)
	store := newRedisStore(client(t, srv.Addr), "test")
	decide := func(rule Rule, now int64) Decision {
		c := &call{key: "c", rule: rule, cost: 1}
		if store.slidingBatch(context.Background(), []*call{c}, now); c.err != nil {
			t.Fatal(c.err)
		}
		return c.d
	}
	now := t0.UnixMilli() + 123
	short, long := Rule{Limit: 3, Window: 10 * time.Second}, Rule{Limit: 3, Window: 20 * time.Second}
	for range 3 {
		decide(short, now)
	}
	if d := decide(short, now); d.Allowed {
		t.Fatal("a fourth request in the window admitted")
	}
	for i := range 3 {
		if d := decide(long, now+1000); !d.Allowed {
			t.Fatalf("after the change to 20s, request %d denied (Retry-After %s)", i, d.RetryAfter)
		}
	}
	if d := decide(long, now+1000); d.Allowed || d.RetryAfter > long.Window+long.Window/Subwindows {
		t.Errorf("the new window's fourth request: %+v, want denied within the window", d)
	}
}

// windowKey is the Redis key of client k's sliding-window count under a
// window of that length.
func (s *redisStore) windowKey(k string, window time.Duration) string {
	return string(s.appendKey(nil, k, window))
}
