package limiter

import (
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// BenchmarkRedisDecision is the Redis path of a sliding-window decision
// (no lease, no deny cache: the limit is never reached) from many
// concurrent callers, so that the batcher forms batches as it does under
// load: 10,000 clients, each caller walking them from its own offset; on
// one redis-server and on a Redis Cluster of 3 primaries. Besides ns and
// allocations per decision it reports the decisions per Redis round trip
// (decisions/batch), per script call (decisions/call: the keys one
// EVALSHA carries), and Redis' own time per decision: INFO commandstats'
// usec of evalsha (us-redis/op), and the CPU time the servers used, which
// also counts reading commands and writing replies (us-redis-cpu/op).
func BenchmarkRedisDecision(b *testing.B) {
	parent := b // the servers outlive the rounds of each sub-benchmark
	var single *redistest.Server
	var cl *redistest.Cluster
	b.Run("single", func(b *testing.B) {
		if single == nil {
			single = redistest.Start(parent)
		}
		benchDecisions(b, patientClient(b, single.Addr), []string{single.Addr})
	})
	b.Run("cluster", func(b *testing.B) {
		if cl == nil {
			cl = redistest.StartCluster(parent, 3, 0)
		}
		rdb := NewRedisClient(RedisOptions{Mode: RedisCluster, Addrs: cl.Addrs(), Timeout: time.Second})
		defer rdb.Close()
		benchDecisions(b, rdb, cl.Primaries())
	})
}

// benchDecisions runs BenchmarkRedisDecision through rdb; servers are the
// addresses whose INFO it reads. The clients' timeouts and the store's are
// 1 s: on a loaded machine 50 ms sends some decisions to the fallback,
// which this benchmark does not measure.
func benchDecisions(b *testing.B, rdb redis.UniversalClient, servers []string) {
	l := New(Settings{Redis: rdb, KeyPrefix: "bench", Heartbeat: time.Hour, StoreTimeout: time.Second})
	defer l.Close()
	keys := make([]string, 10_000)
	for i := range keys {
		keys[i] = "client-" + strconv.Itoa(i)
	}
	rule := Rule{Limit: 1 << 30, Window: time.Minute}
	l.Allow(keys[0], rule) // the script loaded, connections up
	for _, addr := range servers {
		if _, err := redistest.Do(addr, "CONFIG", "RESETSTAT"); err != nil {
			b.Fatal(err)
		}
	}
	rounds := l.m.commands.Get()
	cpu := redisCPU(b, servers)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	var next atomic.Int64
	b.SetParallelism(16) // 32 callers on 2 cores: batches form
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1)) * 7919
		for pb.Next() {
			if d, src := l.Allow(keys[i%len(keys)], rule); src != FromStore || !d.Allowed {
				b.Errorf("decision %+v from %v", d, src)
				return
			}
			i++
		}
	})
	b.StopTimer()
	runtime.ReadMemStats(&after)
	cpu = redisCPU(b, servers) - cpu
	calls, usec := evalshaStats(b, servers)
	n := float64(b.N)
	b.ReportMetric(float64(after.Mallocs-before.Mallocs)/n, "allocs/decision") // allocs/op, not rounded down
	b.ReportMetric(n/float64(l.m.commands.Get()-rounds), "decisions/batch")
	b.ReportMetric(n/float64(calls), "decisions/call")
	b.ReportMetric(float64(usec)/n, "us-redis/op")
	b.ReportMetric(cpu*1e6/n, "us-redis-cpu/op")
}

// evalshaStats reads the calls and the time (µs) of EVALSHA from the
// servers' INFO commandstats, summed.
func evalshaStats(tb testing.TB, servers []string) (calls, usec int64) {
	tb.Helper()
	for _, addr := range servers {
		c, u := evalshaStat(tb, addr)
		calls, usec = calls+c, usec+u
	}
	if calls == 0 {
		tb.Fatal("no evalsha in INFO commandstats")
	}
	return calls, usec
}

func evalshaStat(tb testing.TB, addr string) (calls, usec int64) {
	tb.Helper()
	v, err := redistest.Do(addr, "INFO", "commandstats")
	if err != nil {
		tb.Fatal(err)
	}
	for line := range strings.SplitSeq(v.(string), "\n") {
		fields, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_evalsha:")
		if !ok {
			continue
		}
		for f := range strings.SplitSeq(fields, ",") {
			name, val, _ := strings.Cut(f, "=")
			switch name {
			case "calls":
				calls, _ = strconv.ParseInt(val, 10, 64)
			case "usec":
				usec, _ = strconv.ParseInt(val, 10, 64)
			}
		}
	}
	return calls, usec
}

// redisCPU is the CPU time (s) the servers have used, from INFO cpu: the
// scripts and also reading commands and writing replies.
func redisCPU(tb testing.TB, servers []string) float64 {
	tb.Helper()
	var sum float64
	for _, addr := range servers {
		v, err := redistest.Do(addr, "INFO", "cpu")
		if err != nil {
			tb.Fatal(err)
		}
		for line := range strings.SplitSeq(v.(string), "\n") {
			name, val, _ := strings.Cut(strings.TrimSpace(line), ":")
			if name == "used_cpu_sys" || name == "used_cpu_user" {
				f, _ := strconv.ParseFloat(val, 64)
				sum += f
			}
		}
	}
	return sum
}
