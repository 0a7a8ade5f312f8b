package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sidecar-proxy/sidecar/bench/procs"
	"github.com/sidecar-proxy/sidecar/policy"
)

// The "overload" scenario (issue 16): a backend of fixed capacity, like a
// thread-pool app — overloadWorkers workers, each request holding one for
// overloadHold, the rest queueing without bound — behind the sidecar
// without protection, with a static bulkhead only, and with overload
// protection. Premium clients send ~25 % of the capacity and free clients
// ~3× it, open loop: requests leave at a fixed rate whatever the answers'
// latency, as independent users' do. Each configuration runs three
// phases: premium alone (its baseline latency), premium and free together
// (the overload), premium alone again (the recovery).
const (
	overloadWorkers = 8
	overloadHold    = 20 * time.Millisecond
	// overloadCapacity is what the backend can serve: workers / hold.
	overloadCapacity = float64(overloadWorkers) / 0.020
	premiumRate      = 0.25 * overloadCapacity // requests/s
	freeRate         = 3 * overloadCapacity

	aloneFor    = 6 * time.Second
	overloadFor = 12 * time.Second
	recoverFor  = 5 * time.Second
	// clientTimeout bounds a request's wait, as a client's would.
	clientTimeout = 10 * time.Second
	// bulkheadCap is the static bulkhead's size: twice the backend's
	// workers, what an operator who knows the capacity might choose.
	bulkheadCap = 2 * overloadWorkers
)

// capacityBackend serves requests with overloadWorkers workers, each held
// for overloadHold; others wait in line (a channel semaphore: FIFO enough).
type capacityBackend struct {
	addr     string
	srv      *http.Server
	sem      chan struct{}
	inFlight atomic.Int64 // requests received and not yet answered
}

func startCapacityBackend() *capacityBackend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	procs.Check(err)
	b := &capacityBackend{addr: ln.Addr().String(), sem: make(chan struct{}, overloadWorkers)}
	b.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.inFlight.Add(1)
		defer b.inFlight.Add(-1)
		select {
		case b.sem <- struct{}{}:
		case <-r.Context().Done(): // the sidecar gave up on it
			return
		}
		time.Sleep(overloadHold)
		<-b.sem
		_, _ = io.WriteString(w, "ok")
	})}
	go func() { _ = b.srv.Serve(ln) }()
	return b
}

// outcome is one request's answer.
type outcome struct {
	class    int // 0 premium, 1 free
	phase    int // 0 alone, 1 overload, 2 recovery
	ok, shed bool
	latency  time.Duration
	sent     time.Time
}

// openLoop sends requests of each class at its rate for d, each on its own
// goroutine, and returns every outcome once all have answered.
func openLoop(client *http.Client, url string, keys []string, rates []float64, phase int, d time.Duration, out chan<- outcome, wg *sync.WaitGroup) {
	start := time.Now()
	var loops sync.WaitGroup
	for class, rate := range rates {
		if rate == 0 {
			continue
		}
		loops.Add(1)
		go func() {
			defer loops.Done()
			interval := time.Duration(float64(time.Second) / rate)
			for i := 0; ; i++ {
				due := start.Add(time.Duration(i) * interval)
				if due.Sub(start) >= d {
					return
				}
				if wait := time.Until(due); wait > 0 {
					time.Sleep(wait)
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					out <- send(client, url, keys[class], class, phase)
				}()
			}
		}()
	}
	loops.Wait()
}

func send(client *http.Client, url, key string, class, phase int) outcome {
	t := time.Now()
	o := outcome{class: class, phase: phase, sent: t}
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("X-API-Key", key)
	resp, err := client.Do(req)
	if err == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		o.ok = resp.StatusCode/100 == 2
		o.shed = resp.StatusCode == 503 && resp.Header.Get("X-Sidecar-Fallback") == "shed"
	}
	o.latency = time.Since(t)
	return o
}

// overloadRow is one configuration's figures.
type overloadRow struct {
	name                         string
	aloneP50, aloneP99           time.Duration
	premiumOK                    float64 // share of premium requests answered 2xx in the overload
	premiumP50, premiumP99       time.Duration
	settledP99                   time.Duration // premium's, sent once the limit had settled
	freeOK, freeShed             float64
	shedP99                      time.Duration
	goodput                      float64 // 2xx/s in the overload, as a share of capacity
	settled                      time.Duration
	limitStart, limitEnd, limRec float64
	recoverP99                   time.Duration
	recoverOK                    float64
	backendPeak                  int64
	protected                    bool
}

