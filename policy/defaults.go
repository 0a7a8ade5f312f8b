package policy

import (
	"crypto/tls"
	"time"

	"github.com/sidecar-proxy/sidecar/overload"
)

// The exported defaults, kept for the packages that use them (the proxy
// generates request ids in DefaultRequestIDHeader before any config is
// loaded). Each is also in defaults below, which is what validation reads.
const (
	DefaultListen          = "127.0.0.1:8080"
	DefaultAdminListen     = "127.0.0.1:9090"
	DefaultHeaderTimeout   = 10 * time.Second
	DefaultIdleTimeout     = 60 * time.Second
	DefaultMaxHeaderBytes  = 16 << 10
	DefaultMaxBodyBytes    = 100 << 20
	DefaultDrainTimeout    = 30 * time.Second
	DefaultMaxConnections  = 10000
	DefaultRequestIDHeader = "X-Request-Id"

	DefaultConnectTimeout   = time.Second
	DefaultResponseTimeout  = 15 * time.Second
	DefaultUpstreamMaxConns = 1024
	DefaultUpstreamMaxIdle  = 128
	DefaultConnWaitTimeout  = 100 * time.Millisecond
	DefaultIdleConnTimeout  = 30 * time.Second

	// DefaultPriority is a tier's priority under overload protection
	// when it sets none, and that of a request without a tier table:
	// the lowest.
	DefaultPriority = 0
)

// DefaultTrustedOnlyHeaders is server.trusted_only_headers' default: the
// fields that proxies, CDNs and URL-rewriting front ends set and that
// frameworks believe (Rails, Django, Werkzeug's ProxyFix, Spring, IIS):
// the client's address, the scheme, port and prefix it used, the URL it
// asked for.
var DefaultTrustedOnlyHeaders = []string{
	"Forwarded", "X-Real-IP", "True-Client-IP", "CF-Connecting-IP", "Fastly-Client-IP",
	"X-Client-IP", "X-Cluster-Client-IP", "X-Original-Forwarded-For",
	"X-Forwarded-Port", "X-Forwarded-Prefix", "X-Forwarded-Server", "X-Forwarded-Scheme",
	"X-Forwarded-Ssl", "X-Scheme", "X-Url-Scheme", "Front-End-Https",
	"X-Original-URL", "X-Rewrite-URL", "X-Original-Host",
}

