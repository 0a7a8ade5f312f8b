package health

import (
	"bytes"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"regexp"
	runtimemetrics "runtime/metrics"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/valyala/fasthttp"
)

func TestRepair(t *testing.T) {
	h := &runtimemetrics.Float64Histogram{
		Buckets: []float64{math.Inf(-1), 0, 0.5, 1, 2, math.Inf(1)},
		Counts:  []uint64{0, 2, 1, 3, 4},
	}
	f := func(in, want string) {
		t.Helper()
		got := string(repair([]byte(in), map[string]*runtimemetrics.Float64Histogram{"go_gc_pauses_seconds": h}))
		if got != want {
			t.Errorf("repair\n%s\ngot\n%s\nwant\n%s", in, got, want)
		}
	}
	// HELP text from the table; other lines, a family without an entry and
	// one with text already are untouched.
	f("# HELP sidecar_requests_in_flight\n# TYPE sidecar_requests_in_flight gauge\nsidecar_requests_in_flight 3\n"+
		"# HELP foo\n# TYPE foo counter\nfoo 1\n# HELP bar Bar.\nbar 2\n",
		"# HELP sidecar_requests_in_flight "+help["sidecar_requests_in_flight"]+"\n"+
			"# TYPE sidecar_requests_in_flight gauge\nsidecar_requests_in_flight 3\n"+
			"# HELP foo\n# TYPE foo counter\nfoo 1\n# HELP bar Bar.\nbar 2\n")
	// The library's runtime histogram is replaced where it was: the ≤ 1 s
	// buckets, the 7 samples above 1 s only in +Inf, the exact count, the
	// estimated sum (0.25×2 + 0.75×1 + 1.5×3 + 2×4: the bucket above 2 s
	// at its lower bound).
	f("a 1\n# HELP go_gc_pauses_seconds\n# TYPE go_gc_pauses_seconds histogram\n"+
		"go_gc_pauses_seconds_bucket{le=\"0\"} 0\ngo_gc_pauses_seconds_bucket{le=\"+Inf\"} 9\nb 2\n",
		"a 1\n# HELP go_gc_pauses_seconds "+help["go_gc_pauses_seconds"]+"\n# TYPE go_gc_pauses_seconds histogram\n"+
			"go_gc_pauses_seconds_bucket{le=\"0\"} 0\ngo_gc_pauses_seconds_bucket{le=\"0.5\"} 2\ngo_gc_pauses_seconds_bucket{le=\"1\"} 3\n"+
			"go_gc_pauses_seconds_bucket{le=\"+Inf\"} 10\ngo_gc_pauses_seconds_sum 13.75\ngo_gc_pauses_seconds_count 10\nb 2\n")
	// Without metadata (ExposeMetadata off) the samples are replaced alike.
	f("go_gc_pauses_seconds_bucket{le=\"+Inf\"} 9\n",
		"# HELP go_gc_pauses_seconds "+help["go_gc_pauses_seconds"]+"\n# TYPE go_gc_pauses_seconds histogram\n"+
			"go_gc_pauses_seconds_bucket{le=\"0\"} 0\ngo_gc_pauses_seconds_bucket{le=\"0.5\"} 2\ngo_gc_pauses_seconds_bucket{le=\"1\"} 3\n"+
			"go_gc_pauses_seconds_bucket{le=\"+Inf\"} 10\ngo_gc_pauses_seconds_sum 13.75\ngo_gc_pauses_seconds_count 10\n")
	// A runtime histogram the input does not have is not added.
	f("a 1\n", "a 1\n")
}

func TestEstimateSum(t *testing.T) {
	f := func(buckets []float64, counts []uint64, want float64) {
		t.Helper()
		if got := estimateSum(&runtimemetrics.Float64Histogram{Buckets: buckets, Counts: counts}); got != want {
			t.Errorf("estimateSum(%v, %v) = %v, want %v", buckets, counts, got, want)
		}
	}
	inf := math.Inf(1)
	f([]float64{-inf, 0, 1, 3, inf}, []uint64{5, 2, 1, 4}, 0*5+0.5*2+2*1+3*4)
	f([]float64{-inf, inf}, []uint64{7}, 0)
	f([]float64{0, 1}, []uint64{0}, 0)
}