func overloadBench(dir, sidecarBin string) bool {
	backend := startCapacityBackend()
	defer backend.srv.Close()
	keys := []string{"premium-bench-key", "free-bench-key"}
	keysFile := filepath.Join(dir, "overload-keys.toml")
	procs.Check(os.WriteFile(keysFile, fmt.Appendf(nil, `[[keys]]
sha256 = %q
tier = "premium"
client = "premium"
[[keys]]
sha256 = %q
tier = "free"
client = "free"
`, policy.HashKey(keys[0]), policy.HashKey(keys[1])), 0o600))

	configs := []struct{ name, upstream string }{
		{"no protection (breaker off)", "[upstreams.bench.breaker]\nenabled = false\n"},
		{fmt.Sprintf("static bulkhead only (max_concurrent = %d)", bulkheadCap), fmt.Sprintf("[upstreams.bench.breaker]\nmax_concurrent = %d\n", bulkheadCap)},
		{"overload protection (defaults)", "[upstreams.bench.overload]\nenabled = true\n"},
		// The same from a limit far above the upstream's: what the
		// controller's descent costs at the start of an overload.
		{"overload protection, initial_limit = 100", "[upstreams.bench.overload]\ninitial_limit = 100\n"},
	}
	fmt.Printf("\n## Overload: a backend of fixed capacity (%d workers × %v = %.0f req/s), premium at %.0f req/s (25 %%), free at %.0f req/s (3×), open loop\n\n",
		overloadWorkers, overloadHold, overloadCapacity, premiumRate, freeRate)
	fmt.Printf("phases: premium alone %v, premium + free %v, premium alone %v; sidecar on CPU 0 (GOMAXPROCS=1); client timeout %v\n\n", aloneFor, overloadFor, recoverFor, clientTimeout)
	var rows []overloadRow
	for _, c := range configs {
		rows = append(rows, overloadRun(dir, sidecarBin, backend, keysFile, keys, c.name, c.upstream))
	}
	fmt.Printf("| configuration | premium 2xx | premium p50 / p99 (alone) | free 2xx | free shed | shed p99 | goodput / capacity | limit: start → settled, settle time | after: premium 2xx, p99 | backend peak in flight |\n")
	fmt.Printf("|---|---|---|---|---|---|---|---|---|---|\n")
	ok := true
	for _, r := range rows {
		limit := "-"
		if r.protected {
			limit = fmt.Sprintf("%.0f → %.0f in %.1f s (premium p99 once settled %s; after: %.0f)", r.limitStart, r.limitEnd, r.settled.Seconds(), msd(r.settledP99), r.limRec)
		}
		fmt.Printf("| %s | %.2f %% | %s / %s (%s / %s) | %.1f %% | %.1f %% | %s | %.2f | %s | %.1f %%, %s | %d |\n", r.name, 100*r.premiumOK,
			msd(r.premiumP50), msd(r.premiumP99), msd(r.aloneP50), msd(r.aloneP99), 100*r.freeOK, 100*r.freeShed, msd(r.shedP99), r.goodput,
			limit, 100*r.recoverOK, msd(r.recoverP99), r.backendPeak)
	}
	if p := rows[2]; p.protected { // the defaults' row: the targets are theirs
		p99Target := max(3*p.aloneP99, p.aloneP99+30*time.Millisecond)
		checks := []struct {
			what string
			ok   bool
		}{
			{fmt.Sprintf("premium 2xx %.2f %% ≥ 99.5 %%", 100*p.premiumOK), p.premiumOK >= 0.995},
			{fmt.Sprintf("premium p99 %s ≤ max(3 × alone, alone + 30 ms) = %s", msd(p.premiumP99), msd(p99Target)), p.premiumP99 <= p99Target},
			{fmt.Sprintf("shed p99 %s ≤ 100 ms", msd(p.shedP99)), p.shedP99 <= 100*time.Millisecond},
			{fmt.Sprintf("goodput %.2f ≥ 0.8 of capacity", p.goodput), p.goodput >= 0.8},
			{fmt.Sprintf("settled in %.1f s ≤ 5 s", p.settled.Seconds()), p.settled <= 5*time.Second},
			{fmt.Sprintf("recovered: premium 2xx %.1f %% and p99 %s after the overload", 100*p.recoverOK, msd(p.recoverP99)),
				p.recoverOK >= 0.995 && p.recoverP99 <= p99Target},
		}
		fmt.Println()
		for _, c := range checks {
			mark := "met"
			if !c.ok {
				mark, ok = "MISSED", false
			}
			fmt.Printf("- %s: %s\n", c.what, mark)
		}
	}
	return ok
}