// defaults is the one home of every default: what each key a config
// leaves out compiles to, in the Snapshot's own types. Validation
// (validate.go, and jwt in identity.go) reads it for every absent key and
// has no default of its own; a field not set here is zero because the
// key is off, empty or required. The File field docs in config.go and
// sidecar.toml state these values, and defaults_test.go checks that Parse
// of a minimal config yields exactly them and that both agree.
//
// Slices in it are copied into each Snapshot, never shared.
var defaults = struct {
	Server Server
	// ServerTLS is [server.tls] with only its required keys.
	ServerTLS ServerTLS
	// Upstream is [upstreams.NAME] with only url set. Its Breaker is on;
	// HealthCheck and Fallback are off (nil) until their tables appear.
	// MaxIdleConnections is further capped at MaxConnections.
	Upstream Upstream
	// HealthCheck is an [upstreams.NAME.health_check] table that sets
	// nothing.
	HealthCheck HealthCheck
	// Overload is an [upstreams.NAME.overload] table that sets nothing:
	// the overload package's recommended settings (TopPriority comes
	// from the tiers).
	Overload overload.Settings
	// Fallback is an [upstreams.NAME.fallback] table that sets nothing;
	// Body is used only when none of body, body_file and upstream is set.
	Fallback Fallback
	// Route is a [[routes]] entry with only upstream set; its Name is
	// RouteName formatted with the route's index.
	Route     Route
	RouteName string
	// Tier is a [tiers.NAME] table's values besides limit and window:
	// Burst 0 means the limit, and Shadow false leaves the route's mode
	// in charge; a tier without an algorithm gets rate_limit.algorithm.
	Tier     Tier
	Identity Identity
	// JWT is [identity.jwt] with only algorithm and its key set.
	JWT       jwtDefaults
	RateLimit RateLimit
	Redis     Redis
	AccessLog AccessLog
}{
	Server: Server{
		Listen:             DefaultListen,
		AdminListen:        DefaultAdminListen,
		HeaderTimeout:      DefaultHeaderTimeout,
		IdleTimeout:        DefaultIdleTimeout,
		MaxHeaderBytes:     DefaultMaxHeaderBytes,
		MaxBodyBytes:       DefaultMaxBodyBytes,
		DrainDelay:         0,
		DrainTimeout:       DefaultDrainTimeout,
		MaxConnections:     DefaultMaxConnections,
		TrustedOnlyHeaders: DefaultTrustedOnlyHeaders,
		AllowedUpgrades:    []string{"websocket"},
		RequestIDHeader:    DefaultRequestIDHeader,
		// MaxConnectionsPerIP 0 (no cap), TrustedProxies none (nobody
		// is trusted), AdminPprof, ReusePort and H2C false, TLS off.
	},
	ServerTLS: ServerTLS{ClientAuth: tls.NoClientCert}, // client_auth = "none"; no redirect_listen
	Upstream: Upstream{
		ConnectTimeout:     DefaultConnectTimeout,
		ResponseTimeout:    DefaultResponseTimeout,
		MaxConnections:     DefaultUpstreamMaxConns,
		MaxIdleConnections: DefaultUpstreamMaxIdle,
		ConnWaitTimeout:    DefaultConnWaitTimeout,
		IdleConnTimeout:    DefaultIdleConnTimeout,
		LeastConnections:   false, // balance = "round_robin"
		Retries:            0,
		RetryBudget:        0.2,
		PassiveFailures:    5,
		PassiveEjection:    10 * time.Second,
		Breaker: &Breaker{
			ErrorPercent:        50,
			VolumeThreshold:     20,
			SleepWindow:         5 * time.Second,
			MaxConcurrent:       1000,
			FailureStatuses:     []int{502, 503, 504},
			ConsecutiveFailures: 0,
		},
		// RewriteHost and RequiredForReady false, Protocol HTTP1.
	},
	HealthCheck: HealthCheck{
		Path:               "/healthz",
		Interval:           5 * time.Second,
		Timeout:            time.Second,
		ExpectedStatus:     200,
		HealthyThreshold:   2,
		UnhealthyThreshold: 3,
	},
	Overload: overload.DefaultSettings(),
	Fallback: Fallback{
		Status:      503,
		ContentType: "application/json",
		Body:        []byte(`{"error":"service temporarily unavailable"}`),
	},
	Route:     Route{PathPrefix: "/"}, // any host, any method, limited, the tier's mode
	RouteName: "route%d",
	Tier:      Tier{Priority: DefaultPriority},
	Identity: Identity{
		APIKeyHeader:      "X-API-Key",
		AnonymousTier:     "anonymous",
		AuthenticatedTier: "authenticated",
		ClientCertTier:    "", // client certificates are no identity
		IPv6Prefix:        64,
		ClientHeader:      "X-Sidecar-Client",
		TierHeader:        "X-Sidecar-Tier",
		// JWT off, no API keys.
	},
	JWT: jwtDefaults{
		TierClaim:         "tier",
		ClientClaim:       "sub",
		Leeway:            0,
		RequireExp:        true,
		RejectUnknownTier: false, // unknown_tier = "authenticated"
	},
	RateLimit: RateLimit{
		Store:            StoreMemory,
		Algorithm:        SlidingWindow,
		OnStoreError:     FailLocal,
		StoreTimeout:     50 * time.Millisecond,
		FailureThreshold: 3,
		Cooldown:         5 * time.Second,
		MaxKeys:          200_000,
		LegacyHeaders:    true,
		Lease:            false,
		LeaseOvershoot:   0.01,
		LeaseDuration:    time.Second,
	},
	Redis: Redis{
		Mode:      RedisSingle,
		DB:        0,
		TLS:       false,
		KeyPrefix: "sidecar",
		// No addresses (required with rate_limit.store = "redis"), no
		// credentials, the system's CAs, each address's host as the name.
	},
	AccessLog: AccessLog{
		Enabled: false,
		Sample:  1,
		// Secret nil: the proxy's random per-process key.
	},
}

// jwtDefaults are [identity.jwt]'s defaults. Leeway and RequireExp become
// options of the token parser rather than fields of JWT.
type jwtDefaults struct {
	TierClaim, ClientClaim string
	Leeway                 time.Duration
	RequireExp             bool
	RejectUnknownTier      bool
}

// or returns *p, or def when the key is absent (p is nil).
func or[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}
