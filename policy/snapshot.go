package policy

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"net/netip"
	"time"
)

// Snapshot is a validated, compiled config. It is immutable: the proxy
// reads it concurrently without locks, and a reload replaces it whole.
type Snapshot struct {
	// Source is the file the snapshot was loaded from.
	Source    string
	Server    Server
	Upstreams map[string]*Upstream
	// UpstreamNames lists Upstreams' keys in sorted order.
	UpstreamNames []string
	Routes        []Route
	Identity      Identity
	Tiers         map[string]*Tier
	RateLimit     RateLimit
	Redis         Redis
	AccessLog     AccessLog
	// Files lists every file the snapshot was read from (config, keys,
	// public key): a change of any of them reloads.
	Files []string
}

// AccessLog is [access_log] with the secret read from the environment.
type AccessLog struct {
	Enabled bool
	Sample  float64
	Secret  []byte // nil: the proxy's random per-process key
}

// RateLimit is [rate_limit] with defaults applied.
type RateLimit struct {
	Store            string // "memory" or "redis"
	Algorithm        string // default for tiers
	OnStoreError     string // "local", "allow" or "deny"
	StoreTimeout     time.Duration
	FailureThreshold int
	Cooldown         time.Duration
	MaxKeys          int
	LegacyHeaders    bool
	Lease            bool          // quota leases (store "redis" only)
	LeaseOvershoot   float64       // share of a limit all leases may hold at once
	LeaseDuration    time.Duration // how long a lease may be spent
}

// Redis is [redis] with the credentials read from the environment and
// the CA file read. It holds no pointers or functions, so that two
// Redis values compare equal (reflect.DeepEqual) when a reload keeps the
// store as it was.
type Redis struct {
	Mode             string // "single", "cluster" or "sentinel"
	Addrs            []string
	MasterName       string // sentinel only
	Username         string
	Password         string
	SentinelPassword string // sentinel only
	DB               int
	TLS              bool
	TLSCA            []byte // PEM from tls_ca_file; nil: the system's roots
	TLSServerName    string // "": each address's host
	KeyPrefix        string
}

// Server holds the [server] settings with defaults applied.
type Server struct {
	Listen              string
	AdminListen         string
	HeaderTimeout       time.Duration
	IdleTimeout         time.Duration
	MaxHeaderBytes      int
	MaxBodyBytes        int64 // 0: unlimited
	DrainDelay          time.Duration
	DrainTimeout        time.Duration
	MaxConnections      int
	MaxConnectionsPerIP int // 0: unlimited
	TrustedProxies      []netip.Prefix
	TrustedOnlyHeaders  []string // removed from untrusted peers' requests
	AllowedUpgrades     []string // lower-case protocol names
	RequestIDHeader     string
	AdminPprof          bool
	ReusePort           bool
	TLS                 *ServerTLS // nil: plain HTTP
}

// ServerTLS is [server.tls], with the certificate loaded.
type ServerTLS struct {
	Cert           *tls.Certificate
	ClientCAs      *x509.CertPool
	ClientAuth     tls.ClientAuthType
	RedirectListen string
}

// Trusted reports whether addr is inside server.trusted_proxies.
func (s *Server) Trusted(addr netip.Addr) bool {
	addr = addr.Unmap()
	for _, p := range s.TrustedProxies {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// Upstream is one named backend with its endpoints and transport settings.
// Two Upstreams that compare equal (reflect.DeepEqual) can share connection
// pools across a reload.
type Upstream struct {
	Name               string
	Endpoints          []Endpoint
	ConnectTimeout     time.Duration
	ResponseTimeout    time.Duration
	MaxConnections     int
	MaxIdleConnections int
	ConnWaitTimeout    time.Duration
	IdleConnTimeout    time.Duration
	RewriteHost        bool
	LeastConnections   bool
	Retries            int
	RetryBudget        float64
	PassiveFailures    int // 0: no passive ejection
	PassiveEjection    time.Duration
	HealthCheck        *HealthCheck // nil: no active checks
	RequiredForReady   bool
	Breaker            *Breaker    // nil: no circuit breaker
	TLSConfig          *tls.Config // for https endpoints
	Fallback           *Fallback   // nil: errors get the core's statuses
}

// HealthCheck is [upstreams.NAME.health_check] with defaults applied.
type HealthCheck struct {
	Path               string
	Interval           time.Duration
	Timeout            time.Duration
	ExpectedStatus     int
	HealthyThreshold   int
	UnhealthyThreshold int
}

// Breaker is [upstreams.NAME.breaker] with defaults applied.
type Breaker struct {
	ErrorPercent    int
	VolumeThreshold int
	SleepWindow     time.Duration
	MaxConcurrent   int
	FailureStatuses []int
	// ConsecutiveFailures in a row open the circuit; 0: off.
	ConsecutiveFailures int
}

// Failure reports whether a response status counts as an upstream failure.
func (b *Breaker) Failure(status int) bool {
	for _, s := range b.FailureStatuses {
		if s == status {
			return true
		}
	}
	return false
}

// Fallback is [upstreams.NAME.fallback].
type Fallback struct {
	Status      int
	ContentType string
	Body        []byte
	Upstream    string // instead of a fixed response
}

// Endpoint is one address of an upstream.
type Endpoint struct {
	URL  string // as configured
	Addr string // host:port to dial
	TLS  bool   // https
}

// Route decides which upstream serves a request.
type Route struct {
	Name       string
	Index      int
	Host       string // lower-case; "" matches any host
	Wildcard   bool   // Host is "*.suffix": Host holds ".suffix"
	PathPrefix string
	Methods    []string // nil: any method
	Upstream   string
	// Rate limiting on this route.
	RateLimitExempt bool
	Shadow          bool           // route forces shadow mode
	Limits          map[string]int // tier → limit on this route
	LimitPerRoute   bool           // counted apart (also when Limits is set)
	OwnCircuit      bool
}

// Match returns the first route whose conditions all hold, or nil.
// host may carry a port and a trailing dot (the same name in DNS); it is
// compared case-insensitively.
func (s *Snapshot) Match(host, path, method []byte) *Route {
	host = bytes.TrimSuffix(stripPort(host), []byte{'.'})
	for i := range s.Routes {
		r := &s.Routes[i]
		if r.matches(host, path, method) {
			return r
		}
	}
	return nil
}

func (r *Route) matches(host, path, method []byte) bool {
	if len(r.PathPrefix) > 1 && !bytes.HasPrefix(path, []byte(r.PathPrefix)) {
		return false
	}
	if r.Host != "" {
		if r.Wildcard {
			if len(host) <= len(r.Host) || !bytes.EqualFold(host[len(host)-len(r.Host):], []byte(r.Host)) {
				return false
			}
		} else if !bytes.EqualFold(host, []byte(r.Host)) {
			return false
		}
	}
	if r.Methods != nil {
		for _, m := range r.Methods {
			if string(method) == m {
				return true
			}
		}
		return false
	}
	return true
}

func stripPort(host []byte) []byte {
	if len(host) > 0 && host[0] == '[' { // [v6]:port
		if i := bytes.IndexByte(host, ']'); i > 0 {
			return host[1:i]
		}
		return host
	}
	if i := bytes.LastIndexByte(host, ':'); i >= 0 && bytes.IndexByte(host[:i], ':') < 0 {
		return host[:i]
	}
	return host
}
