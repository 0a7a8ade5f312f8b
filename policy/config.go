// Package policy owns sidecar.toml: its schema, strict decoding, validation,
// and compilation into an immutable Snapshot that the proxy reads on every
// request. Nothing in this package touches the network.
//
// The flow is Load (or Parse) → Snapshot. A Snapshot is never modified after
// it is built; a reload builds a new one and the proxy swaps it atomically.
package policy

import (
	"errors"
	"fmt"
	"time"
)

// Duration is a time.Duration written in TOML as a Go duration string
// ("250ms", "1m30s"). go-toml/v2 does not decode strings into time.Duration
// by itself.
type Duration struct{ time.Duration }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%w %q (use Go syntax such as \"500ms\", \"10s\", \"1m\")", errDuration, b)
	}
	d.Duration = v
	return nil
}

// errDuration is Duration.UnmarshalText's error (see durationNotAString).
var errDuration = errors.New("invalid duration")

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// File is the raw shape of sidecar.toml. Pointer fields distinguish "absent"
// (take the default) from an explicit zero. The defaults live in
// defaults.go; the field docs state them, and so does sidecar.toml in the
// repository root, the commented reference (defaults_test.go checks both).
type File struct {
	Server    ServerFile              `toml:"server"`
	Upstreams map[string]UpstreamFile `toml:"upstreams"`
	Routes    []RouteFile             `toml:"routes"`
	Identity  IdentityFile            `toml:"identity"`
	Tiers     map[string]TierFile     `toml:"tiers"`
	RateLimit RateLimitFile           `toml:"rate_limit"`
	Redis     RedisFile               `toml:"redis"`
	AccessLog AccessLogFile           `toml:"access_log"`
}

// AccessLogFile is [access_log]: one JSON line per request on stdout.
type AccessLogFile struct {
	// Enabled turns the access log on. Default false.
	Enabled *bool `toml:"enabled"`
	// Sample is the share of successful requests (status < 400) logged;
	// errors and denials are always logged. Default 1.0.
	Sample *float64 `toml:"sample"`
	// FingerprintSecretEnv names the environment variable holding the HMAC
	// key that turns client ids into fingerprints. Default: a random key
	// per process (fingerprints then differ between replicas and restarts).
	FingerprintSecretEnv *string `toml:"fingerprint_secret_env"`
}

// IdentityFile is the [identity] table: how a client is recognised.
// Order: API key, then signed token, then the client IP (anonymous).
type IdentityFile struct {
	// APIKeyHeader carries API keys. Default "X-API-Key".
	APIKeyHeader *string `toml:"api_key_header"`
	// APIKeysFile lists keys by SHA-256 (relative paths are relative to
	// the config file). Default: no API keys.
	APIKeysFile *string `toml:"api_keys_file"`
	// JWT enables signed bearer tokens. Default: off.
	JWT *JWTFile `toml:"jwt"`
	// AnonymousTier is the tier of clients known only by IP. Default
	// "anonymous".
	AnonymousTier *string `toml:"anonymous_tier"`
	// AuthenticatedTier is the tier of a token without a tier claim.
	// Default "authenticated".
	AuthenticatedTier *string `toml:"authenticated_tier"`
	// ClientCertTier is the tier of clients with a verified TLS client
	// certificate (identified as "cert:<subject CN>"). Default: not used.
	ClientCertTier *string `toml:"client_cert_tier"`
	// IPv6Prefix groups anonymous IPv6 clients by network. Default 64.
	IPv6Prefix *int `toml:"ipv6_prefix"`
	// ClientHeader and TierHeader carry the verified identity upstream;
	// copies sent by the client are removed. Defaults "X-Sidecar-Client",
	// "X-Sidecar-Tier".
	ClientHeader *string `toml:"client_header"`
	TierHeader   *string `toml:"tier_header"`
}

