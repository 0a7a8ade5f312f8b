package policy

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/netip"
	"reflect"
	"time"

	"github.com/sidecar-proxy/sidecar/overload"
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
	Store            Store
	Algorithm        Algorithm // tiers without their own
	OnStoreError     FailMode
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
	Mode             RedisMode
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
	H2C                 bool       // the plaintext listener also takes prior-knowledge HTTP/2
	TLS                 *ServerTLS // nil: plain HTTP
}

// Restart is the part of [server] that takes effect only when the process
// starts: the listeners, and what the proxy's fasthttp.Server and the admin
// server fix at start-up. A comparable value: a reload changed one of them
// when old.Restart() != new.Restart(), and Changed says which.
type Restart struct {
	Listen              string        `key:"server.listen"`
	AdminListen         string        `key:"server.admin_listen"`
	HeaderTimeout       time.Duration `key:"server.header_timeout"`
	KeepAliveIdle       time.Duration `key:"server.idle_timeout (as the keep-alive idle time; transfers use the new value)"`
	MaxHeaderBytes      int           `key:"server.max_header_bytes"`
	MaxConnections      int           `key:"server.max_connections"`
	MaxConnectionsPerIP int           `key:"server.max_connections_per_ip"`
	ReusePort           bool          `key:"server.reuse_port"`
	H2C                 bool          `key:"server.h2c"`
	AdminPprof          bool          `key:"server.admin_pprof"`
	TLS                 bool          `key:"server.tls (on or off)"`
	RedirectListen      string        `key:"server.tls.redirect_listen"`
}

// Restart returns the restart-only settings of s.
func (s *Server) Restart() Restart {
	r := Restart{Listen: s.Listen, AdminListen: s.AdminListen, HeaderTimeout: s.HeaderTimeout,
		KeepAliveIdle: s.IdleTimeout, MaxHeaderBytes: s.MaxHeaderBytes, MaxConnections: s.MaxConnections,
		MaxConnectionsPerIP: s.MaxConnectionsPerIP, ReusePort: s.ReusePort, H2C: s.H2C, AdminPprof: s.AdminPprof, TLS: s.TLS != nil}
	if s.TLS != nil {
		r.RedirectListen = s.TLS.RedirectListen
	}
	return r
}

// Changed names the keys whose values differ between r and next.
func (r Restart) Changed(next Restart) []string {
	var keys []string
	a, b := reflect.ValueOf(r), reflect.ValueOf(next)
	for i := range a.NumField() {
		if a.Field(i).Interface() != b.Field(i).Interface() {
			keys = append(keys, a.Type().Field(i).Tag.Get("key"))
		}
	}
	return keys
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
// Two Upstreams with the same Fingerprint can share connection pools,
// health checkers and circuits across a reload.
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
	Protocol           Protocol
	LeastConnections   bool
	Retries            int
	RetryBudget        float64
	PassiveFailures    int // 0: no passive ejection
	PassiveEjection    time.Duration
	HealthCheck        *HealthCheck // nil: no active checks
	RequiredForReady   bool
	Breaker            *Breaker    // nil: no circuit breaker
	TLSConfig          *tls.Config `json:"-"` // for https endpoints; see TLSSource
	// ServerName and CAPEM are what TLSConfig was built from: the name to
	// verify ("": each URL's host) and the CA bundle's PEM ("": the
	// system's roots), for clients that build their own.
	ServerName string
	CAPEM      string    `json:"-"` // in TLSSource by hash
	Fallback   *Fallback // nil: errors get the core's statuses
	// Overload is the overload protection's settings (TopPriority the
	// highest tier priority), nil when off. It is left out of the
	// Fingerprint: changing it updates the upstream's limiter in place
	// (keeping what it learned) instead of rebuilding its pools.
	Overload *overload.Settings `json:"-"`
	// TLSSource is what TLSConfig was built from: the server name and the
	// CA file's path and SHA-256 (a parsed x509.CertPool never compares
	// equal to another, even of the same file).
	TLSSource string
	// Fingerprint is the SHA-256 of every setting above but Overload
	// (TLSConfig by its TLSSource): equal fingerprints, equal upstreams. Set by the loader.
	Fingerprint [32]byte `json:"-"`
}

// fingerprint computes u.Fingerprint. JSON follows pointers, where %v
// would print their addresses.
func (u *Upstream) fingerprint() error {
	b, err := json.Marshal(u)
	if err != nil {
		return err
	}
	u.Fingerprint = sha256.Sum256(b)
	return nil
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
