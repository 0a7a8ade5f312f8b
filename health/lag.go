package health

import (
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// LagProbe measures how late a ticker fires: the Go analogue of Node's
// event-loop lag. A runtime starved of CPU (GOMAXPROCS too low, a hot loop,
// GC pressure) makes it fire late, and the lateness shows up in seconds,
// beside the runtime's own go_sched_latencies_seconds histogram.
type LagProbe struct {
	last  *metrics.Gauge
	hist  *metrics.PrometheusHistogram
	stop  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
	every time.Duration
}

// StartLagProbe ticks every interval (default 100 ms) and records the delay
// in sidecar_runtime_lag_seconds (the last one) and
// sidecar_runtime_lag_probe_seconds (a histogram).
func StartLagProbe(set *metrics.Set, interval time.Duration) *LagProbe {
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	p := &LagProbe{
		last:  set.GetOrCreateGauge(`sidecar_runtime_lag_seconds`, nil),
		hist:  set.GetOrCreatePrometheusHistogramExt(`sidecar_runtime_lag_probe_seconds`, metrics.ExponentialBuckets(0.0001, 2, 15)),
		stop:  make(chan struct{}),
		every: interval,
	}
	p.wg.Add(1)
	go p.run()
	return p
}

func (p *LagProbe) run() {
	defer p.wg.Done()
	t := time.NewTicker(p.every)
	defer t.Stop()
	expected := time.Now().Add(p.every)
	for {
		select {
		case <-p.stop:
			return
		case now := <-t.C:
			// The channel carries the time the tick was due; what counts is
			// how much later this goroutine got to run.
			p.observe(expected, time.Now())
			expected = now.Add(p.every)
		}
	}
}

func (p *LagProbe) observe(expected, actual time.Time) {
	lag := max(0, actual.Sub(expected)).Seconds()
	p.last.Set(lag)
	p.hist.Update(lag)
}

// Stop ends the probe.
func (p *LagProbe) Stop() {
	p.once.Do(func() { close(p.stop) })
	p.wg.Wait()
}
