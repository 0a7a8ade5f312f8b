package health

import (
	"bytes"
	"fmt"
	"io"
	"math"
	runtimemetrics "runtime/metrics"
	"strconv"
	"strings"

	"github.com/VictoriaMetrics/metrics"
)

// runtimeHistograms maps the runtime histograms VictoriaMetrics/metrics
// exposes to their runtime/metrics names. It types them "histogram" but
// writes buckets only, no _sum or _count (deliberately: the runtime keeps
// no sum; VictoriaMetrics/metrics#94), which a strict reader of the text
// format refuses.
var runtimeHistograms = map[string]string{
	"go_sched_latencies_seconds": "/sched/latencies:seconds",
	"go_gc_pauses_seconds":       "/gc/pauses:seconds",
}

// WritePrometheus writes what metrics.WritePrometheus(w, true) writes (every
// registered set, then the process and Go runtime metrics), repaired for a
// strict reader of the Prometheus text format:
//
//   - an empty "# HELP name" gets the family's text from the help table;
//   - the runtime histograms are written from one runtime/metrics read with
//     the library's buckets (the same le values, so queries and recorded
//     series are unchanged), their exact _count, and an estimated _sum: see
//     appendRuntimeHistogram.
//
// The library's output is buffered whole (tens of KB); this is the scrape
// path, not the request path.
func WritePrometheus(w io.Writer) {
	var raw bytes.Buffer
	metrics.WritePrometheus(&raw, true)
	w.Write(repair(raw.Bytes(), readRuntimeHistograms())) //nolint:errcheck
}

// readRuntimeHistograms reads the runtime histograms this Go supports.
func readRuntimeHistograms() map[string]*runtimemetrics.Float64Histogram {
	families := make([]string, 0, len(runtimeHistograms))
	samples := make([]runtimemetrics.Sample, 0, len(runtimeHistograms))
	for family, name := range runtimeHistograms {
		families = append(families, family)
		samples = append(samples, runtimemetrics.Sample{Name: name})
	}
	runtimemetrics.Read(samples)
	hists := make(map[string]*runtimemetrics.Float64Histogram, len(samples))
	for i, s := range samples {
		if s.Value.Kind() == runtimemetrics.KindFloat64Histogram { // KindBad: not in this Go
			hists[families[i]] = s.Value.Float64Histogram()
		}
	}
	return hists
}

// repair rewrites an exposition in the text format: see WritePrometheus.
// The lines of a family in hists (its metadata and samples, as the library
// wrote them) are replaced, where the first of them was, by that
// histogram; a family the input does not have is not added.
func repair(in []byte, hists map[string]*runtimemetrics.Float64Histogram) []byte {
	out := make([]byte, 0, len(in)+len(in)/4)
	written := make(map[string]bool, len(hists))
	for len(in) > 0 {
		var line []byte
		line, in, _ = bytes.Cut(in, []byte("\n"))
		family, text, isHelp := parseLine(line)
		if f := histogramFamily(family); hists[f] != nil {
			if !written[f] {
				written[f] = true
				out = appendRuntimeHistogram(out, f, hists[f])
			}
			continue
		}
		if isHelp && len(text) == 0 && help[family] != "" {
			out = fmt.Appendf(out, "# HELP %s %s\n", family, help[family])
			continue
		}
		out = append(append(out, line...), '\n')
	}
	return out
}

// parseLine returns the metric name a line is about: the family of a
// "# HELP" or "# TYPE" line (and, for HELP, its text), or a sample's name.
func parseLine(line []byte) (name string, helpText []byte, isHelp bool) {
	if rest, ok := bytes.CutPrefix(line, []byte("# HELP ")); ok {
		n, text, _ := bytes.Cut(rest, []byte(" "))
		return string(n), text, true
	}
	if rest, ok := bytes.CutPrefix(line, []byte("# TYPE ")); ok {
		n, _, _ := bytes.Cut(rest, []byte(" "))
		return string(n), nil, false
	}
	if i := bytes.IndexAny(line, "{ "); i >= 0 {
		return string(line[:i]), nil, false
	}
	return string(line), nil, false
}

