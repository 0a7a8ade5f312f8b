package test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// exportedNames returns the metric family names on /metrics.
func exportedNames(t *testing.T, sc *sidecar) map[string]bool {
	t.Helper()
	resp, err := http.Get("http://" + sc.Admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	names := map[string]bool{}
	s := bufio.NewScanner(resp.Body)
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		line := s.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name := line[:strings.IndexAny(line, "{ ")]
		for _, suffix := range []string{"_bucket", "_count", "_sum"} {
			name = strings.TrimSuffix(name, suffix)
		}
		names[name] = true
	}
	return names
}

var seriesRE = regexp.MustCompile(`\b(?:sidecar|go|process)_[a-z0-9_]+\b`)

// Every series the dashboard and the alert rules query is exported by a
// sidecar that uses the features they watch.
func TestDashboardAndAlertsQueryExportedSeries(t *testing.T) {
	rs := redistest.Start(t)
	hold := make(chan struct{})
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/busy/hold" {
			<-hold
		}
	})
	release := sync.OnceFunc(func() { close(hold) })
	t.Cleanup(release) // before the backend's: a failed test does not leave it waiting
	sc := startSidecar(t, fmt.Sprintf(`
[rate_limit]
store = "redis"
[redis]
addrs = [%q]
[tiers.anonymous]
limit = 3
window = "1m"
[upstreams.app]
url = %q
[upstreams.app.health_check]
interval = "100ms"
[upstreams.dead]
url = "http://%s"
[upstreams.dead.fallback]
status = 503
body = "{}"
[[routes]]
name = "dead"
path_prefix = "/dead"
upstream = "dead"
rate_limit_exempt = true
[upstreams.busy]
url = %q
[upstreams.busy.overload]
min_limit = 1
max_limit = 1
initial_limit = 1
reserved = 0
queue_size = 0
[[routes]]
name = "busy"
path_prefix = "/busy"
upstream = "busy"
rate_limit_exempt = true
[[routes]]
name = "app"
upstream = "app"
`, rs.Addr, be.url(), freeAddr(t), be.url()))
	for i := 0; i < 5; i++ { // allowed, then denied
		get(t, sc.url("/"), nil)
	}
	get(t, sc.url("/dead"), nil) // a refused upstream: an upstream error and a fallback
	// One request holds busy's only slot: the next is shed.
	held := make(chan answer, 1)
	go func() { held <- send(sc.url("/busy/hold"), "") }()
	waitMetric(t, sc, `sidecar_overload_in_flight{upstream="busy"}`, 1)
	if a := send(sc.url("/busy/x"), ""); !a.shed() {
		t.Errorf("a request beyond busy's limit of 1: %+v, want 503 shed", a)
	}
	release()
	if a := <-held; a.err != nil || a.status != 200 {
		t.Errorf("the request holding busy's slot: %+v, want 200", a)
	}
	time.Sleep(300 * time.Millisecond) // a few health checks
	names := exportedNames(t, sc)

	var exprs []string
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	raw, err := os.ReadFile("../deploy/grafana/sidecar-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard is not JSON: %v", err)
	}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	rules, err := os.ReadFile("../deploy/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(rules), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			exprs = append(exprs, line)
		}
	}
	missing := map[string]bool{}
	for _, e := range exprs {
		for _, name := range seriesRE.FindAllString(e, -1) {
			for _, suffix := range []string{"_bucket", "_count", "_sum"} {
				name = strings.TrimSuffix(name, suffix)
			}
			if !names[name] {
				missing[name] = true
			}
		}
	}
	if len(missing) > 0 {
		t.Errorf("queried but not exported: %v", missing)
	}
}

func TestAlertRulesPassPromtool(t *testing.T) {
	out, err := exec.Command("promtool", "check", "rules", "../deploy/prometheus/alerts.yml").CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check rules (make test installs Debian's prometheus): %v\n%s", err, out)
	}
}

// A real Prometheus scrapes the sidecar; its API's request rate and
// latency quantile match the traffic sent.
func TestRealPrometheusScrapes(t *testing.T) {
	if _, err := exec.LookPath("prometheus"); err != nil {
		t.Fatal("prometheus not installed (make test installs Debian's prometheus)")
	}
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { time.Sleep(20 * time.Millisecond) })
	sc := startSidecar(t, routeTo(be.url(), ""))
	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
scrape_configs:
  - job_name: sidecar
    static_configs:
      - targets: [%q]
`, sc.Admin)), 0o600)
	web := freeAddr(t)
	prom := exec.Command("prometheus", "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+web, "--log.level=warn")
	prom.Stdout, prom.Stderr = io.Discard, io.Discard
	if err := prom.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prom.Process.Kill(); prom.Wait() })
	deadline := time.Now().Add(20 * time.Second)
	for {
		if resp, err := http.Get("http://" + web + "/-/ready"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("prometheus not ready")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Prometheus starts scraping a few seconds after it is ready (discovery
	// updates are throttled): wait for the first scrape.
	for {
		resp, err := http.Get("http://" + web + "/api/v1/query?query=up")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(b), `"job":"sidecar"`) {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("prometheus never scraped the sidecar")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// 40 requests a second for 6 s, each ~20 ms at the backend.
	start := time.Now()
	sent := 0
	for time.Since(start) < 6*time.Second {
		get(t, sc.url("/"), nil)
		sent++
		time.Sleep(time.Until(start.Add(time.Duration(sent) * 25 * time.Millisecond)))
	}
	time.Sleep(2500 * time.Millisecond) // two more scrapes
	query := func(q string, at time.Time) float64 {
		t.Helper()
		resp, err := http.Get(fmt.Sprintf("http://%s/api/v1/query?query=%s&time=%.3f", web, url.QueryEscape(q),
			float64(at.UnixMilli())/1000))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var r struct {
			Status string
			Data   struct {
				Result []struct{ Value []any }
			}
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil || r.Status != "success" || len(r.Data.Result) == 0 {
			t.Fatalf("query %s: %v %+v", q, err, r)
		}
		v, _ := strconv.ParseFloat(r.Data.Result[0].Value[1].(string), 64)
		return v
	}
	now := time.Now()
	total := query(`sum(sidecar_requests_total{route="app"})`, now)
	// The rate over [1 s, 6 s] of the traffic, inside it.
	rate := query(`sum(rate(sidecar_requests_total{route="app"}[5s]))`, start.Add(6*time.Second))
	p50 := query(`histogram_quantile(0.5, sum by (le) (sidecar_request_duration_seconds_bucket{route="app"}))`, now)
	t.Logf("sent %d requests at ~40/s; Prometheus: total %v, rate %.1f/s, p50 latency %.1f ms", sent, total, rate, p50*1000)
	if total != float64(sent) {
		t.Errorf("Prometheus counted %v requests, %d were sent", total, sent)
	}
	if rate < 20 || rate > 60 {
		t.Errorf("rate %.1f/s for ~40/s sent", rate)
	}
	if p50 < 0.016 || p50 > 0.064 {
		t.Errorf("p50 %.3f s for ~20 ms requests", p50)
	}
}
