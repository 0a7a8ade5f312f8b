package proxy

import (
	"sort"
	"time"
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
}

// LimiterStatus is the rate-limit store.
type LimiterStatus struct {
	Store       string `json:"store"` // memory or redis
	CoolingDown bool   `json:"cooling_down"`
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
		for _, ep := range u.endpoints {
			ep.mu.Lock()
			idle := len(ep.idle)
			ep.mu.Unlock()
			us.Endpoints = append(us.Endpoints, EndpointStatus{Addr: ep.addr, Busy: len(ep.busy), Idle: idle,
				MaxInUse: u.spec.MaxConnections, IdleLimit: u.spec.MaxIdleConnections})
		}
		s.Upstreams = append(s.Upstreams, us)
		if u.brk != nil {
			s.Circuits = append(s.Circuits, CircuitStatus{Name: "upstream:" + name,
				State: [...]string{"closed", "open", "half_open"}[u.brk.State(now)], InFlight: u.brk.InFlight()})
		}
	}
	s.Limiter = LimiterStatus{Store: st.snap.RateLimit.Store, CoolingDown: st.rl.lim.CoolingDown()}
	return s
}