func msd(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

// overloadRun runs the three phases against one sidecar configuration.
func overloadRun(dir, sidecarBin string, backend *capacityBackend, keysFile string, keys []string, name, upstream string) overloadRow {
	addr, admin := procs.FreeAddr(), procs.FreeAddr()
	cfg := filepath.Join(dir, "overload.toml")
	procs.Check(os.WriteFile(cfg, fmt.Appendf(nil, `[server]
listen = %q
admin_listen = %q
[identity]
api_keys_file = %q
[tiers.anonymous]
unlimited = true
[tiers.free]
unlimited = true
[tiers.premium]
unlimited = true
priority = 100
[upstreams.bench]
url = "http://%s"
%s
[[routes]]
upstream = "bench"
`, addr, admin, keysFile, backend.addr, upstream), 0o600))
	sc := start(sidecarBin, []string{"GOMAXPROCS=1"}, "0", "-config", cfg, "-log-level", "error")
	defer procs.Stop(sc)
	procs.WaitHTTP("http://" + admin + "/readyz")

	client := &http.Client{Timeout: clientTimeout, Transport: &http.Transport{
		MaxIdleConns: 20000, MaxIdleConnsPerHost: 20000, IdleConnTimeout: 30 * time.Second}}
	defer client.CloseIdleConnections()
	url := "http://" + addr + "/"

	// The limit, every 100 ms, and the backend's peak in flight.
	var limits []struct {
		at time.Time
		v  float64
	}
	var peak atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				if v, ok := procs.Scrape(admin)[`sidecar_overload_limit{upstream="bench"}`]; ok {
					limits = append(limits, struct {
						at time.Time
						v  float64
					}{now, v})
				}
			}
		}
	}()
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		for ctx.Err() == nil {
			if n := backend.inFlight.Load(); n > peak.Load() {
				peak.Store(n)
			}
			time.Sleep(time.Millisecond)
		}
	}()

	out := make(chan outcome, 1<<16)
	var all []outcome
	collected := make(chan struct{})
	go func() {
		for o := range out {
			all = append(all, o)
		}
		close(collected)
	}()
	var wg sync.WaitGroup
	openLoop(client, url, keys, []float64{premiumRate, 0}, 0, aloneFor, out, &wg)
	overloadStart := time.Now()
	openLoop(client, url, keys, []float64{premiumRate, freeRate}, 1, overloadFor, out, &wg)
	overloadEnd := time.Now()
	openLoop(client, url, keys, []float64{premiumRate, 0}, 2, recoverFor, out, &wg)
	wg.Wait()
	close(out)
	<-collected
	cancel()
	sampler.Wait()
	// Let the backend drain before the next configuration.
	for i := 0; i < 600 && backend.inFlight.Load() > 0; i++ {
		time.Sleep(50 * time.Millisecond)
	}

	row := overloadRow{name: name, backendPeak: peak.Load()}
	pick := func(class, phase int, f func(outcome) bool) (n int, lat []time.Duration) {
		for _, o := range all {
			if o.class == class && o.phase == phase {
				n++
				if f(o) {
					lat = append(lat, o.latency)
				}
			}
		}
		return n, lat
	}
	okOnly := func(o outcome) bool { return o.ok }
	_, alone := pick(0, 0, okOnly)
	row.aloneP50, row.aloneP99 = pct(alone, 0.5), pct(alone, 0.99)
	n, prem := pick(0, 1, okOnly)
	row.premiumOK, row.premiumP50, row.premiumP99 = share(len(prem), n), pct(prem, 0.5), pct(prem, 0.99)
	nf, free := pick(1, 1, okOnly)
	_, shed := pick(1, 1, func(o outcome) bool { return o.shed })
	_, premShed := pick(0, 1, func(o outcome) bool { return o.shed })
	row.freeOK, row.freeShed = share(len(free), nf), share(len(shed), nf)
	row.shedP99 = pct(append(shed, premShed...), 0.99)
	served := 0 // 2xx answered within the overload, whenever sent
	for _, o := range all {
		if done := o.sent.Add(o.latency); o.ok && !done.Before(overloadStart) && done.Before(overloadEnd) {
			served++
		}
	}
	row.goodput = float64(served) / overloadEnd.Sub(overloadStart).Seconds() / overloadCapacity
	n, rec := pick(0, 2, okOnly)
	row.recoverOK, row.recoverP99 = share(len(rec), n), pct(rec, 0.99)

	// Settled: from the overload's start to the last sample outside ±15 %
	// of the limit's median over the overload's last 3 s.
	var tail []float64
	for _, l := range limits {
		if l.at.After(overloadEnd.Add(-3*time.Second)) && l.at.Before(overloadEnd) {
			tail = append(tail, l.v)
		}
	}
	if len(tail) > 0 {
		row.protected = true
		sort.Float64s(tail)
		row.limitEnd = tail[len(tail)/2]
		lastOut := overloadStart
		for _, l := range limits {
			if l.at.Before(overloadStart) {
				row.limitStart = l.v
				continue
			}
			if l.at.Before(overloadEnd) && (l.v > 1.15*row.limitEnd || l.v < 0.85*row.limitEnd) {
				lastOut = l.at
			}
		}
		row.settled = lastOut.Sub(overloadStart)
		row.limRec = limits[len(limits)-1].v
		var after []time.Duration
		for _, o := range all {
			if o.class == 0 && o.phase == 1 && o.ok && o.sent.After(lastOut) {
				after = append(after, o.latency)
			}
		}
		row.settledP99 = pct(after, 0.99)
	}
	return row
}

func share(n, of int) float64 {
	if of == 0 {
		return 0
	}
	return float64(n) / float64(of)
}

func pct(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[min(len(d)-1, int(q*float64(len(d))))]
}
