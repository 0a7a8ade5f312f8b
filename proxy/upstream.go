package proxy

import (
	"strings"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/sidecar-proxy/sidecar/breaker"
	"github.com/sidecar-proxy/sidecar/health"
	"github.com/sidecar-proxy/sidecar/policy"
	"github.com/sidecar-proxy/sidecar/upstream"
)

// upstreamRuntime is the runtime side of a policy.Upstream: its pools
// (package upstream), circuit, health checker and series. It outlives a
// reload when its settings are unchanged.
type upstreamRuntime struct {
	spec     *policy.Upstream
	pool     *upstream.Upstream
	m        *upstreamMetrics
	brk      *breaker.Breaker // nil: no circuit breaker
	rejected *metrics.Counter // bulkhead rejections
	checker  *health.Checker

	// headLatency is the typical time the upstream takes to answer (an
	// EWMA of the response-head latency of answered requests, ns; 0: none
	// yet): what tells a gRPC client's too-short deadline from an upstream
	// that does not answer (judgedDeadline).
	headLatency atomic.Int64
}

// noteLatency adds an answered request's response-head latency to the
// upstream's typical one. Concurrent updates may lose one: an estimate.
func (u *upstreamRuntime) noteLatency(d time.Duration) {
	if old := u.headLatency.Load(); old == 0 {
		u.headLatency.Store(int64(d))
	} else {
		u.headLatency.Store(old + (int64(d)-old)/8)
	}
}

// judgedDeadline is how many times its typical latency an upstream must
// have had, within a gRPC client's deadline, for the deadline passing to
// count as the upstream's timeout: less, and it is the client's own.
const judgedDeadline = 4

// judges reports whether a wait of given that ended without an answer
// says something of the upstream's health: it was given at least
// judgedDeadline times its typical latency, or it has answered nothing
// yet (a new upstream that hangs is a hung upstream).
func (u *upstreamRuntime) judges(given time.Duration) bool {
	typical := time.Duration(u.headLatency.Load())
	return typical == 0 || given >= judgedDeadline*typical
}

// poolSettings are the upstream package's settings for spec: everything of
// the client side, with the server's idle timeout as its I/O timeout.
func poolSettings(spec *policy.Upstream, idle time.Duration, set *metrics.Set) upstream.Settings {
	urls := make([]string, len(spec.Endpoints))
	for i, ep := range spec.Endpoints {
		urls[i] = ep.URL
	}
	return upstream.Settings{
		Name: spec.Name, Endpoints: strings.Join(urls, ","), ServerName: spec.ServerName, CAPEM: spec.CAPEM,
		ConnectTimeout: spec.ConnectTimeout, IOTimeout: idle,
		MaxConnections: spec.MaxConnections, MaxIdleConnections: spec.MaxIdleConnections,
		ConnWaitTimeout: spec.ConnWaitTimeout, IdleConnTimeout: spec.IdleConnTimeout,
		LeastConnections: spec.LeastConnections, RetryBudget: spec.RetryBudget,
		PassiveFailures: spec.PassiveFailures, PassiveEjection: spec.PassiveEjection, Metrics: set,
		HTTP2: spec.Protocol != policy.HTTP1,
	}
}

func newUpstreamRuntime(spec *policy.Upstream, m *upstreamMetrics, idle time.Duration) (*upstreamRuntime, error) {
	pool, err := upstream.New(poolSettings(spec, idle, m.set))
	if err != nil {
		return nil, err
	}
	return &upstreamRuntime{spec: spec, pool: pool, m: m}, nil
}

// outcome feeds passive health, logging an ejection.
func (u *upstreamRuntime) outcome(ep *upstream.Endpoint, failed bool, now time.Time, log func(string, ...any)) {
	if u.pool.Outcome(ep, failed, now) {
		log("endpoint ejected after consecutive failures", "upstream", u.spec.Name, "endpoint", ep.Addr(),
			"failures", u.spec.PassiveFailures, "for", u.spec.PassiveEjection.String())
	}
}

func (u *upstreamRuntime) closeIdle() {
	u.pool.CloseIdle()
	if u.checker != nil {
		u.checker.Stop()
	}
}

// rearm reports whether a deadline armed at armed with timeout d should be
// pushed forward; re-arming on every call would cost a timer update per
// read, so it happens once d/8 has passed.
func rearm(now, armed time.Time, d time.Duration) bool {
	return now.Sub(armed) > d>>3
}