// JWTFile is [identity.jwt].
type JWTFile struct {
	// Algorithm is the only one accepted: "HS256", "RS256" or "ES256".
	// Required. A token's own "alg" never chooses.
	Algorithm *string `toml:"algorithm"`
	// SecretEnv names the environment variable holding the HS256 secret
	// (at least 32 bytes). Required with HS256, refused otherwise.
	SecretEnv *string `toml:"secret_env"`
	// PublicKeyFile is the PEM public key for RS256/ES256 (relative to
	// the config file). Required with those, refused with HS256.
	PublicKeyFile *string `toml:"public_key_file"`
	// TierClaim and ClientClaim name the claims read. Defaults "tier", "sub".
	TierClaim   *string `toml:"tier_claim"`
	ClientClaim *string `toml:"client_claim"`
	// Issuer and Audience, when set, must match. Default: not checked.
	Issuer   *string `toml:"issuer"`
	Audience *string `toml:"audience"`
	// Leeway tolerates clock skew on exp/nbf. Default 0s.
	Leeway *Duration `toml:"leeway"`
	// RequireExp refuses tokens without an "exp" claim, which would never
	// expire. Default true.
	RequireExp *bool `toml:"require_exp"`
	// UnknownTier is what a valid token whose tier claim names no
	// [tiers.NAME] table gets: "authenticated" (default: the
	// authenticated tier; counted and logged) or "reject" (401).
	UnknownTier *string `toml:"unknown_tier"`
}

// TierFile is one [tiers.NAME] table.
type TierFile struct {
	// Unlimited makes a tier that is never rate limited; it then takes no
	// limit, window, burst or algorithm. Default false.
	Unlimited *bool `toml:"unlimited"`
	// Limit requests per Window. Required unless Unlimited.
	Limit  *int      `toml:"limit"`
	Window *Duration `toml:"window"`
	// Burst is the GCRA bucket depth. Default: Limit.
	Burst *int `toml:"burst"`
	// Algorithm overrides [rate_limit].algorithm for this tier. Default:
	// [rate_limit].algorithm.
	Algorithm *string `toml:"algorithm"`
	// Mode is "enforce" (default) or "shadow": decisions are computed,
	// counted, logged and sent as headers, but nothing is blocked.
	Mode *string `toml:"mode"`
	// Priority orders the tier's requests under overload protection,
	// 0..100, higher first: at an upstream's limit lower priorities are
	// shed first, and the highest configured priority alone may use the
	// reserved share. Default 0 (the lowest), also for requests without
	// a tier table.
	Priority *int `toml:"priority"`
}

// RateLimitFile is [rate_limit].
type RateLimitFile struct {
	// Store is "memory" (default, per process) or "redis" (shared).
	Store *string `toml:"store"`
	// Algorithm is "sliding_window" (default) or "gcra".
	Algorithm *string `toml:"algorithm"`
	// OnStoreError is "local" (default), "allow" or "deny".
	OnStoreError *string `toml:"on_store_error"`
	// StoreTimeout bounds one Redis decision. Default 50ms.
	StoreTimeout *Duration `toml:"store_timeout"`
	// FailureThreshold consecutive store failures start a Cooldown during
	// which Redis is not called. Defaults 3 and 5s.
	FailureThreshold *int      `toml:"failure_threshold"`
	Cooldown         *Duration `toml:"cooldown"`
	// MaxKeys caps the clients held in memory. Default 200000.
	MaxKeys *int `toml:"max_keys"`
	// LegacyHeaders adds X-RateLimit-Limit/Remaining/Reset. Default true.
	LegacyHeaders *bool `toml:"legacy_headers"`
	// Lease turns on quota leases: for a hot client, a replica takes a
	// slice of the remaining quota from Redis in one call and spends it
	// locally, giving back what it did not use. Needs store = "redis".
	// Default false.
	Lease *bool `toml:"lease"`
	// LeaseOvershoot is the share of a limit that all replicas' leases may
	// hold at once for one client: a window admits at most limit × (1 +
	// lease_overshoot). Greater than 0, at most 0.2. Default 0.01.
	LeaseOvershoot *float64 `toml:"lease_overshoot"`
	// LeaseDuration is how long a lease may be spent before its unused
	// units go back; also the span over which a client's rate is measured
	// to size its leases. 10ms to 1m. Default 1s.
	LeaseDuration *Duration `toml:"lease_duration"`
}

