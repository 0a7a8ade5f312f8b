package limiter

import (
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// spend admits limit requests of key, checking each is allowed and from
// src, and returns the instant of the last.
func spend(t *testing.T, l *Limiter, key string, rule Rule, n int, src Source) time.Time {
	t.Helper()
	var at time.Time
	for i := range n {
		at = l.s.Now()
		d, got := l.Allow(key, rule)
		if !d.Allowed || got != src {
			t.Fatalf("request %d: allowed %v from %v, want allowed from %v", i+1, d.Allowed, got, src)
		}
	}
	return at
}

// A refunded request is admitted again, once: the limit is not raised.
// settle, if given, runs before the refund and returns what waits for it.
func checkRefund(t *testing.T, l *Limiter, key string, rule Rule, src Source, settle func() func()) {
	t.Helper()
	at := spend(t, l, key, rule, rule.burst(), src)
	if d, _ := l.Allow(key+"-probe", rule); !d.Allowed {
		t.Fatal("another key was denied")
	}
	var wait func()
	if settle != nil {
		wait = settle()
	}
	l.Refund(key, rule, src, at)
	if wait != nil {
		wait()
	}
	if d, _ := l.Allow(key, rule); !d.Allowed {
		t.Fatalf("%v: denied after a refund; want the refunded request's place", rule.Algorithm)
	}
	if d, _ := l.Allow(key, rule); d.Allowed {
		t.Fatalf("%v: two admitted after one refund", rule.Algorithm)
	}
}

func TestRefundMemory(t *testing.T) {
	l := New(Settings{})
	defer l.Close()
	checkRefund(t, l, "sw", Rule{Limit: 3, Window: time.Minute}, FromMemory, nil)
	checkRefund(t, l, "gcra", Rule{Limit: 3, Window: time.Minute, Algorithm: GCRA}, FromMemory, nil)
	// A denial charged nothing, and a key never seen has nothing to give.
	l.Refund("unknown", Rule{Limit: 3, Window: time.Minute}, FromMemory, time.Now())
	l.Refund("sw", Rule{Limit: 3, Window: time.Minute}, FromDenyCache, time.Now())
	if d, _ := l.Allow("sw", Rule{Limit: 3, Window: time.Minute}); d.Allowed {
		t.Error("a deny-cache refund gave a place back")
	}
}

func TestRefundRedis(t *testing.T) {
	srv := redistest.Start(t)
	rdb := client(t, srv.Addr)
	l := New(Settings{Redis: rdb, KeyPrefix: "refund", Heartbeat: time.Hour})
	defer l.Close()
	// The sliding window's refund is queued ahead of the next decision.
	checkRefund(t, l, "sw", Rule{Limit: 3, Window: time.Minute}, FromStore, nil)
	// GCRA's goes on its own: wait until the TAT has moved back.
	rule := Rule{Limit: 3, Window: time.Minute, Algorithm: GCRA}
	key := l.store.key("gcra")
	checkRefund(t, l, "gcra", rule, FromStore, func() func() {
		before := rdb.Get(t.Context(), "rate:"+key).Val()
		if before == "" {
			t.Fatal("no GCRA state in Redis under rate:" + key)
		}
		return func() {
			for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				if rdb.Get(t.Context(), "rate:"+key).Val() != before {
					return
				}
			}
			t.Fatal("the GCRA refund did not reach Redis within 5 s")
		}
	})
}

// A GCRA refund of a client's only charged unit gives it back: the full
// burst is there again. redis_rate's script with cost -1 stores only a TAT
// still ahead of now, so that unit stayed charged (a shed request cost
// its client one of four places).
func TestRefundRedisGCRALastUnit(t *testing.T) {
	srv := redistest.Start(t)
	rdb := client(t, srv.Addr)
	l := New(Settings{Redis: rdb, KeyPrefix: "refund", Heartbeat: time.Hour})
	defer l.Close()
	rule := Rule{Limit: 4, Window: 30 * time.Second, Algorithm: GCRA}
	if d, _ := l.Allow("one", rule); !d.Allowed {
		t.Fatal("the first request was denied")
	}
	key := "rate:" + l.store.key("one")
	l.Refund("one", rule, FromStore, time.Now())
	for deadline := time.Now().Add(5 * time.Second); rdb.Exists(t.Context(), key).Val() == 1; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the refund of the only charged unit left %s = %s", key, rdb.Get(t.Context(), key).Val())
		}
	}
	for i := range 4 {
		if d, _ := l.Allow("one", rule); !d.Allowed {
			t.Fatalf("after the refund, request %d of the burst of 4 denied", i+1)
		}
	}
}
