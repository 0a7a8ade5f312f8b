package policy

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2/unstable"

	"github.com/sidecar-proxy/sidecar/overload"
)

// The bounds of server.max_header_bytes. Defaults are in defaults.go.
const minHeaderBytes, maxHeader = 1 << 10, 1 << 20

// nameRE bounds names that become metric label values.
var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// tokenRE is RFC 9110's token, for methods and header names.
var tokenRE = regexp.MustCompile("^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

type validator struct {
	file     string
	pos      map[string]unstable.Position
	problems []Problem
	files    []string // files read besides the config (certificates)
}

func (v *validator) addf(key, format string, args ...any) {
	p := Problem{File: v.file, Key: key, Msg: fmt.Sprintf(format, args...)}
	// Point at the key itself, or at the closest enclosing table.
	for k := key; k != ""; {
		if at, ok := v.pos[k]; ok {
			p.Line, p.Col = at.Line, at.Column
			break
		}
		i := strings.LastIndexAny(k, ".[")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	v.problems = append(v.problems, p)
}

func (v *validator) duration(key string, d *Duration, def time.Duration, allowZero bool) time.Duration {
	if d == nil {
		return def
	}
	if d.Duration < 0 && allowZero {
		v.addf(key, "must not be negative (0 is allowed), got %q", d.String())
		return def
	}
	if d.Duration < 0 || (!allowZero && d.Duration == 0) {
		v.addf(key, "must be greater than zero, got %q", d.String())
		return def
	}
	return d.Duration
}

func (v *validator) intRange(key string, p *int, def, lo, hi int) int {
	if p == nil {
		return def
	}
	if *p < lo || *p > hi {
		v.addf(key, "must be between %d and %d, got %d", lo, hi, *p)
		return def
	}
	return *p
}

func (v *validator) addr(key string, p *string, def string) string {
	if p == nil {
		return def
	}
	host, port, err := net.SplitHostPort(*p)
	if err != nil {
		v.addf(key, "want host:port, got %q", *p)
		return def
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		v.addf(key, "invalid port in %q", *p)
	}
	if host != "" && net.ParseIP(host) == nil && !validHostname(host) {
		v.addf(key, "invalid host in %q", *p)
	}
	return *p
}

func (v *validator) compile(f *File) *Snapshot {
	s := &Snapshot{Upstreams: make(map[string]*Upstream)}
	v.server(&f.Server, &s.Server)
	if len(f.Upstreams) == 0 {
		v.addf("upstreams", "at least one [upstreams.NAME] table is required")
	}
	for name, uf := range f.Upstreams {
		if u := v.upstream(name, &uf); u != nil {
			s.Upstreams[name] = u
			s.UpstreamNames = append(s.UpstreamNames, name)
		}
	}
	sort.Strings(s.UpstreamNames)
	for name, uf := range f.Upstreams {
		if uf.Fallback != nil && s.Upstreams[name] != nil {
			s.Upstreams[name].Fallback = v.fallback(name, uf.Fallback, f.Upstreams, s)
		}
	}
	for name, u := range s.Upstreams {
		if err := u.fingerprint(); err != nil { // complete now, fallback included
			v.addf("upstreams."+name, "settings cannot be fingerprinted: %v", err)
		}
	}
	s.Tiers = v.tiers(f)
	top := defaults.Tier.Priority
	for _, t := range s.Tiers {
		top = max(top, t.Priority)
	}
	for _, u := range s.Upstreams {
		if u.Overload != nil {
			u.Overload.TopPriority = top
		}
	}
	v.accessLog(&f.AccessLog, &s.AccessLog)
	v.rateLimit(&f.RateLimit, &s.RateLimit)
	v.redis(&f.Redis, &s.Redis, s.RateLimit.Store == StoreRedis)
	for name, t := range s.Tiers {
		if tf := f.Tiers[name]; tf.Algorithm == nil {
			t.Algorithm = s.RateLimit.Algorithm
		}
	}
	s.Files = append(s.Files, v.files...) // certificates and CA bundles
	v.identity(&f.Identity, &s.Identity, s.Tiers, s)
	v.headerRoles(s)
	if len(f.Routes) == 0 {
		v.addf("routes", "at least one [[routes]] entry is required")
	}
	seen := map[string]int{}
	for i := range f.Routes {
		r := v.route(i, &f.Routes[i], f.Upstreams)
		if prev, dup := seen[r.Name]; dup {
			v.addf(fmt.Sprintf("routes[%d].name", i), "duplicate route name %q (also routes[%d])", r.Name, prev)
		}
		seen[r.Name] = i
		v.routeLimits(i, &f.Routes[i], &r, s.Tiers)
		s.Routes = append(s.Routes, r)
	}
	return s
}

func (v *validator) server(f *ServerFile, s *Server) {
	def := &defaults.Server
	s.Listen = v.addr("server.listen", f.Listen, def.Listen)
	s.AdminListen = v.addr("server.admin_listen", f.AdminListen, def.AdminListen)
	if s.Listen == s.AdminListen {
		v.addf("server.admin_listen", "must differ from server.listen (%q): the admin port is never the proxy port", s.Listen)
	}
	s.HeaderTimeout = v.duration("server.header_timeout", f.HeaderTimeout, def.HeaderTimeout, false)
	s.IdleTimeout = v.duration("server.idle_timeout", f.IdleTimeout, def.IdleTimeout, false)
	s.DrainDelay = v.duration("server.drain_delay", f.DrainDelay, def.DrainDelay, true)
	s.DrainTimeout = v.duration("server.drain_timeout", f.DrainTimeout, def.DrainTimeout, true)
	s.MaxHeaderBytes = v.intRange("server.max_header_bytes", f.MaxHeaderBytes, def.MaxHeaderBytes, minHeaderBytes, maxHeader)
	s.MaxBodyBytes = def.MaxBodyBytes
	if f.MaxBodyBytes != nil {
		if *f.MaxBodyBytes < 0 {
			v.addf("server.max_body_bytes", "must be 0 (unlimited) or positive, got %d", *f.MaxBodyBytes)
		} else {
			s.MaxBodyBytes = *f.MaxBodyBytes
		}
	}
	s.MaxConnections = v.intRange("server.max_connections", f.MaxConnections, def.MaxConnections, 1, 1<<24)
	s.MaxConnectionsPerIP = v.intRange("server.max_connections_per_ip", f.MaxConnectionsPerIP, def.MaxConnectionsPerIP, 0, 1<<24)
	for i, c := range f.TrustedProxies {
		p, err := parsePrefix(c)
		if err != nil {
			v.addf(fmt.Sprintf("server.trusted_proxies[%d]", i), "want a CIDR or IP address, got %q", c)
			continue
		}
		s.TrustedProxies = append(s.TrustedProxies, p)
	}
	s.TrustedOnlyHeaders = slices.Clone(def.TrustedOnlyHeaders)
	if f.TrustedOnlyHeaders != nil {
		s.TrustedOnlyHeaders = v.headerNames("server.trusted_only_headers", f.TrustedOnlyHeaders)
	}
	s.AllowedUpgrades = slices.Clone(def.AllowedUpgrades)
	if f.AllowedUpgrades != nil {
		s.AllowedUpgrades = nil
		for i, u := range f.AllowedUpgrades {
			if !tokenRE.MatchString(u) {
				v.addf(fmt.Sprintf("server.allowed_upgrades[%d]", i), "want a protocol name such as \"websocket\", got %q", u)
			}
			s.AllowedUpgrades = append(s.AllowedUpgrades, strings.ToLower(u))
		}
	}
	s.AdminPprof = or(f.AdminPprof, def.AdminPprof)
	s.ReusePort = or(f.ReusePort, def.ReusePort)
	s.H2C = or(f.H2C, def.H2C)
	if f.TLS != nil && s.H2C {
		v.addf("server.h2c", "h2c is HTTP/2 on the plaintext listener; with [server.tls] HTTP/2 is offered by ALPN: remove h2c")
	}
	if f.TLS != nil {
		s.TLS = v.serverTLS(f.TLS)
	}
	s.RequestIDHeader = def.RequestIDHeader
	if f.RequestIDHeader != nil {
		if !tokenRE.MatchString(*f.RequestIDHeader) {
			v.addf("server.request_id_header", "not a valid header name: %q", *f.RequestIDHeader)
		} else {
			s.RequestIDHeader = *f.RequestIDHeader
		}
	}
}

// headerNames validates a list of field names.
func (v *validator) headerNames(key string, names []string) []string {
	out := make([]string, 0, len(names))
	for i, n := range names {
		if !tokenRE.MatchString(n) {
			v.addf(fmt.Sprintf("%s[%d]", key, i), "not a valid header name: %q", n)
			continue
		}
		out = append(out, n)
	}
	return out
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return p, err
		}
		if p.Addr().Is4In6() {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func (v *validator) upstream(name string, f *UpstreamFile) *Upstream {
	key := "upstreams." + name
	if !nameRE.MatchString(name) {
		v.addf(key, "upstream names may use letters, digits, '_', '.', '-' (at most 64), got %q", name)
	}
	u := &Upstream{Name: name}
	var urls []string
	var urlKey string
	switch {
	case f.URL != nil && len(f.URLs) > 0:
		v.addf(key+".urls", "set either url or urls, not both")
	case f.URL != nil:
		urls, urlKey = []string{*f.URL}, key+".url"
	case len(f.URLs) > 0:
		urls, urlKey = f.URLs, key+".urls"
	default:
		v.addf(key, "url (or urls) is required")
	}
	for i, raw := range urls {
		k := urlKey
		if len(urls) > 1 || f.URL == nil {
			k = fmt.Sprintf("%s[%d]", urlKey, i)
		}
		if ep, msg := parseEndpoint(raw); msg != "" {
			v.addf(k, "%s", msg)
		} else {
			u.Endpoints = append(u.Endpoints, ep)
		}
	}
	def := &defaults.Upstream
	u.ConnectTimeout = v.duration(key+".connect_timeout", f.ConnectTimeout, def.ConnectTimeout, false)
	u.ResponseTimeout = v.duration(key+".response_timeout", f.ResponseTimeout, def.ResponseTimeout, false)
	u.ConnWaitTimeout = v.duration(key+".conn_wait_timeout", f.ConnWaitTimeout, def.ConnWaitTimeout, true)
	u.IdleConnTimeout = v.duration(key+".idle_conn_timeout", f.IdleConnTimeout, def.IdleConnTimeout, false)
	u.MaxConnections = v.intRange(key+".max_connections", f.MaxConnections, def.MaxConnections, 1, 1<<20)
	u.MaxIdleConnections = v.intRange(key+".max_idle_connections", f.MaxIdleConnections, min(def.MaxIdleConnections, u.MaxConnections), 0, u.MaxConnections)
	u.RewriteHost = or(f.RewriteHost, def.RewriteHost)
	u.Protocol = def.Protocol
	if f.Protocol != nil {
		u.Protocol = enum[Protocol](v, key+".protocol", *f.Protocol, protocolNames)
	}
	for i, ep := range u.Endpoints {
		switch {
		case u.Protocol == H2C && ep.TLS:
			v.addf(key+".protocol", "h2c is HTTP/2 over plain TCP: endpoint %d (%s) is https; use protocol = \"h2\"", i, ep.URL)
		case u.Protocol == H2 && !ep.TLS:
			v.addf(key+".protocol", "h2 is HTTP/2 over TLS: endpoint %d (%s) is http; use protocol = \"h2c\"", i, ep.URL)
		}
	}
	bf := f.Breaker
	if bf == nil {
		bf = &BreakerFile{}
	}
	if or(bf.Enabled, def.Breaker != nil) {
		u.Breaker = v.breaker(key+".breaker", bf)
	}
	u.LeastConnections = def.LeastConnections
	if f.Balance != nil {
		u.LeastConnections = v.oneOf(key+".balance", *f.Balance, "round_robin", "least_connections") == "least_connections"
	}
	u.Retries = v.intRange(key+".retries", f.Retries, def.Retries, 0, 10)
	u.RetryBudget = def.RetryBudget
	if f.RetryBudget != nil {
		if *f.RetryBudget < 0 || *f.RetryBudget > 1 {
			v.addf(key+".retry_budget", "must be between 0 and 1, got %v", *f.RetryBudget)
		} else {
			u.RetryBudget = *f.RetryBudget
		}
	}
	u.PassiveFailures = v.intRange(key+".passive_failures", f.PassiveFailures, def.PassiveFailures, 0, 1000)
	u.PassiveEjection = v.duration(key+".passive_ejection", f.PassiveEjection, def.PassiveEjection, false)
	if hc := f.HealthCheck; hc != nil {
		hd := &defaults.HealthCheck
		h := &HealthCheck{Path: hd.Path}
		if hc.Path != nil {
			if !strings.HasPrefix(*hc.Path, "/") {
				v.addf(key+".health_check.path", "must start with '/', got %q", *hc.Path)
			}
			h.Path = *hc.Path
		}
		h.Interval = v.duration(key+".health_check.interval", hc.Interval, hd.Interval, false)
		h.Timeout = v.duration(key+".health_check.timeout", hc.Timeout, hd.Timeout, false)
		h.ExpectedStatus = v.intRange(key+".health_check.expected_status", hc.ExpectedStatus, hd.ExpectedStatus, 100, 599)
		h.HealthyThreshold = v.intRange(key+".health_check.healthy_threshold", hc.HealthyThreshold, hd.HealthyThreshold, 1, 100)
		h.UnhealthyThreshold = v.intRange(key+".health_check.unhealthy_threshold", hc.UnhealthyThreshold, hd.UnhealthyThreshold, 1, 100)
		u.HealthCheck = h
	}
	u.RequiredForReady = or(f.RequiredForReadiness, def.RequiredForReady)
	u.TLSConfig = v.upstreamTLS(key, f, u)
	if f.Overload != nil {
		// Validated even when off, so that turning it on later cannot
		// find a broken table.
		if o := v.overload(key+".overload", f.Overload); or(f.Overload.Enabled, true) {
			u.Overload = o
		}
	}
	return u
}

// overload validates [upstreams.NAME.overload]; compile sets TopPriority
// once the tiers are known.
func (v *validator) overload(key string, f *OverloadFile) *overload.Settings {
	def := &defaults.Overload
	problems := len(v.problems)
	o := &overload.Settings{
		MinLimit:  v.intRange(key+".min_limit", f.MinLimit, def.MinLimit, 1, 1_000_000),
		MaxLimit:  v.intRange(key+".max_limit", f.MaxLimit, def.MaxLimit, 1, 1_000_000),
		QueueSize: v.intRange(key+".queue_size", f.QueueSize, def.QueueSize, 0, 1_000_000),
		Reserved:  def.Reserved,
	}
	// A wait longer than a minute is no longer a queue in front of a
	// response timeout; without a queue there is no wait at all.
	o.QueueTimeout = v.duration(key+".queue_timeout", f.QueueTimeout, def.QueueTimeout, o.QueueSize == 0)
	if o.QueueTimeout > time.Minute {
		v.addf(key+".queue_timeout", "must be at most 1m, got %v", o.QueueTimeout)
	}
	// An initial limit left out follows the bounds given, so that
	// max_limit = 50 alone does not need initial_limit too.
	o.InitialLimit = v.intRange(key+".initial_limit", f.InitialLimit, min(max(def.InitialLimit, o.MinLimit), o.MaxLimit), 1, 1_000_000)
	if o.MaxLimit < o.MinLimit {
		v.addf(key+".max_limit", "must not be below min_limit %d, got %d", o.MinLimit, o.MaxLimit)
	} else if o.InitialLimit < o.MinLimit || o.InitialLimit > o.MaxLimit {
		v.addf(key+".initial_limit", "must be within min_limit %d and max_limit %d, got %d", o.MinLimit, o.MaxLimit, o.InitialLimit)
	}
	if f.Reserved != nil {
		if r := *f.Reserved; r >= 0 && r < 1 {
			o.Reserved = r
		} else {
			v.addf(key+".reserved", "must be at least 0 and below 1, got %v", r)
		}
	}
	if len(v.problems) == problems {
		// What is left is how the keys combine: a reserved share that
		// leaves the lower priorities nothing at min_limit.
		if err := o.Validate(); err != nil {
			v.addf(key+".reserved", "%v of min_limit %d leaves the lower priorities no slot; lower reserved or raise min_limit", o.Reserved, o.MinLimit)
		}
	}
	return o
}

// upstreamTLS builds the client TLS config of an upstream with https
// endpoints: TLS 1.2+, the CA bundle when given, SNI from the URL.
func (v *validator) upstreamTLS(key string, f *UpstreamFile, u *Upstream) *tls.Config {
	https := false
	for _, ep := range u.Endpoints {
		https = https || ep.TLS
	}
	if !https {
		if f.CAFile != nil || f.ServerName != nil {
			v.addf(key, "ca_file and server_name apply to https endpoints only")
		}
		return nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.ServerName != nil {
		c.ServerName = *f.ServerName
	}
	u.TLSSource = "server_name=" + c.ServerName
	u.ServerName = c.ServerName
	if f.CAFile != nil {
		pool, pem, path := v.loadCA(key+".ca_file", *f.CAFile)
		if pool == nil {
			return c
		}
		c.RootCAs = pool
		u.TLSSource += fmt.Sprintf(" ca_file=%s sha256=%x", path, sha256.Sum256(pem))
		u.CAPEM = string(pem)
	}
	return c
}

// loadCA reads the CA bundle file (relative to the config file) that key
// names, and adds it to the files read besides the config. It returns the
// bundle's certificates, its contents and its path; pool is nil when it
// cannot be read or holds no certificate, an error reported at key.
func (v *validator) loadCA(key, file string) (pool *x509.CertPool, pem []byte, path string) {
	path = relPath(v.file, file)
	v.files = append(v.files, path)
	pem, err := os.ReadFile(path)
	if err != nil {
		v.addf(key, "%v", err)
		return nil, nil, path
	}
	pool = x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		v.addf(key, "no PEM certificate in %s", path)
		return nil, nil, path
	}
	return pool, pem, path
}

func (v *validator) serverTLS(f *TLSFile) *ServerTLS {
	const key = "server.tls"
	if f.CertFile == nil || f.KeyFile == nil {
		v.addf(key, "cert_file and key_file are required")
		return nil
	}
	certPath, keyPath := relPath(v.file, *f.CertFile), relPath(v.file, *f.KeyFile)
	v.files = append(v.files, certPath, keyPath)
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		v.addf(key+".cert_file", "%v", err)
		return nil
	}
	t := &ServerTLS{Cert: &cert, ClientAuth: defaults.ServerTLS.ClientAuth}
	if f.ClientCAFile != nil {
		t.ClientCAs, _, _ = v.loadCA(key+".client_ca_file", *f.ClientCAFile)
	}
	if f.ClientAuth != nil {
		switch v.oneOf(key+".client_auth", *f.ClientAuth, "none", "request", "require") {
		case "none":
			t.ClientAuth = tls.NoClientCert
		case "request":
			t.ClientAuth = tls.VerifyClientCertIfGiven
		case "require":
			t.ClientAuth = tls.RequireAndVerifyClientCert
		}
	}
	if t.ClientAuth != tls.NoClientCert && t.ClientCAs == nil {
		v.addf(key+".client_auth", "verifying client certificates needs client_ca_file")
	}
	if f.RedirectListen != nil {
		t.RedirectListen = v.addr(key+".redirect_listen", f.RedirectListen, "")
	}
	return t
}

func (v *validator) breaker(key string, f *BreakerFile) *Breaker {
	def := defaults.Upstream.Breaker
	b := &Breaker{
		ErrorPercent:        v.intRange(key+".error_percent", f.ErrorPercent, def.ErrorPercent, 1, 100),
		VolumeThreshold:     v.intRange(key+".volume_threshold", f.VolumeThreshold, def.VolumeThreshold, 1, 1_000_000),
		SleepWindow:         v.duration(key+".sleep_window", f.SleepWindow, def.SleepWindow, false),
		MaxConcurrent:       v.intRange(key+".max_concurrent", f.MaxConcurrent, def.MaxConcurrent, 1, 1_000_000),
		FailureStatuses:     slices.Clone(def.FailureStatuses),
		ConsecutiveFailures: v.intRange(key+".consecutive_failures", f.ConsecutiveFailures, def.ConsecutiveFailures, 0, 1_000_000),
	}
	if f.FailureStatuses != nil {
		b.FailureStatuses = nil
		for i, st := range f.FailureStatuses {
			if st < 100 || st > 599 {
				v.addf(fmt.Sprintf("%s.failure_statuses[%d]", key, i), "not an HTTP status: %d", st)
			}
			b.FailureStatuses = append(b.FailureStatuses, st)
		}
	}
	return b
}

// fallback validates [upstreams.NAME.fallback] once all upstreams are known.
func (v *validator) fallback(name string, f *FallbackFile, ups map[string]UpstreamFile, s *Snapshot) *Fallback {
	key := "upstreams." + name + ".fallback"
	def := &defaults.Fallback
	fb := &Fallback{Status: v.intRange(key+".status", f.Status, def.Status, 100, 599), ContentType: or(f.ContentType, def.ContentType)}
	n := 0
	if f.Body != nil {
		n++
		fb.Body = []byte(*f.Body)
	}
	if f.BodyFile != nil {
		n++
		path := relPath(v.file, *f.BodyFile)
		s.Files = append(s.Files, path)
		body, err := os.ReadFile(path)
		if err != nil {
			v.addf(key+".body_file", "%v", err)
		}
		fb.Body = body
	}
	if f.Upstream != nil {
		n++
		fb.Upstream = *f.Upstream
		if _, ok := ups[fb.Upstream]; !ok || fb.Upstream == name {
			v.addf(key+".upstream", "must name another upstream, got %q", fb.Upstream)
		}
	}
	if n > 1 {
		v.addf(key, "set one of body, body_file and upstream")
	}
	if n == 0 {
		fb.Body = slices.Clone(def.Body)
	}
	return fb
}

// userinfoRE finds the user:password@ part of a URL, for masking.
var userinfoRE = regexp.MustCompile(`^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@`)

// redactURL masks a URL's userinfo (even in a URL that does not parse), so
// that no error message or log line repeats a password.
func redactURL(raw string) string {
	return userinfoRE.ReplaceAllString(raw, "${1}xxxxx@")
}

func parseEndpoint(raw string) (Endpoint, string) {
	pu, err := url.Parse(raw)
	if err != nil || pu.Host == "" {
		return Endpoint{}, fmt.Sprintf("want a URL such as \"http://127.0.0.1:3000\", got %q", redactURL(raw))
	}
	raw = redactURL(raw)
	if pu.User != nil {
		return Endpoint{}, fmt.Sprintf("%q: credentials in the URL are not supported (they would be sent to nobody and shown in logs); remove the user:password@ part", raw)
	}
	switch pu.Scheme {
	case "http", "https":
	default:
		return Endpoint{}, fmt.Sprintf("%q: scheme must be http or https", raw)
	}
	if (pu.Path != "" && pu.Path != "/") || pu.RawQuery != "" || pu.Fragment != "" {
		return Endpoint{}, fmt.Sprintf("%q: only scheme://host:port is allowed; the client's path and query are forwarded unchanged", raw)
	}
	host, port := pu.Hostname(), pu.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[pu.Scheme]
	}
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return Endpoint{}, fmt.Sprintf("%q: invalid port", raw)
	}
	return Endpoint{URL: raw, Addr: net.JoinHostPort(host, port), TLS: pu.Scheme == "https"}, ""
}