// RedisFile is [redis].
type RedisFile struct {
	// Mode is "single" (default), "cluster" (Redis Cluster) or "sentinel"
	// (a primary and replicas watched by Redis Sentinel).
	Mode *string `toml:"mode"`
	// Addrs are host:port addresses: the server (single: exactly one),
	// seed nodes (cluster: one or more; any that answers gives the whole
	// topology), or the sentinels (sentinel). Required with
	// rate_limit.store = "redis".
	Addrs []string `toml:"addrs"`
	// MasterName is the name the sentinels monitor the primary under.
	// Required with mode "sentinel", refused otherwise.
	MasterName *string `toml:"master_name"`
	// UsernameEnv and PasswordEnv name the environment variables holding
	// the ACL user and its password for the data nodes; neither is ever in
	// the file. Default: no username (Redis' "default" user), no password.
	UsernameEnv *string `toml:"username_env"`
	PasswordEnv *string `toml:"password_env"`
	// SentinelPasswordEnv names the environment variable holding the
	// sentinels' own password (their requirepass). Mode "sentinel" only.
	// Default: none.
	SentinelPasswordEnv *string `toml:"sentinel_password_env"`
	// DB is the database number, 0-15. Redis Cluster has only db 0.
	// Default 0.
	DB *int `toml:"db"`
	// TLS connects with TLS 1.2+ (to sentinels too). Default false.
	TLS *bool `toml:"tls"`
	// TLSCAFile verifies the servers against these CAs (PEM; relative to
	// the config file). Needs tls = true. Default: the system's.
	TLSCAFile *string `toml:"tls_ca_file"`
	// TLSServerName is the name the servers' certificates must carry.
	// Needs tls = true. Default: the host of each address.
	TLSServerName *string `toml:"tls_server_name"`
	// KeyPrefix starts every key. Default "sidecar".
	KeyPrefix *string `toml:"key_prefix"`
}

// KeysFile is the API keys file: only SHA-256 hashes of keys are stored
// (`sidecar -hash-key KEY` prints one).
type KeysFile struct {
	Keys []KeyFile `toml:"keys"`
}

// KeyFile is one [[keys]] entry.
type KeyFile struct {
	SHA256  string `toml:"sha256"`
	Tier    string `toml:"tier"`
	Client  string `toml:"client"`
	Revoked bool   `toml:"revoked"`
}