// The runtime histograms keep the le values VictoriaMetrics/metrics gives
// them, so queries and recorded series do not change with the repair.
func TestRuntimeHistogramBucketsAreTheLibrarys(t *testing.T) {
	var lib bytes.Buffer
	metrics.WriteGoMetrics(&lib)
	hists := readRuntimeHistograms()
	for family := range runtimeHistograms {
		if hists[family] == nil {
			t.Errorf("%s: runtime/metrics has no %s", family, runtimeHistograms[family])
			continue
		}
		want, got := leValues(lib.Bytes(), family), leValues(appendRuntimeHistogram(nil, family, hists[family]), family)
		if len(want) < 3 || !slices.Equal(got, want) {
			t.Errorf("%s: le values\n%v\nthe library's\n%v", family, got, want)
		}
	}
}

func leValues(exposition []byte, family string) []string {
	var les []string
	for _, m := range regexp.MustCompile(regexp.QuoteMeta(family)+`_bucket\{le="([^"]+)"\}`).FindAllSubmatch(exposition, -1) {
		les = append(les, string(m[1]))
	}
	return les
}

// /metrics through the admin handler parses as Prometheus text, with HELP
// text on our families and _sum and _count on every histogram.
func TestMetricsHandlerIsStrict(t *testing.T) {
	metrics.ExposeMetadata(true)
	defer metrics.ExposeMetadata(false)
	set := metrics.NewSet()
	metrics.RegisterSet(set)
	defer metrics.UnregisterSet(set, true)
	p := StartLagProbe(set, time.Millisecond)
	defer p.Stop()
	set.GetOrCreateCounter(`sidecar_requests_total{route="a",method="GET",status_class="2xx",tier="none"}`).Inc()

	var ctx fasthttp.RequestCtx
	ctx.Request.SetRequestURI("/metrics")
	Handler(&State{}, false, nil)(&ctx)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(ctx.Response.Body()))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	for _, name := range []string{"sidecar_requests_total", "sidecar_runtime_lag_seconds", "sidecar_runtime_lag_probe_seconds",
		"go_sched_latencies_seconds", "go_gc_pauses_seconds"} {
		if fams[name] == nil || fams[name].GetHelp() != help[name] {
			t.Errorf("%s: missing, or HELP %q", name, fams[name].GetHelp())
		}
	}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			if h := m.GetHistogram(); h != nil && (h.SampleCount == nil || h.SampleSum == nil) {
				t.Errorf("%s: histogram without _sum or _count", name)
			}
		}
	}
}

// familyRE finds metric names in the module's Go string literals: the
// names series are registered under (and read by bench/).
var familyRE = regexp.MustCompile("[`\"](sidecar_[a-z0-9_]+)")

// Every sidecar_* family named in the module's code has HELP text, and
// every entry of the help table names a family that still exists.
func TestEveryFamilyHasHelp(t *testing.T) {
	named := map[string]string{} // family → a file naming it
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if _, err := os.Stat(filepath.Join(path, "go.mod")); (err == nil && path != "..") || d.Name() == ".git" || d.Name() == "testdata" {
				return filepath.SkipDir // another module (deploy/), or no code
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range familyRE.FindAllSubmatch(src, -1) {
			named[familyOf(string(m[1]))] = path
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(named) < 40 {
		t.Fatalf("found only %d sidecar_* families in the sources: %v", len(named), named)
	}
	for family, path := range named {
		if help[family] == "" {
			t.Errorf("%s (named in %s) has no entry in the help table (health/help.go)", family, path)
		}
	}
	for family, text := range help {
		if _, ok := named[family]; !ok && runtimeHistograms[family] == "" {
			t.Errorf("help table: %s is named nowhere in the code", family)
		}
		// The text format escapes \ and newlines in HELP; the table has neither.
		if text == "" || strings.ContainsAny(text, "\\\n") || !strings.HasSuffix(text, ".") {
			t.Errorf("help table: %s: text %q", family, text)
		}
	}
}

// familyOf strips a histogram series suffix from a name whose family has
// help text (sidecar_upstream_duration_seconds_count → …_seconds).
func familyOf(name string) string {
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if f, ok := strings.CutSuffix(name, suffix); ok && help[f] != "" {
			return f
		}
	}
	return name
}
