package proxy

import (
	"fmt"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/axiomhq/hyperloglog"
)

// activeClients estimates how many distinct clients each tier had over the
// last 1, 5 and 15 minutes with HyperLogLog sketches (github.com/axiomhq/
// hyperloglog, ~16 KiB per sketch at most, ~1 % error): a bounded-memory
// count, never a set of ids. One sketch per tier per minute, 16 minutes
// kept; the gauges merge the minutes they cover when scraped.
type activeClients struct {
	mu    sync.Mutex
	set   *metrics.Set
	tiers map[string]*tierSketches
}

type tierSketches struct {
	minute [16]int64 // unix minute each slot holds
	sk     [16]*hyperloglog.Sketch
}

var activeWindows = [...]struct {
	label   string
	minutes int64
}{{"1m", 1}, {"5m", 5}, {"15m", 15}}

func newActiveClients(set *metrics.Set) *activeClients {
	return &activeClients{tiers: map[string]*tierSketches{}, set: set}
}

// add records a client of tier now. tier values are bounded (configured
// tiers, none, other); the client id never leaves the sketch.
func (a *activeClients) add(tier string, client []byte, now time.Time) {
	if len(client) == 0 {
		return
	}
	min := now.Unix() / 60
	slot := min % 16
	a.mu.Lock()
	ts := a.tiers[tier]
	if ts == nil {
		ts = &tierSketches{}
		a.tiers[tier] = ts
		a.register(tier)
	}
	if ts.sk[slot] == nil || ts.minute[slot] != min {
		ts.sk[slot], ts.minute[slot] = hyperloglog.New14(), min
	}
	ts.sk[slot].Insert(client)
	a.mu.Unlock()
}

// estimate merges the sketches of the last minutes.
func (a *activeClients) estimate(tier string, minutes int64, now time.Time) uint64 {
	cur := now.Unix() / 60
	a.mu.Lock()
	defer a.mu.Unlock()
	ts := a.tiers[tier]
	if ts == nil {
		return 0
	}
	merged := hyperloglog.New14()
	for i := range ts.sk {
		if ts.sk[i] != nil && cur-ts.minute[i] < minutes {
			_ = merged.Merge(ts.sk[i])
		}
	}
	return merged.Estimate()
}

// register creates the tier's gauges (called with a.mu held, once per tier).
func (a *activeClients) register(tier string) {
	for _, w := range activeWindows {
		w := w
		a.set.GetOrCreateGauge(fmt.Sprintf(`sidecar_active_clients{tier=%q,window=%q}`, tier, w.label), func() float64 {
			return float64(a.estimate(tier, w.minutes, time.Now()))
		})
	}
}