// ServerFile is the [server] table.
type ServerFile struct {
	// Listen is the proxy listener address. Default "127.0.0.1:8080".
	Listen *string `toml:"listen"`
	// AdminListen serves /healthz, /readyz and /metrics. Default
	// "127.0.0.1:9090". Must differ from Listen.
	AdminListen *string `toml:"admin_listen"`
	// HeaderTimeout bounds how long a client may take to send the whole
	// request head (slowloris defence). Default 10s.
	HeaderTimeout *Duration `toml:"header_timeout"`
	// IdleTimeout cuts a transfer that makes no progress for this long, in
	// either direction, on client and upstream sockets; it is also how long
	// an idle keep-alive client connection is kept. Default 60s.
	IdleTimeout *Duration `toml:"idle_timeout"`
	// MaxHeaderBytes is the largest request head accepted; larger gets 431.
	// Default 16384.
	MaxHeaderBytes *int `toml:"max_header_bytes"`
	// MaxBodyBytes is the largest request body accepted; larger gets 413.
	// 0 means unlimited. Default 104857600 (100 MiB).
	MaxBodyBytes *int64 `toml:"max_body_bytes"`
	// DrainDelay is how long /readyz reports "draining" before the listener
	// closes on SIGTERM, so load balancers stop sending first. Default 0s
	// (Kubernetes users set it, or use a preStop sleep).
	DrainDelay *Duration `toml:"drain_delay"`
	// DrainTimeout bounds how long in-flight requests and streams may take to
	// finish after the listener closed; what is left is cut. Default 30s.
	DrainTimeout *Duration `toml:"drain_timeout"`
	// MaxConnections caps concurrent client connections. Default 10000.
	MaxConnections *int `toml:"max_connections"`
	// MaxConnectionsPerIP caps concurrent connections from one client IP.
	// 0 means no per-IP cap. Default 0.
	MaxConnectionsPerIP *int `toml:"max_connections_per_ip"`
	// TrustedProxies lists CIDRs (or single IPs) whose X-Forwarded-* headers
	// are believed. Default empty: nobody is trusted.
	TrustedProxies []string `toml:"trusted_proxies"`
	// TrustedOnlyHeaders are fields that name the client, its address or
	// the URL it asked for, and that backends believe: they are removed
	// from requests whose peer is not in TrustedProxies (also when spelled
	// with '_' for '-'). Setting it replaces the default list,
	// DefaultTrustedOnlyHeaders (Forwarded, X-Real-IP, True-Client-IP,
	// X-Original-URL, ...).
	TrustedOnlyHeaders []string `toml:"trusted_only_headers"`
	// AllowedUpgrades are the protocols a client may switch to (Upgrade,
	// RFC 9110 §7.8), compared case-insensitively; a request for another is
	// answered 501, except "h2c", which is ignored (served as HTTP/1.1).
	// Default ["websocket"].
	AllowedUpgrades []string `toml:"allowed_upgrades"`
	// RequestIDHeader names the request-id header. Default "X-Request-Id".
	RequestIDHeader *string `toml:"request_id_header"`
	// AdminPprof serves Go's profiler under /debug/pprof/ on the admin
	// listener. Default false: profiles reveal internals.
	AdminPprof *bool `toml:"admin_pprof"`
	// TLS terminates TLS on the proxy listener. Default: plain HTTP.
	TLS *TLSFile `toml:"tls"`
	// ReusePort opens the proxy listener with SO_REUSEPORT, so that several
	// processes can share the port (the kernel balances connections) and a
	// new process can start before the old one drains. Default false.
	ReusePort *bool `toml:"reuse_port"`
	// H2C makes the plaintext proxy listener accept prior-knowledge
	// HTTP/2 (what gRPC clients and meshes send) besides HTTP/1.1, on the
	// same port. With [server.tls], HTTP/2 is offered by ALPN anyway.
	// Default false.
	H2C *bool `toml:"h2c"`
}

// TLSFile is [server.tls]. Files are reloaded when they change.
type TLSFile struct {
	CertFile *string `toml:"cert_file"` // PEM certificate chain; required
	KeyFile  *string `toml:"key_file"`  // PEM private key; required
	// ClientCAFile verifies client certificates against these CAs. Needed
	// by client_auth "request" and "require". Default: none.
	ClientCAFile *string `toml:"client_ca_file"`
	// ClientAuth is "none" (default), "request" (verify when sent) or
	// "require".
	ClientAuth *string `toml:"client_auth"`
	// RedirectListen, when set, serves plain HTTP there that redirects
	// every request to HTTPS (308). Default: off.
	RedirectListen *string `toml:"redirect_listen"`
}

