package proxy

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/sidecar-proxy/sidecar/overload"
)

// Overload protection (package overload) in the request path: after the
// rate limits and before the circuit and bulkhead, a request takes a slot
// of its upstream's adaptive concurrency limit, waiting briefly by its
// tier's priority, or is shed with the upstream's fallback (reason "shed")
// without reaching the upstream. A shed request is no breaker failure (it
// never took a ticket) and is given back to the client's rate limit.

// overloadRuntime is one upstream's overload protection in one state: the
// limiter, which outlives reloads (Proxy.overloads keeps it by upstream
// name, so what it learned survives), and its series.
type overloadRuntime struct {
	lim *overload.Limiter
	m   *overloadMetrics
}

// overloadMetrics are an upstream's overload series, created once per
// upstream name; the gauges read the limiter the current state serves.
type overloadMetrics struct {
	set      *metrics.Set
	upstream string
	wait     *metrics.PrometheusHistogram
	shed     sync.Map // tier label → *metrics.Counter
}

// waitBuckets suit a queue wait bounded by queue_timeout (50 ms by
// default): 0.1 ms to ~1.6 s.
var waitBuckets = metrics.ExponentialBuckets(0.0001, 2, 15)

// overloadFor returns the upstream's overload protection for a state being
// built, nil when it is off: the upstream's limiter updated with the new
// settings (or made), its series registered once. Apply holds applyMu.
func (p *Proxy) overloadFor(name string, s *overload.Settings) (*overloadRuntime, error) {
	if s == nil {
		delete(p.overloads, name) // turned off: a later table starts afresh
		return nil, nil
	}
	lim := p.overloads[name]
	if lim == nil {
		var err error
		if lim, err = overload.New(*s); err != nil {
			return nil, err
		}
	} else if err := lim.Update(*s); err != nil {
		return nil, err
	}
	p.overloads[name] = lim
	m := p.overloadMetrics[name]
	if m == nil {
		m = p.newOverloadMetrics(name)
		p.overloadMetrics[name] = m
	}
	return &overloadRuntime{lim: lim, m: m}, nil
}

func (p *Proxy) newOverloadMetrics(name string) *overloadMetrics {
	m := &overloadMetrics{set: p.set, upstream: name,
		wait: p.set.GetOrCreatePrometheusHistogramExt(fmt.Sprintf(`sidecar_overload_queue_wait_seconds{upstream=%q}`, name), waitBuckets)}
	gauge := func(series string, read func(*overload.Limiter) int) {
		p.set.GetOrCreateGauge(fmt.Sprintf(`%s{upstream=%q}`, series, name), func() float64 {
			if o := p.state.Load().overload[name]; o != nil {
				return float64(read(o.lim))
			}
			return 0 // off
		})
	}
	gauge("sidecar_overload_limit", (*overload.Limiter).Limit)
	gauge("sidecar_overload_in_flight", (*overload.Limiter).InFlight)
	gauge("sidecar_overload_queued", (*overload.Limiter).Queued)
	return m
}

// shedInc counts a shed request of tier (a configured tier's name, or
// tierNone: bounded by the config).
func (m *overloadMetrics) shedInc(tier string) {
	if c, ok := m.shed.Load(tier); ok {
		c.(*metrics.Counter).Inc()
		return
	}
	c := m.set.GetOrCreateCounter(fmt.Sprintf(`sidecar_overload_shed_total{upstream=%q,tier=%q}`, m.upstream, tier))
	m.shed.Store(tier, c)
	c.Inc()
}

// enterOverload takes a slot of the route's upstream's concurrency limit
// for the request (see takeSlot).
func (x *exchange) enterOverload() error { return x.takeSlot(x.r.rt.ol) }

// takeSlot takes a slot of o (an upstream's overload protection, nil for
// none) by the request's tier priority. Shed, the request goes to the
// upstream's fallback like a refused circuit: errFallback, answered here
// and given back to the client's rate limit; or rerouted to the fallback
// upstream (nil, x.r.fallback set), which takes a slot of its own limit.
func (x *exchange) takeSlot(o *overloadRuntime) error {
	if o == nil {
		return nil
	}
	start := time.Now()
	tok, err := o.lim.Acquire(x.r.ctx, x.r.priority)
	if tok.Queued() || errors.Is(err, overload.ShedQueueTimeout) || errors.Is(err, overload.ShedEvicted) {
		o.m.wait.Update(time.Since(start).Seconds())
	}
	if err == nil {
		x.r.overload = tok
		return nil
	}
	// Shed, or the server is shutting down.
	tier := x.r.tier
	if tier == "" {
		tier = tierNone
	}
	o.m.shedInc(tier)
	err = x.fallBack("shed", time.Second)
	if errors.Is(err, errFallback) {
		x.refundRateLimit() // answered here: the upstream never saw it
	}
	return err
}

// leaveOverload releases the request's slot: with the upstream's latency
// when it answered (or timed out), else without a sample (refused by the
// circuit, failed to connect, abandoned) so that a fast failure does not
// pass for a fast upstream.
func (x *exchange) leaveOverload(now time.Time) {
	if x.r.upLatency > 0 {
		x.r.overload.Done(x.r.upLatency, x.r.upDropped, now)
	} else {
		x.r.overload.Ignore()
	}
	x.r.overload, x.r.upLatency, x.r.upDropped = overload.Token{}, 0, false
}
