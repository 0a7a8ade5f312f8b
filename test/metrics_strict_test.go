package test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// runtimeHistograms are the Go runtime histograms on /metrics; the metrics
// library exposes them with buckets only, which a strict parser refuses.
var runtimeHistograms = []string{"go_sched_latencies_seconds", "go_gc_pauses_seconds"}

// /metrics, after traffic that creates the lazily registered series (a
// 429, an upstream error, a fallback, a 5xx), passes a strict reading:
// Prometheus' parser takes it, every histogram has _sum and _count, every
// sidecar_* family has HELP text and the type its name promises, and
// promtool finds nothing to say about sidecar_* or the runtime histograms.
// (promtool's remaining remarks are about go_* and process_* names the
// metrics library chose; they are logged, not failed.)
func TestMetricsStrict(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool not installed (make test installs Debian's prometheus)")
	}
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/fail" {
			w.WriteHeader(http.StatusInternalServerError)
		}
	})
	sc := startSidecar(t, fmt.Sprintf(`
[tiers.anonymous]
limit = 4
window = "1m"
[upstreams.app]
url = %q
[upstreams.app.health_check]
interval = "100ms"
[upstreams.app.breaker]
error_percent = 50
volume_threshold = 1000
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
[[routes]]
name = "app"
upstream = "app"
`, be.url(), freeAddr(t)))
	codes := map[int]int{}
	for _, path := range []string{"/", "/fail", "/dead", "/", "/", "/", "/", "/"} {
		resp, _ := get(t, sc.url(path), nil)
		codes[resp.StatusCode]++
	}
	if codes[429] == 0 || codes[500] == 0 || codes[503] == 0 {
		t.Fatalf("want a 429, a 500 and a 503 (fallback) among the answers, got %v", codes)
	}
	body := scrapeMetrics(t, sc)

	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	for _, name := range []string{"sidecar_requests_total", "sidecar_ratelimit_decisions_total",
		"sidecar_upstream_errors_total", "sidecar_fallbacks_total", "sidecar_breaker_state",
		"sidecar_request_duration_seconds", "sidecar_build_info"} {
		if fams[name] == nil {
			t.Errorf("%s not on /metrics: the traffic did not create it", name)
		}
	}
	for _, name := range runtimeHistograms {
		if f := fams[name]; f == nil || f.GetType().String() != "HISTOGRAM" {
			t.Errorf("%s: missing or not a histogram", name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(fams)) {
		f := fams[name]
		if strings.HasPrefix(name, "sidecar_") {
			if f.GetHelp() == "" {
				t.Errorf("%s: no HELP text", name)
			}
			if counter := strings.HasSuffix(name, "_total"); counter != (f.GetType().String() == "COUNTER") {
				t.Errorf("%s: type %s", name, f.GetType())
			}
		}
		if f.GetType().String() != "HISTOGRAM" {
			continue
		}
		for _, m := range f.GetMetric() {
			h := m.GetHistogram()
			if h.SampleCount == nil || h.SampleSum == nil {
				t.Errorf("%s: histogram without _sum or _count", name)
				break
			}
			inf := uint64(0)
			for _, b := range h.GetBucket() {
				if math.IsInf(b.GetUpperBound(), 1) {
					inf = b.GetCumulativeCount()
				}
			}
			if h.GetSampleCount() != inf || math.IsNaN(h.GetSampleSum()) || h.GetSampleSum() < 0 {
				t.Errorf("%s: _count %d, +Inf bucket %d, _sum %v", name, h.GetSampleCount(), inf, h.GetSampleSum())
			}
		}
	}

	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	out, err := cmd.CombinedOutput()
	if _, problems := err.(*exec.ExitError); err != nil && !problems {
		t.Fatalf("promtool: %v", err)
	}
	var others []string
	noHelp := 0
	s := bufio.NewScanner(bytes.NewReader(out))
	for s.Scan() {
		line := s.Text()
		if line == "" {
			continue
		}
		name, _, _ := strings.Cut(line, " ")
		// Anything but a remark on a go_* or process_* family fails:
		// sidecar_* families, the runtime histograms, parse errors.
		if library := strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_"); !library || isRuntimeHistogram(name) {
			t.Errorf("promtool: %s", line)
			continue
		}
		if strings.HasSuffix(line, " no help text") {
			noHelp++
		} else {
			others = append(others, line)
		}
	}
	t.Logf("promtool on the go_* and process_* families of the metrics library: %d without HELP text, and\n%s",
		noHelp, strings.Join(others, "\n"))
}

// isRuntimeHistogram reports whether name is a runtime histogram or one of
// its series.
func isRuntimeHistogram(name string) bool {
	for _, suffix := range []string{"", "_bucket", "_sum", "_count"} {
		if slices.Contains(runtimeHistograms, strings.TrimSuffix(name, suffix)) {
			return true
		}
	}
	return false
}

// scrapeMetrics returns the body of one GET /metrics.
func scrapeMetrics(t *testing.T, sc *sidecar) []byte {
	t.Helper()
	resp, err := http.Get("http://" + sc.Admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = errors.New(resp.Status)
	}
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	return b
}