// UpstreamFile is one [upstreams.NAME] table.
type UpstreamFile struct {
	// URL is a single endpoint, "http://host:port". Exactly one of URL and
	// URLs is required.
	URL *string `toml:"url"`
	// URLs lists several endpoints, balanced round-robin.
	URLs []string `toml:"urls"`
	// ConnectTimeout bounds a TCP connect to an endpoint. Default 1s.
	ConnectTimeout *Duration `toml:"connect_timeout"`
	// ResponseTimeout bounds the wait for response headers after the request
	// was sent (or after the last request-body progress). Default 15s.
	ResponseTimeout *Duration `toml:"response_timeout"`
	// MaxConnections caps connections (busy and idle) per endpoint; a
	// request finding none free waits up to ConnWaitTimeout. Default 1024.
	MaxConnections *int `toml:"max_connections"`
	// MaxIdleConnections caps pooled idle connections per endpoint, at
	// most MaxConnections. Default 128, or MaxConnections when that is
	// smaller.
	MaxIdleConnections *int `toml:"max_idle_connections"`
	// ConnWaitTimeout bounds the wait for a free connection slot. Default 100ms.
	ConnWaitTimeout *Duration `toml:"conn_wait_timeout"`
	// IdleConnTimeout closes pooled connections unused this long. Default 30s.
	IdleConnTimeout *Duration `toml:"idle_conn_timeout"`
	// RewriteHost sends the endpoint's host:port as Host instead of the
	// client's Host. Default false (Host is preserved).
	RewriteHost *bool `toml:"rewrite_host"`
	// Protocol spoken to the endpoints: "http1", "h2c" (prior-knowledge
	// HTTP/2 over http:// endpoints) or "h2" (HTTP/2 over https://
	// endpoints). gRPC backends are h2c or h2. Default "http1".
	Protocol *string `toml:"protocol"`
	// CAFile verifies https endpoints against these CAs. Default: the
	// system's.
	CAFile *string `toml:"ca_file"`
	// ServerName is the TLS server name (SNI) for https endpoints. Default:
	// the URL's host.
	ServerName *string `toml:"server_name"`
	// Balance is "round_robin" (default) or "least_connections".
	Balance *string `toml:"balance"`
	// Retries is how many more endpoints an idempotent request without a
	// body may try after a connect error, timeout or reset. A request that
	// could not connect is always retried once on another endpoint. All
	// retries stay within RetryBudget. Default 0.
	Retries *int `toml:"retries"`
	// RetryBudget caps retries at this share of requests. Default 0.2.
	RetryBudget *float64 `toml:"retry_budget"`
	// PassiveFailures consecutive failures eject an endpoint for
	// PassiveEjection. Defaults 5 and 10s; 0 turns passive ejection off.
	PassiveFailures *int      `toml:"passive_failures"`
	PassiveEjection *Duration `toml:"passive_ejection"`
	// HealthCheck probes every endpoint actively. Default: off.
	HealthCheck *HealthCheckFile `toml:"health_check"`
	// RequiredForReadiness makes /readyz fail while this upstream has no
	// usable endpoint. Default false.
	RequiredForReadiness *bool `toml:"required_for_readiness"`
	// Breaker tunes the circuit breaker and bulkhead, which are on by
	// default with the defaults of BreakerFile.
	Breaker *BreakerFile `toml:"breaker"`
	// Fallback answers for the upstream when its circuit is open, its
	// bulkhead full, it sheds, or it fails. Default: the core's
	// 502/503/504.
	Fallback *FallbackFile `toml:"fallback"`
	// Overload turns on overload protection: an adaptive concurrency
	// limit in front of the bulkhead, with a short queue ordered by tier
	// priority. Default: off (no table).
	Overload *OverloadFile `toml:"overload"`
}

// OverloadFile is [upstreams.NAME.overload]. Its defaults are the overload
// package's Default* constants, each reasoned there.
type OverloadFile struct {
	// Enabled = false turns it off and keeps the table. Default true: the
	// table's presence turns overload protection on.
	Enabled *bool `toml:"enabled"`
	// MinLimit and MaxLimit bound the adaptive limit of requests in
	// flight. Defaults 10 and 1000.
	MinLimit *int `toml:"min_limit"`
	MaxLimit *int `toml:"max_limit"`
	// InitialLimit is where the limit starts when the sidecar starts (a
	// reload keeps the learned limit). Default 20.
	InitialLimit *int `toml:"initial_limit"`
	// QueueTimeout is the longest a request waits for a slot at the limit
	// before it is shed. Default 50ms.
	QueueTimeout *Duration `toml:"queue_timeout"`
	// QueueSize is how many requests may wait; 0 sheds at once at the
	// limit. Default 1000.
	QueueSize *int `toml:"queue_size"`
	// Reserved is the share of the limit only the highest-priority tier
	// may use, in [0, 1). Default 0.1.
	Reserved *float64 `toml:"reserved"`
}

