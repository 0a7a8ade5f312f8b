package limiter

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

func modeClient(t *testing.T, o RedisOptions) redis.UniversalClient {
	t.Helper()
	rdb := NewRedisClient(o)
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

func TestNewRedisClientModes(t *testing.T) {
	redisLogOnce.Do(func() { redis.SetLogger(&quietRedisLog{log: slog.Default()}) }) // as New does: no dial-error flood
	for _, c := range []struct {
		o    RedisOptions
		want string // the client's type
	}{
		{RedisOptions{Addrs: []string{"127.0.0.1:1"}}, "*redis.Client"},
		{RedisOptions{Mode: RedisCluster, Addrs: []string{"127.0.0.1:1", "127.0.0.1:2"}}, "*redis.ClusterClient"},
		{RedisOptions{Mode: RedisSentinel, Addrs: []string{"127.0.0.1:1"}, MasterName: "m"}, "*redis.Client"},
	} {
		rdb := NewRedisClient(c.o)
		if got := fmt.Sprintf("%T", rdb); got != c.want {
			t.Errorf("%+v: got %q, want %q", c.o, got, c.want)
		}
		rdb.Close()
	}
	// MOVED/ASK must still be followed: MaxRedirects -1 would disable it.
	rdb := NewRedisClient(RedisOptions{Mode: RedisCluster, Addrs: []string{"127.0.0.1:1"}})
	defer rdb.Close()
	if o := rdb.(*redis.ClusterClient).Options(); o.MaxRedirects <= 0 || o.ReadOnly || o.RouteRandomly || o.RouteByLatency {
		t.Errorf("cluster options: MaxRedirects %d ReadOnly %v RouteRandomly %v RouteByLatency %v",
			o.MaxRedirects, o.ReadOnly, o.RouteRandomly, o.RouteByLatency)
	}
}

// TestRedisCluster runs the store on a real 3-primary, 3-replica cluster:
// the same answers as one node, batches spread over every shard, an empty
// script cache on every node, and a primary killed.
func TestRedisCluster(t *testing.T) {
	single := newRedisStore(client(t, redistest.Start(t).Addr), "test")
	cl := redistest.StartCluster(t, 3, 1)
	rdb := modeClient(t, RedisOptions{Mode: RedisCluster, Addrs: cl.Addrs()[:1]}) // one seed finds the rest
	store := newRedisStore(rdb, "test")
	ctx := context.Background()

	t.Run("same decisions as one node", func(t *testing.T) {
		// 24 clients per rule, so their keys fall on every shard; at each
		// fixed instant a random subset asks, as one batch, of both stores.
		for _, rule := range []Rule{{Limit: 5, Window: time.Second}, {Limit: 60, Window: time.Minute}, {Limit: 7, Window: 333 * time.Millisecond}} {
			ref := map[string][]bucket{}
			now := t0.UnixMilli()
			for step := 0; step < 150; step++ {
				now += rand.Int64N(rule.Window.Milliseconds()/int64(rule.Limit)) + 1
				var one, many []*call
				for k := range 24 {
					if rand.IntN(3) == 0 {
						continue
					}
					key := fmt.Sprintf("same-%d-%d-%d", rule.Limit, rule.Window, k)
					one = append(one, &call{key: key, rule: rule, cost: 1})
					many = append(many, &call{key: key, rule: rule, cost: 1})
				}
				single.slidingBatch(ctx, one, now)
				store.slidingBatch(ctx, many, now)
				for i, c := range many {
					var want Decision
					ref[c.key], want = slide(ref[c.key], rule, now, 1)
					if c.err != nil || one[i].err != nil {
						t.Fatalf("step %d %s: cluster %v, one node %v", step, c.key, c.err, one[i].err)
					}
					if c.d != one[i].d || c.d != want {
						t.Fatalf("%v step %d %s at %d: cluster %+v, one node %+v, memory %+v", rule, step, c.key, now, c.d, one[i].d, want)
					}
				}
			}
		}
		// GCRA takes time from Redis (redis_rate passes no instant): the
		// calls alternate between the stores, and with 6 s per token the
		// few milliseconds between them cannot change a decision.
		rule := Rule{Limit: 10, Window: time.Minute, Algorithm: GCRA, Burst: 5}
		for k := range 24 {
			key := fmt.Sprintf("gcra-%d", k)
			for i := range 8 {
				a, err1 := single.gcraAllow(ctx, key, rule, 1)
				b, err2 := store.gcraAllow(ctx, key, rule, 1)
				if err1 != nil || err2 != nil {
					t.Fatal(err1, err2)
				}
				if a.Allowed != b.Allowed || a.Remaining != b.Remaining || a.Allowed != (i < 5) {
					t.Fatalf("GCRA %s call %d: one node %+v, cluster %+v", key, i, a, b)
				}
			}
		}
	})

	t.Run("mixed batches", func(t *testing.T) { checkMixedBatches(t, store, "mixed", 150) })

	t.Run("slots as the cluster computes them", func(t *testing.T) {
		for i := range 100 {
			for _, k := range []string{store.key(fmt.Sprintf("client-%d", i)), fmt.Sprintf("k%d{%d}", i, i*7), fmt.Sprintf("{}k%d", i), fmt.Sprintf("{a%d", i)} {
				if got, want := clusterSlot(k), cl.Slot(k); int(got) != want {
					t.Fatalf("clusterSlot(%q) = %d, CLUSTER KEYSLOT %d", k, got, want)
				}
			}
		}
	})

	t.Run("keys per script call", func(t *testing.T) {
		// Each client key is its own hash tag, so a batch of random
		// clients seldom has two in one slot: about one key per call. A
		// patient client: go-redis sends a node's part of a pipeline again
		// after a timeout, which would count calls twice here.
		store := newRedisStore(modeClient(t, RedisOptions{Mode: RedisCluster, Addrs: cl.Addrs()[:1], Timeout: time.Second}), "test")
		if err := store.loadScript(ctx); err != nil {
			t.Fatal(err)
		}
		rule := Rule{Limit: 1 << 30, Window: time.Minute}
		for _, size := range []int{16, 128} { // as the benchmark's batches; MaxBatch
			const batches = 50
			for _, p := range cl.Primaries() {
				if _, err := redistest.Do(p, "CONFIG", "RESETSTAT"); err != nil {
					t.Fatal(err)
				}
			}
			groups := 0
			for range batches {
				calls := make([]*call, size)
				slots := map[uint16]bool{}
				for i := range calls {
					calls[i] = &call{key: fmt.Sprintf("random-%d", rand.IntN(10_000)), rule: rule, cost: 1}
					slots[clusterSlot(store.key(calls[i].key))] = true
				}
				groups += len(slots)
				store.slidingBatch(ctx, calls, 0)
				for _, c := range calls {
					if c.err != nil {
						t.Fatalf("%s: %v", c.key, c.err)
					}
				}
			}
			calls, usec := evalshaStats(t, cl.Primaries())
			if int(calls) != groups {
				t.Errorf("batches of %d: %d script calls for %d slot groups", size, calls, groups)
			}
			t.Logf("batches of %d random clients (of 10,000): %.3f keys per script call, %.1f µs of Redis per decision",
				size, float64(size*batches)/float64(calls), float64(usec)/float64(size*batches))
		}
	})

	t.Run("one batch over every shard", func(t *testing.T) {
		// 300 clients, each twice in the same batch: the pipeline is split
		// by primary and each primary's part keeps its order.
		rule := Rule{Limit: 10, Window: time.Minute}
		var calls []*call
		for k := range 300 {
			key := fmt.Sprintf("spread-%d", k)
			calls = append(calls, &call{key: key, rule: rule, cost: 1}, &call{key: key, rule: rule, cost: 1})
		}
		rand.Shuffle(len(calls), func(i, j int) { calls[i], calls[j] = calls[j], calls[i] })
		seen := map[string]int{}
		store.slidingBatch(ctx, calls, 0)
		for _, c := range calls {
			seen[c.key]++
			if c.err != nil || !c.d.Allowed || c.d.Remaining != rule.Limit-seen[c.key] {
				t.Fatalf("%s decision %d: %+v %v", c.key, seen[c.key], c.d, c.err)
			}
		}
		perPrimary := map[string]int{}
		for k := range 300 {
			perPrimary[cl.PrimaryOf(cl.Slot(store.key(fmt.Sprintf("spread-%d", k))))]++
		}
		if len(perPrimary) != 3 {
			t.Errorf("300 keys landed on %d primaries: %v", len(perPrimary), perPrimary)
		}
		t.Logf("one pipeline of 600 decisions over %v keys per primary", perPrimary)
	})

	t.Run("empty script cache on every node", func(t *testing.T) {
		for _, addr := range cl.Addrs() {
			if _, err := redistest.Do(addr, "SCRIPT", "FLUSH"); err != nil {
				t.Fatal(err)
			}
		}
		rule := Rule{Limit: 10, Window: time.Minute}
		var calls []*call
		for k := range 100 {
			calls = append(calls, &call{key: fmt.Sprintf("flushed-%d", k), rule: rule, cost: 1})
		}
		store.slidingBatch(ctx, calls, 0)
		for _, c := range calls {
			// Counted once: only the calls that got NOSCRIPT ran again.
			if c.err != nil || c.d.Remaining != rule.Limit-1 {
				t.Fatalf("%s after SCRIPT FLUSH: %+v %v", c.key, c.d, c.err)
			}
		}
		for _, p := range cl.Primaries() {
			if v, _ := redistest.Do(p, "SCRIPT", "EXISTS", windowBatchLua.Hash()); fmt.Sprint(v) != "[1]" {
				t.Errorf("script not loaded again on primary %s: %v", p, v)
			}
		}
	})

	t.Run("leases on every shard, given back after SCRIPT FLUSH", func(t *testing.T) {
		rule := Rule{Limit: 10, Window: time.Minute}
		var grants, backs, checks []*call
		for k := range 60 {
			grants = append(grants, &call{key: fmt.Sprintf("lease-%d", k), rule: rule, kind: lease, cost: 4})
		}
		store.slidingBatch(ctx, grants, 0)
		for _, addr := range cl.Addrs() {
			if _, err := redistest.Do(addr, "SCRIPT", "FLUSH"); err != nil {
				t.Fatal(err)
			}
		}
		for _, g := range grants {
			if g.err != nil || g.granted != 4 || g.d.Remaining != 6 {
				t.Fatalf("%s: granted %d, %+v %v", g.key, g.granted, g.d, g.err)
			}
			backs = append(backs, &call{key: g.key, rule: rule, kind: returnUnits, cost: 3, idx: g.idx})
			checks = append(checks, &call{key: g.key, rule: rule, kind: decide, cost: 1})
		}
		store.slidingBatch(ctx, backs, 0)
		store.slidingBatch(ctx, checks, 0)
		for i, b := range backs {
			// 4 granted, 3 given back, 1 more admitted: 8 left.
			if b.err != nil || b.granted != 3 || checks[i].err != nil || checks[i].d.Remaining != 8 {
				t.Fatalf("%s: gave back %d (%v), then %+v %v", b.key, b.granted, b.err, checks[i].d, checks[i].err)
			}
		}
	})

	t.Run("a slot moving to another primary", func(t *testing.T) {
		// Two clients of one slot, one of them already moved to the new
		// primary: their script call is refused (TRYAGAIN), and they are
		// decided again one client per call, each where its key is (ASK).
		rule := Rule{Limit: 10, Window: time.Minute}
		var a, b string
		seen := map[uint16]string{}
		for i := 0; a == ""; i++ {
			k := fmt.Sprintf("moving-%d", i)
			if other, ok := seen[clusterSlot(store.key(k))]; ok {
				a, b = other, k
			}
			seen[clusterSlot(store.key(k))] = k
		}
		slot := cl.Slot(store.key(a))
		from := cl.PrimaryOf(slot)
		var to string
		for _, p := range cl.Primaries() {
			if p != from {
				to = p
				break
			}
		}
		id := func(addr string) string {
			v, err := redistest.Do(addr, "CLUSTER", "MYID")
			if err != nil {
				t.Fatal(err)
			}
			return v.(string)
		}
		do := func(addr string, args ...string) {
			t.Helper()
			if _, err := redistest.Do(addr, args...); err != nil {
				t.Fatalf("%s %v: %v", addr, args, err)
			}
		}
		decide := func(keys ...string) []*call {
			var calls []*call
			for _, k := range keys {
				calls = append(calls, &call{key: k, rule: rule, cost: 1})
			}
			store.slidingBatch(ctx, calls, 0)
			return calls
		}
		decide(a, b) // both keys exist on the old primary
		fromID, toID := id(from), id(to)
		host, port, _ := strings.Cut(to, ":")
		do(to, "CLUSTER", "SETSLOT", strconv.Itoa(slot), "IMPORTING", fromID)
		do(from, "CLUSTER", "SETSLOT", strconv.Itoa(slot), "MIGRATING", toID)
		do(from, "MIGRATE", host, port, store.windowKey(a, rule.Window), "0", "5000")
		if v, err := redistest.Do(from, "EVALSHA", windowBatchLua.Hash(), "2", store.windowKey(a, rule.Window), store.windowKey(b, rule.Window),
			"0", strconv.Itoa(Subwindows), "0", "10", "60000", "1", "0", "10", "60000", "1"); err == nil || !strings.HasPrefix(err.Error(), "TRYAGAIN") {
			t.Fatalf("a script call over both keys during the move: %v %v, want TRYAGAIN", v, err)
		}
		calls := decide(a, b, a, "elsewhere")
		for i, want := range []int{8, 8, 7, 9} {
			if c := calls[i]; c.err != nil || c.d.Remaining != want {
				t.Errorf("%s during the move: %+v %v, want %d remaining", c.key, c.d, c.err, want)
			}
		}
		do(from, "MIGRATE", host, port, store.windowKey(b, rule.Window), "0", "5000")
		for _, n := range cl.Primaries() {
			do(n, "CLUSTER", "SETSLOT", strconv.Itoa(slot), "NODE", toID)
		}
		calls = decide(a, b)
		if calls[0].err != nil || calls[0].d.Remaining != 6 || calls[1].err != nil || calls[1].d.Remaining != 7 {
			t.Errorf("after the move: %+v %v, %+v %v", calls[0].d, calls[0].err, calls[1].d, calls[1].err)
		}
	})

	t.Run("primary killed", func(t *testing.T) {
		l := New(Settings{Redis: rdb, KeyPrefix: "test", Cooldown: 200 * time.Millisecond, Heartbeat: time.Hour})
		defer l.Close()
		rule := Rule{Limit: 1000, Window: time.Minute}
		key := "victim"
		if _, src := l.Allow(key, rule); src != FromStore {
			t.Fatalf("first decision from %v", src)
		}
		primary := cl.PrimaryOf(cl.Slot(store.key(key)))
		after := ""
		for i := 0; after == ""; i++ { // another client on the same primary
			if k := fmt.Sprintf("after-%d", i); cl.PrimaryOf(cl.Slot(store.key(k))) == primary {
				after = k
			}
		}
		killedAt := time.Now()
		slot := cl.KillPrimary(primary)
		fallbacks := 0
		for time.Since(killedAt) < 300*time.Millisecond {
			if d, src := l.Allow(key, rule); src == FromFallback && d.Allowed {
				fallbacks++
			}
			time.Sleep(10 * time.Millisecond)
		}
		if fallbacks == 0 || !l.CoolingDown() {
			t.Errorf("primary down: %d fallback decisions, cooling down %v", fallbacks, l.CoolingDown())
		}
		promoted := cl.WaitFailover(primary, slot)
		promotedAt := time.Now()
		if v, _ := redistest.Do(promoted, "SCRIPT", "EXISTS", windowBatchLua.Hash()); fmt.Sprint(v) != "[0]" {
			t.Logf("the promoted replica has the script already (%v)", v)
		}

		// The same client, never recreated: the first decision sent after
		// the promotion refreshes the slot map and succeeds.
		c := &call{key: after, rule: rule, cost: 1}
		if store.slidingBatch(ctx, []*call{c}, 0); c.err != nil {
			t.Errorf("first sliding-window decision after the promotion: %v", c.err)
		}
		if _, err := store.gcraAllow(ctx, after, Rule{Limit: 10, Window: time.Minute, Algorithm: GCRA}, 1); err != nil {
			t.Errorf("first GCRA decision after the promotion: %v", err)
		}

		// The Limiter comes back after its cool-down, by itself.
		tries := 0
		for {
			tries++
			if _, src := l.Allow(key, rule); src == FromStore {
				break
			}
			if tries == 50 {
				t.Fatalf("no decision from Redis in 50 tries (%v) after the promotion", time.Since(promotedAt))
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("killed primary %s: replica %s promoted %v after the kill; limiter back on Redis %v after the promotion (%d tries, cool-down 200ms)",
			primary, promoted, promotedAt.Sub(killedAt).Round(time.Millisecond), time.Since(promotedAt).Round(time.Millisecond), tries)
	})
}

// TestRedisSentinel runs the store through Sentinel: decisions, then the
// primary killed and its replica promoted, with the same client.
func TestRedisSentinel(t *testing.T) {
	st := redistest.StartSentinel(t)
	rdb := modeClient(t, RedisOptions{Mode: RedisSentinel, Addrs: st.Addrs(), MasterName: redistest.MasterName})
	store := newRedisStore(rdb, "test")
	ctx := context.Background()
	rule := Rule{Limit: 7, Window: 333 * time.Millisecond}
	var ref []bucket
	now := t0.UnixMilli()
	for i := 0; i < 200; i++ {
		now += rand.Int64N(rule.Window.Milliseconds()/int64(rule.Limit)) + 1
		var want Decision
		ref, want = slide(ref, rule, now, 1)
		c := &call{key: "sentinel", rule: rule, cost: 1}
		if store.slidingBatch(ctx, []*call{c}, now); c.err != nil {
			t.Fatal(c.err)
		}
		if c.d != want {
			t.Fatalf("step %d: sentinel %+v, memory %+v", i, c.d, want)
		}
	}

	l := New(Settings{Redis: rdb, KeyPrefix: "test", Cooldown: 200 * time.Millisecond, Heartbeat: time.Hour})
	defer l.Close()
	big := Rule{Limit: 1000, Window: time.Minute}
	if _, src := l.Allow("victim", big); src != FromStore {
		t.Fatalf("first decision from %v", src)
	}
	killedAt := time.Now()
	dead := st.KillPrimary()
	for time.Since(killedAt) < 300*time.Millisecond {
		if d, src := l.Allow("victim", big); !d.Allowed || src == FromStore {
			t.Fatalf("primary down: %+v from %v", d, src)
		}
		time.Sleep(10 * time.Millisecond)
	}
	promoted := st.WaitFailover(dead)
	promotedAt := time.Now()
	tries := 0
	for {
		tries++
		c := &call{key: "after", rule: big, cost: 1}
		if store.slidingBatch(ctx, []*call{c}, 0); c.err == nil {
			break
		} else if tries == 20 {
			t.Fatalf("no sliding-window decision in 20 tries after the failover: %v", c.err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	storeTries := tries
	tries = 0
	for {
		tries++
		if _, src := l.Allow("victim", big); src == FromStore {
			break
		}
		if tries == 50 {
			t.Fatalf("no decision from Redis in 50 tries (%v) after the failover", time.Since(promotedAt))
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("killed primary %s: sentinels promoted %s %v after the kill; store answered on try %d, limiter back on Redis %v after the promotion (%d tries)",
		dead, promoted, promotedAt.Sub(killedAt).Round(time.Millisecond), storeTries, time.Since(promotedAt).Round(time.Millisecond), tries)
}
