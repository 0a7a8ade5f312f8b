package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sidecar-proxy/sidecar/bench/procs"
)

// leaseBench measures what quota leases save: three sidecars sharing one
// Redis, one hot client (a single X-Forwarded-For from the trusted load
// generator) with a limit of 10,000 per minute, paced at ~150 requests per
// second for 10 s and sent round-robin over the three, once with
// rate_limit.lease = false and once with lease = true (lease_overshoot at
// its default, 1 %). Redis counts the commands itself (INFO commandstats:
// every command, those the scripts run included, and the heartbeats), from
// once all three sidecars see each other until they have stopped, so the
// units given back at shutdown are counted too. It prints a table and
// returns false if leases do not cut commands per 1,000 requests at least
// tenfold.
func leaseBench(dir, sidecarBin, backendAddr string) bool {
	if _, err := exec.LookPath("redis-server"); err != nil {
		fmt.Println("\nquota-lease benchmark skipped: redis-server not installed")
		return true
	}
	const (
		rate  = 150 // requests per second, all sidecars together
		dur   = 10 * time.Second
		limit = 10_000 // per minute
	)
	type result struct {
		requests, ok, denied, failed int
		commands, scripts, leases    float64
	}
	runOnce := func(lease bool) result {
		redisAddr, rs := startRedis("0,1")
		defer procs.Stop(rs)
		rdb := redis.NewClient(&redis.Options{Addr: redisAddr})
		defer rdb.Close()
		ctx := context.Background()

		var cmds []*exec.Cmd
		var addrs, admins []string
		for i := range 3 {
			addr, admin := procs.FreeAddr(), procs.FreeAddr()
			cfg := filepath.Join(dir, fmt.Sprintf("lease-%v-%d.toml", lease, i))
			procs.Check(os.WriteFile(cfg, fmt.Appendf(nil, `[server]
listen = %q
admin_listen = %q
trusted_proxies = ["127.0.0.1/32"]
[upstreams.bench]
url = "http://%s"
[[routes]]
name = "bench"
upstream = "bench"
[tiers.anonymous]
limit = %d
window = "1m"
[rate_limit]
store = "redis"
lease = %v
[redis]
addrs = [%q]
`, addr, admin, backendAddr, limit, lease, redisAddr), 0o600))
			cmds = append(cmds, start(sidecarBin, []string{"GOMAXPROCS=1"}, "0,1", "-config", cfg, "-log-level", "warn"))
			addrs, admins = append(addrs, addr), append(admins, admin)
		}
		stopAll := func() {
			for _, c := range cmds {
				procs.Stop(c)
			}
			cmds = nil
		}
		defer stopAll()
		for _, admin := range admins {
			procs.WaitHTTP("http://" + admin + "/readyz")
		}
		// Leases are sized by the live replicas each sidecar sees: start
		// counting once every sidecar sees all three (one heartbeat, 2 s).
		deadline := time.Now().Add(10 * time.Second)
		for _, admin := range admins {
			for procs.Scrape(admin)["sidecar_ratelimit_live_replicas"] != 3 {
				if time.Now().After(deadline) {
					procs.Check(fmt.Errorf("sidecar %s does not see 3 live replicas", admin))
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
		procs.Check(rdb.ConfigResetStat(ctx).Err())

		var r result
		var mu sync.Mutex
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}, Timeout: 5 * time.Second}
		jobs := make(chan string, 64)
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for url := range jobs {
					req, _ := http.NewRequest("GET", url, nil)
					req.Header.Set("X-Forwarded-For", "10.20.30.40")
					status := 0
					if resp, err := client.Do(req); err == nil {
						_, _ = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						status = resp.StatusCode
					}
					mu.Lock()
					r.requests++
					switch status {
					case http.StatusOK:
						r.ok++
					case http.StatusTooManyRequests:
						r.denied++
					default:
						r.failed++
					}
					mu.Unlock()
				}
			}()
		}
		tick := time.NewTicker(time.Second / rate)
		for i := range int(dur.Seconds() * rate) {
			<-tick.C
			jobs <- "http://" + addrs[i%3] + "/small"
		}
		tick.Stop()
		close(jobs)
		wg.Wait()
		for _, admin := range admins {
			r.leases += procs.Scrape(admin)["sidecar_ratelimit_leases_total"]
		}
		stopAll() // a stopping sidecar gives back the units it holds

		info, err := rdb.Info(ctx, "commandstats").Result()
		procs.Check(err)
		for line := range strings.SplitSeq(info, "\n") {
			name, rest, ok := strings.Cut(strings.TrimSpace(line), ":calls=")
			if !ok || name == "cmdstat_info" || name == "cmdstat_config" { // ours
				continue
			}
			calls, _ := strconv.ParseFloat(rest[:strings.IndexByte(rest, ',')], 64)
			r.commands += calls
			if name == "cmdstat_evalsha" || name == "cmdstat_eval" {
				r.scripts += calls
			}
		}
		return r
	}

	off, on := runOnce(false), runOnce(true)
	per := func(v float64, r result) float64 { return 1000 * v / float64(max(1, r.requests)) }
	fmt.Printf("\nQuota leases: one hot client at %d req/s for %v, round-robin over three sidecars sharing one Redis;\n"+
		"limit %d per minute; Redis commands from INFO commandstats (all commands, heartbeats included)\n\n", rate, dur, limit)
	fmt.Printf("| rate_limit.lease | requests | admitted / denied / failed | leases taken | Redis commands per 1,000 requests | of which EVALSHA/EVAL |\n|---|---|---|---|---|---|\n")
	for _, v := range []struct {
		name string
		r    result
	}{{"false", off}, {"true", on}} {
		fmt.Printf("| %s | %d | %d / %d / %d | %.0f | %.1f | %.1f |\n", v.name, v.r.requests, v.r.ok, v.r.denied, v.r.failed,
			v.r.leases, per(v.r.commands, v.r), per(v.r.scripts, v.r))
	}
	ratio := per(off.commands, off) / max(per(on.commands, on), 1e-9)
	verdict := ""
	ok := ratio >= 10 && off.failed == 0 && on.failed == 0
	if !ok {
		verdict = " (missed)"
	}
	fmt.Printf("\nleases: %.1fx fewer Redis commands per 1,000 requests (EVALSHA/EVAL: %.1fx), target ≥ 10x%s\n",
		ratio, per(off.scripts, off)/max(per(on.scripts, on), 1e-9), verdict)
	return ok
}