// HealthCheckFile is [upstreams.NAME.health_check].
type HealthCheckFile struct {
	Path               *string   `toml:"path"`                // default "/healthz"
	Interval           *Duration `toml:"interval"`            // default 5s
	Timeout            *Duration `toml:"timeout"`             // default 1s
	ExpectedStatus     *int      `toml:"expected_status"`     // default 200
	HealthyThreshold   *int      `toml:"healthy_threshold"`   // passes to become healthy; default 2
	UnhealthyThreshold *int      `toml:"unhealthy_threshold"` // failures to become unhealthy; default 3
}

// BreakerFile is [upstreams.NAME.breaker].
type BreakerFile struct {
	// Enabled turns the circuit breaker and bulkhead off with false.
	// Default true.
	Enabled *bool `toml:"enabled"`
	// ErrorPercent of failed requests opens the circuit, once
	// VolumeThreshold requests were seen in the rolling 10 s window.
	// Defaults 50 and 20.
	ErrorPercent    *int `toml:"error_percent"`
	VolumeThreshold *int `toml:"volume_threshold"`
	// SleepWindow: then one request is tried (half-open). Default 5s.
	SleepWindow *Duration `toml:"sleep_window"`
	// MaxConcurrent bounds requests in flight to the upstream (bulkhead).
	// Default 1000.
	MaxConcurrent *int `toml:"max_concurrent"`
	// FailureStatuses count as failures, besides connect errors and
	// timeouts. Default [502, 503, 504].
	FailureStatuses []int `toml:"failure_statuses"`
	// ConsecutiveFailures opens the circuit after this many failures in a
	// row, whatever the window's percentage. Default 0: off.
	ConsecutiveFailures *int `toml:"consecutive_failures"`
}

// FallbackFile is [upstreams.NAME.fallback]: a fixed response, or another
// upstream.
type FallbackFile struct {
	Status      *int    `toml:"status"`       // default 503
	ContentType *string `toml:"content_type"` // default "application/json"
	// Body is the response body. Default
	// '{"error":"service temporarily unavailable"}' when none of body,
	// body_file and upstream is set.
	Body *string `toml:"body"`
	// BodyFile reads the body from a file (relative to the config file).
	BodyFile *string `toml:"body_file"`
	// Upstream sends the request to another upstream instead (only while
	// no request body bytes went to the failing one).
	Upstream *string `toml:"upstream"`
}

// RouteFile is one [[routes]] entry. Routes are tried in file order; the
// first whose every given condition matches wins.
type RouteFile struct {
	// Name labels the route in metrics and logs. Default "route<index>".
	Name *string `toml:"name"`
	// Host matches the request host (port ignored, case-insensitive);
	// "*.example.com" matches any subdomain. Default: any host.
	Host *string `toml:"host"`
	// PathPrefix matches the start of the request path. Default "/".
	PathPrefix *string `toml:"path_prefix"`
	// Methods restricts the route to these methods. Default: all methods.
	Methods []string `toml:"methods"`
	// Upstream names the [upstreams.NAME] that serves this route. Required.
	Upstream *string `toml:"upstream"`
	// RateLimitExempt skips rate limiting (health checks). Default false.
	RateLimitExempt *bool `toml:"rate_limit_exempt"`
	// RateLimitMode "shadow" only reports what the limits would deny on
	// this route. Default: the tier's mode.
	RateLimitMode *string `toml:"rate_limit_mode"`
	// Limits overrides tiers' limits on this route (same window), e.g.
	// { anonymous = 10 }; it implies a separate count for this route.
	// Default: the tiers' own limits.
	Limits map[string]int `toml:"limits"`
	// LimitPerRoute counts this route's requests apart from the client's
	// others. Default false: one count per client and tier.
	LimitPerRoute *bool `toml:"limit_per_route"`
	// OwnCircuit gives the route a circuit of its own (with its upstream's
	// breaker settings), so that one failing route does not cut off the
	// upstream's others. Default false.
	OwnCircuit *bool `toml:"own_circuit"`
}
