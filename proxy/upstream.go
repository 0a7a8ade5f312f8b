package proxy

import (
	"strings"
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
