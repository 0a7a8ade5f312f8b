// Package policy owns sidecar.toml: its schema, strict decoding, validation,
// and compilation into an immutable Snapshot that the proxy reads on every
// request. Nothing in this package touches the network.
//
// The flow is Load (or Parse) → Snapshot. A Snapshot is never modified after
// it is built; a reload builds a new one and the proxy swaps it atomically.
package policy

import (
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
		return fmt.Errorf("invalid duration %q (use Go syntax such as \"500ms\", \"10s\", \"1m\")", b)
	}
	d.Duration = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// File is the raw shape of sidecar.toml. Pointer fields distinguish "absent"
// (take the default) from an explicit zero. Field docs state each default;
// sidecar.toml in the repository root is the commented reference.
type File struct {
	Server    ServerFile              `toml:"server"`
	Upstreams map[string]UpstreamFile `toml:"upstreams"`
	Routes    []RouteFile             `toml:"routes"`
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
	// RequestIDHeader names the request-id header. Default "X-Request-Id".
	RequestIDHeader *string `toml:"request_id_header"`
	// AdminPprof serves Go's profiler under /debug/pprof/ on the admin
	// listener. Default false: profiles reveal internals.
	AdminPprof *bool `toml:"admin_pprof"`
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
	// MaxIdleConnections caps pooled idle connections per endpoint. Default 128.
	MaxIdleConnections *int `toml:"max_idle_connections"`
	// ConnWaitTimeout bounds the wait for a free connection slot. Default 100ms.
	ConnWaitTimeout *Duration `toml:"conn_wait_timeout"`
	// IdleConnTimeout closes pooled connections unused this long. Default 30s.
	IdleConnTimeout *Duration `toml:"idle_conn_timeout"`
	// RewriteHost sends the endpoint's host:port as Host instead of the
	// client's Host. Default false (Host is preserved).
	RewriteHost *bool `toml:"rewrite_host"`
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
}
