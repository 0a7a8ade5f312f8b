package test

// Scale-out: three sidecar processes sharing limits through Redis Cluster
// and through Redis Sentinel, and a primary killed under load.

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// scaleLimit is the anonymous tier's limit in these tests: per minute, so
// that the whole test runs inside one window.
const scaleLimit = 300

// startScaleOut starts a backend and three sidecars with redisSection as
// their [redis] table; clients are told apart by X-Forwarded-For (the
// test client is a trusted proxy).
func startScaleOut(t *testing.T, redisSection string) []*sidecar {
	t.Helper()
	t.Cleanup(scaleClient.CloseIdleConnections)
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	cfg := fmt.Sprintf(`
[server]
trusted_proxies = ["127.0.0.1/32"]
[rate_limit]
store = "redis"
on_store_error = "local"
cooldown = "1s"
%s
[tiers.anonymous]
limit = %d
window = "1m"
`, redisSection, scaleLimit) + routeTo(be.url(), "")
	var replicas []*sidecar
	for range 3 {
		replicas = append(replicas, startSidecar(t, cfg))
	}
	// Each replica counts the live ones from the heartbeats in Redis (every
	// 2 s): on_store_error = "local" gives each a third of the limit only
	// once it has seen the other two.
	deadline := time.Now().Add(10 * time.Second)
	for _, sc := range replicas {
		for sc.metric(`sidecar_ratelimit_live_replicas`) != 3 {
			if time.Now().After(deadline) {
				t.Fatalf("replica %s sees %v live replicas, want 3", sc.Addr, sc.metric(`sidecar_ratelimit_live_replicas`))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return replicas
}

// scaleCounts counts responses by class.
type scaleCounts struct {
	ok, limited, fivexx, other, failed atomic.Int64
}

func (c *scaleCounts) add(status int, err error) {
	switch {
	case err != nil:
		c.failed.Add(1)
	case status == 200:
		c.ok.Add(1)
	case status == 429:
		c.limited.Add(1)
	case status >= 500:
		c.fivexx.Add(1)
	default:
		c.other.Add(1)
	}
}

func (c *scaleCounts) String() string {
	return fmt.Sprintf("%d ok, %d limited, %d 5xx, %d other, %d transport errors",
		c.ok.Load(), c.limited.Load(), c.fivexx.Load(), c.other.Load(), c.failed.Load())
}

var scaleClient = &http.Client{Timeout: 5 * time.Second,
	Transport: &http.Transport{MaxIdleConnsPerHost: 16}}

// scaleGet sends GET / to sc as client ip.
func scaleGet(sc *sidecar, ip string) (int, error) {
	req, _ := http.NewRequest("GET", sc.url("/"), nil)
	req.Header.Set("X-Forwarded-For", ip)
	resp, err := scaleClient.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// scaleBurst sends n requests of client ip, round-robin over replicas,
// from 6 concurrent workers.
func scaleBurst(replicas []*sidecar, ip string, n int) *scaleCounts {
	var c scaleCounts
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1) - 1; i < int64(n); i = next.Add(1) - 1 {
				c.add(scaleGet(replicas[i%int64(len(replicas))], ip))
			}
		}()
	}
	wg.Wait()
	return &c
}

// checkShared asserts that replicas together admitted scaleLimit ± 1 %.
func checkShared(t *testing.T, what string, c *scaleCounts, asked int) {
	t.Helper()
	ok := c.ok.Load()
	t.Logf("%s: %d requests round-robin over 3 replicas: %d admitted for a limit of %d (%+.2f %%); %v",
		what, asked, ok, scaleLimit, 100*float64(ok-scaleLimit)/scaleLimit, c)
	if ok < scaleLimit*99/100 || ok > scaleLimit*101/100 {
		t.Errorf("%s: %d admitted across replicas, want %d ± 1 %%", what, ok, scaleLimit)
	}
	if c.fivexx.Load() != 0 || c.failed.Load() != 0 || c.other.Load() != 0 {
		t.Errorf("%s: %v", what, c)
	}
}

// scaleLoad is a steady load from many clients, round-robin over the
// replicas, until stop.
type scaleLoad struct {
	counts scaleCounts
	stop   chan struct{}
	wg     sync.WaitGroup
}

func startScaleLoad(replicas []*sidecar, clients []string) *scaleLoad {
	l := &scaleLoad{stop: make(chan struct{})}
	var next atomic.Int64
	for range 6 {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				// Every client's requests go to every replica.
				i, n := next.Add(1), int64(len(replicas))
				l.counts.add(scaleGet(replicas[i%n], clients[(i/n)%int64(len(clients))]))
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	return l
}

func (l *scaleLoad) halt() {
	close(l.stop)
	l.wg.Wait()
}

const (
	storeAllowed    = `sidecar_ratelimit_decisions_total{route="app",tier="anonymous",result="allowed",source="store"}`
	fallbackAllowed = `sidecar_ratelimit_decisions_total{route="app",tier="anonymous",result="allowed",source="store_error_fallback"}`
)

// waitShared waits until every replica is out of its cool-down and has
// decided through Redis again since before, a per-replica value of
// storeAllowed; it returns how long that took.
func waitShared(t *testing.T, replicas []*sidecar, before []float64, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		done := 0
		for i, sc := range replicas {
			if sc.metric(`sidecar_ratelimit_store_cooldown`) == 0 && sc.metric(storeAllowed) > before[i] {
				done++
			}
		}
		if done == len(replicas) {
			return time.Since(start)
		}
		if time.Since(start) > within {
			for _, sc := range replicas {
				t.Logf("replica %s:\n%s", sc.Addr, sc.logs.String())
			}
			t.Fatalf("%d of %d replicas back on Redis after %v", done, len(replicas), within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func storeDecisions(replicas []*sidecar) []float64 {
	out := make([]float64, len(replicas))
	for i, sc := range replicas {
		out[i] = sc.metric(storeAllowed)
	}
	return out
}

func sumMetric(replicas []*sidecar, series string) float64 {
	sum := 0.0
	for _, sc := range replicas {
		if v := sc.metric(series); v > 0 {
			sum += v
		}
	}
	return sum
}

// keysOn lists the keys on the Redis node at addr that match pattern.
func keysOn(t *testing.T, addr, pattern string) []string {
	t.Helper()
	var keys []string
	cursor := "0"
	for {
		v, err := redistest.Do(addr, "SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
		if err != nil {
			t.Fatalf("SCAN on %s: %v", addr, err)
		}
		arr := v.([]any)
		cursor = arr[0].(string)
		for _, k := range arr[1].([]any) {
			keys = append(keys, k.(string))
		}
		if cursor == "0" {
			return keys
		}
	}
}

// clientsOn returns the clients among ips whose rate-limit key is on the
// node at addr (each has sent a request already).
func clientsOn(t *testing.T, addr string, ips []string) []string {
	t.Helper()
	keys := strings.Join(keysOn(t, addr, "*:rl:*"), "\n")
	var out []string
	for _, ip := range ips {
		if strings.Contains(keys, "ip:"+ip+"}") {
			out = append(out, ip)
		}
	}
	return out
}

func ipRange(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s.%d", prefix, i+1)
	}
	return out
}

// Three replicas on Redis Cluster admit one client's limit between them;
// a primary killed under load is replaced by its replica, the sidecars
// go back to Redis without a restart, nothing fails with a 5xx, and
// limits are shared again, on the promoted node too.
func TestClusterSharedLimitsAndFailover(t *testing.T) {
	cl := redistest.StartCluster(t, 3, 1)
	replicas := startScaleOut(t, fmt.Sprintf("[redis]\nmode = \"cluster\"\naddrs = [%q, %q]\n", cl.Addrs()[0], cl.Addrs()[1]))

	checkShared(t, "cluster", scaleBurst(replicas, "198.51.100.1", 2*scaleLimit), 2*scaleLimit)

	// Steady load from 30 clients spread over the shards; kill a primary
	// that holds some of them.
	clients := ipRange("198.51.101", 30)
	load := startScaleLoad(replicas, clients)
	time.Sleep(300 * time.Millisecond)
	var victim string
	var victims []string
	for _, p := range cl.Primaries() {
		if on := clientsOn(t, p, clients); len(on) > 0 {
			victim, victims = p, on
			break
		}
	}
	if victim == "" {
		t.Fatal("no primary holds the load's clients")
	}
	beforeKill := load.counts.ok.Load()
	killedAt := time.Now()
	slot := cl.KillPrimary(victim)
	promoted := cl.WaitFailover(victim, slot)
	promotedAt := time.Now()
	since := storeDecisions(replicas)
	back := waitShared(t, replicas, since, 10*time.Second)
	recoveredAt := time.Now()
	time.Sleep(200 * time.Millisecond) // some load on the recovered cluster
	load.halt()
	fallback := sumMetric(replicas, fallbackAllowed)
	t.Logf("cluster: killed primary %s (%d of 30 clients on it); replica %s promoted %v after the kill; "+
		"all 3 sidecars deciding through Redis again %v after the promotion (%v after the kill), without restart; "+
		"%d decisions made by on_store_error=\"local\" meanwhile; load: %v (%d ok after the kill)",
		victim, len(victims), promoted, promotedAt.Sub(killedAt).Round(time.Millisecond), back.Round(time.Millisecond),
		recoveredAt.Sub(killedAt).Round(time.Millisecond), int(fallback), &load.counts,
		load.counts.ok.Load()-beforeKill)
	if load.counts.fivexx.Load() != 0 || load.counts.failed.Load() != 0 {
		t.Errorf("during the failover: %v", &load.counts)
	}
	if fallback == 0 {
		t.Errorf("no decision was made by on_store_error while the primary was down")
	}

	// Shared again, for a client whose key lives on the promoted node.
	fresh := ipRange("198.51.102", 30)
	for i, ip := range fresh {
		if _, err := scaleGet(replicas[i%3], ip); err != nil {
			t.Fatal(err)
		}
	}
	on := clientsOn(t, promoted, fresh)
	if len(on) == 0 {
		t.Fatalf("none of 30 new clients has its key on the promoted node %s", promoted)
	}
	c := scaleBurst(replicas, on[0], 2*scaleLimit-1)
	c.ok.Add(1) // its first request, above
	checkShared(t, "cluster after the failover (client on the promoted node)", c, 2*scaleLimit)
}

// The same through Sentinel: one primary, one replica, three sentinels.
func TestSentinelSharedLimitsAndFailover(t *testing.T) {
	st := redistest.StartSentinel(t)
	addrs := st.Addrs()
	replicas := startScaleOut(t, fmt.Sprintf("[redis]\nmode = \"sentinel\"\nmaster_name = %q\naddrs = [%q, %q, %q]\n",
		redistest.MasterName, addrs[0], addrs[1], addrs[2]))

	checkShared(t, "sentinel", scaleBurst(replicas, "198.51.100.1", 2*scaleLimit), 2*scaleLimit)

	load := startScaleLoad(replicas, ipRange("198.51.101", 30))
	time.Sleep(300 * time.Millisecond)
	killedAt := time.Now()
	dead := st.KillPrimary()
	promoted := st.WaitFailover(dead)
	promotedAt := time.Now()
	back := waitShared(t, replicas, storeDecisions(replicas), 10*time.Second)
	time.Sleep(200 * time.Millisecond)
	load.halt()
	fallback := sumMetric(replicas, fallbackAllowed)
	t.Logf("sentinel: killed primary %s; %s promoted %v after the kill; all 3 sidecars deciding through Redis again %v after the promotion, without restart; "+
		"%d decisions made by on_store_error=\"local\" meanwhile; load: %v",
		dead, promoted, promotedAt.Sub(killedAt).Round(time.Millisecond), back.Round(time.Millisecond), int(fallback), &load.counts)
	if load.counts.fivexx.Load() != 0 || load.counts.failed.Load() != 0 {
		t.Errorf("during the failover: %v", &load.counts)
	}
	if fallback == 0 {
		t.Errorf("no decision was made by on_store_error while the primary was down")
	}

	checkShared(t, "sentinel after the failover", scaleBurst(replicas, "198.51.100.2", 2*scaleLimit), 2*scaleLimit)
}