// histogramFamily is the runtime histogram a name belongs to (the family
// itself or its _bucket, _sum or _count series), or "".
func histogramFamily(name string) string {
	for _, suffix := range []string{"", "_bucket", "_sum", "_count"} {
		if f, ok := strings.CutSuffix(name, suffix); ok {
			if _, ok := runtimeHistograms[f]; ok {
				return f
			}
		}
	}
	return ""
}

// maxRuntimeBuckets is VictoriaMetrics/metrics' cap on the le buckets of a
// runtime histogram (its maxRuntimeHistogramBuckets).
const maxRuntimeBuckets = 30

// appendRuntimeHistogram writes a runtime histogram as a Prometheus one.
//
// Buckets: as VictoriaMetrics/metrics v1.45.0 lays them out, so the le
// values are the ones it wrote: buckets above 1 s are folded into +Inf,
// and of the rest at most about 30 bounds are kept, evenly spaced by index.
//
// _count is exact: the total of the runtime's counts (= the +Inf bucket).
//
// _sum is an estimate: the runtime counts samples in buckets and keeps no
// sum, so each bucket's count is taken at the bucket's midpoint (its finite
// bound when the other is infinite), over the runtime's own buckets, not
// the coarser ones exposed. The runtime's time buckets are narrow (four to
// a power of two: runtime/histogram.go), so a sample is placed at most
// about 12 % (below 0.5 µs, 64 ns) from its value, and the mean
// rate(_sum)/rate(_count) is usually closer. The estimate only grows, as a
// counter must: the midpoints are fixed and every count only grows.
// client_golang estimates its Go runtime histograms' sums the same way.
func appendRuntimeHistogram(out []byte, name string, h *runtimemetrics.Float64Histogram) []byte {
	buckets, counts := h.Buckets, h.Counts
	if len(buckets) != len(counts)+1 {
		return out // not the runtime's documented shape (runtime/metrics.Float64Histogram): leave the family out, not the scrape
	}
	var total, tail uint64
	for len(buckets) > 0 && buckets[len(buckets)-1] > 1 {
		buckets = buckets[:len(buckets)-1]
		tail += counts[len(counts)-1]
		counts = counts[:len(counts)-1]
	}
	out = fmt.Appendf(out, "# HELP %s %s\n# TYPE %s histogram\n", name, help[name], name)
	step, next := float64(len(buckets))/maxRuntimeBuckets, 0.0
	for i, c := range counts {
		total += c
		if float64(i) < next {
			continue
		}
		next += step
		if le := buckets[i+1]; !math.IsInf(le, 1) {
			out = fmt.Appendf(out, "%s_bucket{le=\"%g\"} %d\n", name, le, total)
		}
	}
	total += tail
	out = fmt.Appendf(out, "%s_bucket{le=\"+Inf\"} %d\n", name, total)
	out = append(out, name...)
	out = append(out, "_sum "...)
	out = strconv.AppendFloat(out, estimateSum(h), 'g', -1, 64)
	return fmt.Appendf(out, "\n%s_count %d\n", name, total)
}

// estimateSum is the sum of h's samples if each sat at its bucket's middle.
func estimateSum(h *runtimemetrics.Float64Histogram) float64 {
	sum := 0.0
	for i, c := range h.Counts {
		if c == 0 {
			continue
		}
		lo, hi := h.Buckets[i], h.Buckets[i+1]
		mid := lo + (hi-lo)/2
		switch {
		case math.IsInf(lo, -1) && math.IsInf(hi, 1):
			mid = 0
		case math.IsInf(lo, -1):
			mid = hi
		case math.IsInf(hi, 1):
			mid = lo
		}
		sum += float64(c) * mid
	}
	return sum
}