func (v *validator) route(i int, f *RouteFile, ups map[string]UpstreamFile) Route {
	key := fmt.Sprintf("routes[%d]", i)
	r := defaults.Route
	r.Index, r.Name = i, fmt.Sprintf(defaults.RouteName, i)
	if f.Name != nil {
		if !nameRE.MatchString(*f.Name) {
			v.addf(key+".name", "route names may use letters, digits, '_', '.', '-' (at most 64), got %q", *f.Name)
		} else {
			r.Name = *f.Name
		}
	}
	if f.Host != nil {
		h := strings.ToLower(*f.Host)
		if strings.HasPrefix(h, "*.") {
			r.Wildcard, h = true, h[1:]
		}
		if h == "" || (!validHostname(strings.TrimPrefix(h, ".")) && (r.Wildcard || net.ParseIP(h) == nil)) {
			v.addf(key+".host", "invalid host %q", *f.Host)
		}
		r.Host = h
	}
	if f.PathPrefix != nil {
		if !strings.HasPrefix(*f.PathPrefix, "/") {
			v.addf(key+".path_prefix", "must start with '/', got %q", *f.PathPrefix)
		}
		r.PathPrefix = *f.PathPrefix
	}
	for j, m := range f.Methods {
		if !tokenRE.MatchString(m) || strings.ToUpper(m) != m {
			v.addf(fmt.Sprintf("%s.methods[%d]", key, j), "want an upper-case method name such as \"GET\", got %q", m)
		}
		r.Methods = append(r.Methods, m)
	}
	if f.Upstream == nil {
		v.addf(key, "upstream is required")
	} else {
		r.Upstream = *f.Upstream
		if _, ok := ups[r.Upstream]; !ok {
			v.addf(key+".upstream", "unknown upstream %q (define it as [upstreams.%s])", r.Upstream, r.Upstream)
		}
	}
	return r
}

var hostnameRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$`)

func validHostname(h string) bool { return len(h) <= 253 && hostnameRE.MatchString(h) }

func (v *validator) tiers(f *File) map[string]*Tier {
	tiers := make(map[string]*Tier, len(f.Tiers))
	for name, tf := range f.Tiers {
		key := "tiers." + name
		if !nameRE.MatchString(name) {
			v.addf(key, "tier names may use letters, digits, '_', '.', '-' (at most 64), got %q", name)
		}
		t := new(Tier)
		*t = defaults.Tier
		t.Name = name
		t.Unlimited = or(tf.Unlimited, t.Unlimited)
		t.Priority = v.intRange(key+".priority", tf.Priority, t.Priority, 0, 100)
		if t.Unlimited {
			if tf.Limit != nil || tf.Window != nil || tf.Burst != nil || tf.Algorithm != nil || tf.Mode != nil {
				v.addf(key+".unlimited", "an unlimited tier takes no limit, window, burst, algorithm or mode")
			}
			tiers[name] = t
			continue
		}
		if tf.Limit == nil || *tf.Limit <= 0 {
			v.addf(key+".limit", "a positive limit is required")
		} else {
			t.Limit = *tf.Limit
		}
		if tf.Window == nil || tf.Window.Duration < time.Millisecond {
			v.addf(key+".window", "a window of at least 1ms is required, such as \"1m\"")
		} else {
			t.Window = tf.Window.Duration
		}
		if tf.Burst != nil {
			if *tf.Burst <= 0 {
				v.addf(key+".burst", "must be positive")
			}
			t.Burst = *tf.Burst
		}
		if tf.Algorithm != nil {
			t.Algorithm = enum[Algorithm](v, key+".algorithm", *tf.Algorithm, algorithmNames)
		}
		if tf.Mode != nil {
			t.Shadow = v.oneOf(key+".mode", *tf.Mode, "enforce", "shadow") == "shadow"
		}
		tiers[name] = t
	}
	return tiers
}

func (v *validator) oneOf(key, got string, allowed ...string) string {
	for _, a := range allowed {
		if got == a {
			return got
		}
	}
	v.addf(key, "want one of %q, got %q", allowed, got)
	return allowed[0]
}

func (v *validator) rateLimit(f *RateLimitFile, r *RateLimit) {
	def := &defaults.RateLimit
	r.Store, r.Algorithm, r.OnStoreError = def.Store, def.Algorithm, def.OnStoreError
	if f.Store != nil {
		r.Store = enum[Store](v, "rate_limit.store", *f.Store, storeNames)
	}
	if f.Algorithm != nil {
		r.Algorithm = enum[Algorithm](v, "rate_limit.algorithm", *f.Algorithm, algorithmNames)
	}
	if f.OnStoreError != nil {
		r.OnStoreError = enum[FailMode](v, "rate_limit.on_store_error", *f.OnStoreError, failModeNames)
	}
	r.StoreTimeout = v.duration("rate_limit.store_timeout", f.StoreTimeout, def.StoreTimeout, false)
	r.Cooldown = v.duration("rate_limit.cooldown", f.Cooldown, def.Cooldown, false)
	r.FailureThreshold = v.intRange("rate_limit.failure_threshold", f.FailureThreshold, def.FailureThreshold, 1, 1000)
	r.MaxKeys = v.intRange("rate_limit.max_keys", f.MaxKeys, def.MaxKeys, 1000, 100_000_000)
	r.LegacyHeaders = or(f.LegacyHeaders, def.LegacyHeaders)
	// lease = true does nothing without Redis: refused, so that nobody
	// believes leases are on. lease_overshoot and lease_duration are
	// accepted with lease = false, so that one line turns leases off.
	r.Lease = or(f.Lease, def.Lease)
	if r.Lease && r.Store != StoreRedis {
		v.addf("rate_limit.lease", "needs store = \"redis\" (the memory store makes no Redis calls to save)")
	}
	r.LeaseOvershoot = def.LeaseOvershoot
	if f.LeaseOvershoot != nil {
		if x := *f.LeaseOvershoot; !(x > 0 && x <= 0.2) {
			v.addf("rate_limit.lease_overshoot", "must be greater than 0 and at most 0.2, got %v", x)
		} else {
			r.LeaseOvershoot = x
		}
	}
	r.LeaseDuration = v.duration("rate_limit.lease_duration", f.LeaseDuration, def.LeaseDuration, false)
	if d := r.LeaseDuration; d < 10*time.Millisecond || d > time.Minute {
		v.addf("rate_limit.lease_duration", "must be between 10ms and 1m, got %q", d.String())
		r.LeaseDuration = def.LeaseDuration
	}
}

// redis validates [redis]. needed says rate_limit.store is "redis": only
// then are addresses required and credentials read from the environment
// required to be set.
func (v *validator) redis(f *RedisFile, r *Redis, needed bool) {
	def := &defaults.Redis
	r.Mode, r.KeyPrefix = def.Mode, def.KeyPrefix
	if f.Mode != nil {
		r.Mode = enum[RedisMode](v, "redis.mode", *f.Mode, redisModeNames)
	}
	for i, a := range f.Addrs {
		if _, _, err := net.SplitHostPort(a); err != nil {
			v.addf(fmt.Sprintf("redis.addrs[%d]", i), "want host:port, got %q", a)
		}
	}
	r.Addrs = f.Addrs
	if needed && len(r.Addrs) == 0 {
		what := map[string]string{"single": "the server's address", "cluster": "one or more seed nodes",
			"sentinel": "the sentinels' addresses"}[r.Mode.String()]
		v.addf("redis.addrs", "rate_limit.store = \"redis\" needs %s", what)
	}
	if r.Mode == RedisSingle && len(r.Addrs) > 1 {
		v.addf("redis.addrs", "mode \"single\" takes one address (use mode \"cluster\" or \"sentinel\" for several)")
	}
	switch {
	case f.MasterName != nil && r.Mode != RedisSentinel:
		v.addf("redis.master_name", "only for mode = \"sentinel\" (mode is %q)", r.Mode.String())
	case f.MasterName != nil:
		if *f.MasterName == "" || strings.ContainsAny(*f.MasterName, " \t\r\n") {
			v.addf("redis.master_name", "want the name the sentinels monitor, got %q", *f.MasterName)
		}
		r.MasterName = *f.MasterName
	case r.Mode == RedisSentinel:
		v.addf("redis", "mode \"sentinel\" needs master_name (the name in the sentinels' \"sentinel monitor\" line)")
	}
	env := func(key string, name *string) string {
		if name == nil {
			return ""
		}
		val := os.Getenv(*name)
		if val == "" && needed {
			v.addf(key, "environment variable %s is not set", *name)
		}
		return val
	}
	r.Username = env("redis.username_env", f.UsernameEnv)
	r.Password = env("redis.password_env", f.PasswordEnv)
	if f.SentinelPasswordEnv != nil && r.Mode != RedisSentinel {
		v.addf("redis.sentinel_password_env", "only for mode = \"sentinel\" (mode is %q)", r.Mode.String())
	} else {
		r.SentinelPassword = env("redis.sentinel_password_env", f.SentinelPasswordEnv)
	}
	r.DB = v.intRange("redis.db", f.DB, def.DB, 0, 15)
	if r.Mode == RedisCluster && r.DB != 0 {
		v.addf("redis.db", "Redis Cluster has only db 0, got %d", r.DB)
	}
	r.TLS = or(f.TLS, def.TLS)
	if !r.TLS && (f.TLSCAFile != nil || f.TLSServerName != nil) {
		key := "redis.tls_ca_file"
		if f.TLSCAFile == nil {
			key = "redis.tls_server_name"
		}
		v.addf(key, "needs tls = true")
	}
	r.TLSServerName = def.TLSServerName
	if r.TLS && f.TLSServerName != nil {
		if !validHostname(*f.TLSServerName) && net.ParseIP(*f.TLSServerName) == nil {
			v.addf("redis.tls_server_name", "want a host name or IP address, got %q", *f.TLSServerName)
		}
		r.TLSServerName = *f.TLSServerName
	}
	if r.TLS && f.TLSCAFile != nil {
		if pool, pem, _ := v.loadCA("redis.tls_ca_file", *f.TLSCAFile); pool != nil {
			r.TLSCA = pem
		}
	}
	if f.KeyPrefix != nil {
		if *f.KeyPrefix == "" || strings.ContainsAny(*f.KeyPrefix, "{} ") {
			v.addf("redis.key_prefix", "must be non-empty without braces or spaces")
		} else {
			r.KeyPrefix = *f.KeyPrefix
		}
	}
}

func (v *validator) identity(f *IdentityFile, id *Identity, tiers map[string]*Tier, s *Snapshot) {
	str := func(key string, p *string, def string, header bool) string {
		if p == nil {
			return def
		}
		if (header && !tokenRE.MatchString(*p)) || (!header && !nameRE.MatchString(*p)) {
			v.addf(key, "invalid value %q", *p)
			return def
		}
		return *p
	}
	def := &defaults.Identity
	id.APIKeyHeader = str("identity.api_key_header", f.APIKeyHeader, def.APIKeyHeader, true)
	id.ClientHeader = str("identity.client_header", f.ClientHeader, def.ClientHeader, true)
	id.TierHeader = str("identity.tier_header", f.TierHeader, def.TierHeader, true)
	id.AnonymousTier = str("identity.anonymous_tier", f.AnonymousTier, def.AnonymousTier, false)
	id.AuthenticatedTier = str("identity.authenticated_tier", f.AuthenticatedTier, def.AuthenticatedTier, false)
	id.ClientCertTier = str("identity.client_cert_tier", f.ClientCertTier, def.ClientCertTier, false)
	id.IPv6Prefix = v.intRange("identity.ipv6_prefix", f.IPv6Prefix, def.IPv6Prefix, 16, 128)
	if f.APIKeysFile != nil {
		path := relPath(v.file, *f.APIKeysFile)
		s.Files = append(s.Files, path)
		id.keys = v.loadKeys(path, tiers)
	}
	if f.JWT != nil {
		if f.JWT.PublicKeyFile != nil {
			s.Files = append(s.Files, relPath(v.file, *f.JWT.PublicKeyFile))
		}
		id.JWT = v.jwt(f.JWT, v.file)
	}
	v.tierTables(f, id, tiers)
}

// tierTables: once any tier is configured, every tier a client can land in
// has a table, so that no client is unlimited by omission (a tier meant
// to be unlimited says unlimited = true). Tiers of the keys file are
// checked as it is read.
func (v *validator) tierTables(f *IdentityFile, id *Identity, tiers map[string]*Tier) {
	if len(tiers) == 0 {
		return
	}
	need := func(key, tier, who string) {
		if _, ok := tiers[tier]; !ok {
			v.addf(key, "tier %q (%s) has no [tiers.%s] table: add one with limit and window, or unlimited = true", tier, who, tier)
		}
	}
	need("identity.anonymous_tier", id.AnonymousTier, "clients known by their address")
	if f.JWT != nil {
		need("identity.authenticated_tier", id.AuthenticatedTier, "tokens without a known tier claim")
	}
	if id.ClientCertTier != "" {
		need("identity.client_cert_tier", id.ClientCertTier, "clients with a certificate")
	}
}

func (v *validator) routeLimits(i int, f *RouteFile, r *Route, tiers map[string]*Tier) {
	key := fmt.Sprintf("routes[%d]", i)
	def := &defaults.Route
	r.RateLimitExempt = or(f.RateLimitExempt, def.RateLimitExempt)
	r.Shadow = def.Shadow
	if f.RateLimitMode != nil {
		r.Shadow = v.oneOf(key+".rate_limit_mode", *f.RateLimitMode, "enforce", "shadow") == "shadow"
	}
	for tier, limit := range f.Limits {
		if t, ok := tiers[tier]; !ok {
			v.addf(key+".limits", "unknown tier %q", tier)
		} else if t.Unlimited {
			v.addf(key+".limits", "tier %q is unlimited: a route limit needs the tier's window", tier)
		}
		if limit <= 0 {
			v.addf(key+".limits", "limit for %q must be positive", tier)
		}
	}
	if len(f.Limits) > 0 {
		r.Limits = f.Limits
	}
	r.LimitPerRoute = or(f.LimitPerRoute, def.LimitPerRoute) || len(f.Limits) > 0
	r.OwnCircuit = or(f.OwnCircuit, def.OwnCircuit)
}

func (v *validator) accessLog(f *AccessLogFile, a *AccessLog) {
	def := &defaults.AccessLog
	a.Enabled = or(f.Enabled, def.Enabled)
	a.Sample = def.Sample
	if f.Sample != nil {
		if *f.Sample < 0 || *f.Sample > 1 {
			v.addf("access_log.sample", "must be between 0 and 1, got %v", *f.Sample)
		} else {
			a.Sample = *f.Sample
		}
	}
	if f.FingerprintSecretEnv != nil {
		secret := os.Getenv(*f.FingerprintSecretEnv)
		if len(secret) < 16 {
			v.addf("access_log.fingerprint_secret_env", "environment variable %s must hold at least 16 bytes", *f.FingerprintSecretEnv)
		}
		a.Secret = []byte(secret)
	}
}

// reservedFields are request fields that carry framing, routing,
// forwarding or credentials: none can be a header the sidecar writes or
// reads identity from (compared as the sidecar matches names: case
// ignored, '_' read as '-').
var reservedFields = []string{"Host", "Authorization", "Cookie", "Content-Length", "Transfer-Encoding", "Connection",
	"Keep-Alive", "Proxy-Connection", "Proxy-Authorization", "TE", "Trailer", "Upgrade", "Expect",
	"X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded", "X-Real-IP",
	// and those it writes in its own answers (the request id is echoed in every one)
	"Content-Type", "Retry-After", "RateLimit", "RateLimit-Policy", "X-RateLimit-Limit", "X-RateLimit-Remaining",
	"X-RateLimit-Reset", "X-Sidecar-Fallback"}

// headerRoles checks that the headers given roles (the request id, the
// API key, the client id and tier written for the upstream) are distinct
// and none is a reserved field. request_id_header = "X-API-Key" echoed
// each client's key in its responses and wrote it to the access log;
// client_header = "Host" replaced the authority the upstream saw.
func (v *validator) headerRoles(s *Snapshot) {
	roles := []struct{ key, name string }{
		{"server.request_id_header", s.Server.RequestIDHeader},
		{"identity.api_key_header", s.Identity.APIKeyHeader},
		{"identity.client_header", s.Identity.ClientHeader},
		{"identity.tier_header", s.Identity.TierHeader},
	}
	fold := func(n string) string { return strings.ToLower(strings.ReplaceAll(n, "_", "-")) }
	for i, r := range roles {
		for _, f := range reservedFields {
			if fold(r.name) != fold(f) {
				continue
			}
			if f == "Authorization" && r.key == "identity.api_key_header" && s.Identity.JWT == nil {
				continue // keys sent as "Authorization: <key>", with no bearer tokens to tell apart
			}
			v.addf(r.key, "%q is a field the sidecar reads or rewrites itself (framing, routing, forwarding or credentials): choose another name", r.name)
		}
		for _, o := range roles[:i] {
			if fold(r.name) == fold(o.name) { // named at both: either may be the one set
				v.addf(o.key, "%q is also %s: each role needs a field of its own", o.name, r.key)
				v.addf(r.key, "%q is also %s: each role needs a field of its own", r.name, o.key)
			}
		}
	}
}
