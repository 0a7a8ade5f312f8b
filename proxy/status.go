package proxy

import (
	"sort"
	"time"

	"github.com/sidecar-proxy/sidecar/breaker"
)

// Status is the read-only state that the admin /status endpoint shows.
type Status struct {
	Circuits  []CircuitStatus  `json:"circuits"`
	Upstreams []UpstreamStatus `json:"upstreams"`
	Limiter   LimiterStatus    `json:"rate_limit_store"`
}

// CircuitStatus is one circuit breaker.
type CircuitStatus struct {
	Name     string `json:"name"`
	State    string `json:"state"` // closed, open, half_open
	InFlight int    `json:"in_flight"`
}

// UpstreamStatus is one upstream's endpoints.
type UpstreamStatus struct {
	Name      string           `json:"name"`
	Endpoints []EndpointStatus `json:"endpoints"`
}

// EndpointStatus is one endpoint's connection pool.
type EndpointStatus struct {
	Addr      string `json:"addr"`
	Busy      int    `json:"busy_connections"`
	Idle      int    `json:"idle_connections"`
	MaxInUse  int    `json:"max_connections"`
	IdleLimit int    `json:"max_idle_connections"`
	Healthy   bool   `json:"healthy"` // active health checks' verdict
	Ejected   bool   `json:"ejected"` // passive ejection after consecutive failures
}

// LimiterStatus is the rate-limit store.
type LimiterStatus struct {
	Store       string `json:"store"` // memory or redis
	CoolingDown bool   `json:"cooling_down"`
}

func circuitStatus(name string, b *breaker.Breaker, now time.Time) CircuitStatus {
	return CircuitStatus{Name: name, State: b.State(now).String(), InFlight: b.InFlight()}
}

// Status reports circuits, pools and the limiter store.
func (p *Proxy) Status() Status {
	st := p.state.Load()
	var s Status
	now := time.Now()
	names := make([]string, 0, len(st.upstreams))
	for name := range st.upstreams {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		u := st.upstreams[name]
		us := UpstreamStatus{Name: name}
		for _, ep := range u.pool.Endpoints() {
			us.Endpoints = append(us.Endpoints, EndpointStatus{Addr: ep.Addr(), Busy: ep.Busy(), Idle: ep.Idle(),
				MaxInUse: u.spec.MaxConnections, IdleLimit: u.spec.MaxIdleConnections,
				Healthy: ep.Healthy(), Ejected: ep.Ejected(now)})
		}
		s.Upstreams = append(s.Upstreams, us)
		if u.brk != nil {
			s.Circuits = append(s.Circuits, circuitStatus("upstream:"+name, u.brk, now))
		}
	}
	for _, rr := range st.routes {
		if rr.brk != nil {
			s.Circuits = append(s.Circuits, circuitStatus("route:"+rr.route.Name, rr.brk, now))
		}
	}
	s.Limiter = LimiterStatus{Store: st.snap.RateLimit.Store.String(), CoolingDown: st.rl.lim.CoolingDown()}
	return s
}
