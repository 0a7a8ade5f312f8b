package limiter

import (
	"strconv"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// BenchmarkAllowLeased is a hot client's decisions with leases on:
// nearly all spent from a lease, one Redis call per lease.
func BenchmarkAllowLeased(b *testing.B) {
	srv := redistest.Start(b)
	l := New(Settings{Redis: client(b, srv.Addr), KeyPrefix: "bench", Lease: true})
	defer l.Close()
	rule := Rule{Limit: 1 << 30, Window: time.Minute}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			l.Allow("hot", rule)
		}
	})
	b.ReportMetric(float64(l.m.commands.Get())/float64(b.N), "roundtrips/op")
}

// BenchmarkAllowCold is what leases cost clients that never get one:
// 1,000 clients in turn, one request per millisecond of a fake clock, so
// each is seen once a second (too rarely to lease), against the same
// without leases.
func BenchmarkAllowCold(b *testing.B) {
	srv := redistest.Start(b)
	keys := make([]string, 1000)
	for i := range keys {
		keys[i] = "client-" + strconv.Itoa(i)
	}
	for _, leased := range []bool{false, true} {
		b.Run("lease="+strconv.FormatBool(leased), func(b *testing.B) {
			clock := &fakeClock{now: t0}
			l := New(Settings{Redis: client(b, srv.Addr), KeyPrefix: "cold-" + strconv.FormatBool(leased), Lease: leased,
				Now: clock.Now, Heartbeat: time.Hour})
			defer l.Close()
			rule := Rule{Limit: 1 << 30, Window: time.Minute}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, src := l.Allow(keys[i%len(keys)], rule); src == FromLease {
					b.Fatal("a cold client's decision came from a lease")
				}
				clock.Advance(time.Millisecond)
				i++
			}
		})
	}
}
