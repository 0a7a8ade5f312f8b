// Package proxy is the request path of sidecar: the fasthttp handler that
// matches a route, rewrites headers (hop-by-hop, X-Forwarded-*, request id),
// forwards to an upstream over its own keep-alive connections, and streams
// both bodies with backpressure. It is also the only package that turns
// errors into HTTP statuses.
//
// Upstream connections are handled here rather than by fasthttp.HostClient,
// because HostClient writes the whole request before reading any response:
// that turns an early answer (401 before a large upload is read) into a 502
// and deadlocks a full-duplex echo. We reuse fasthttp's header parsing and
// writing and its chunked decoder (Response.Read with StreamBody) and own
// only the connection handling.
package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/admission"
	"github.com/sidecar-proxy/sidecar/breaker"
	"github.com/sidecar-proxy/sidecar/health"
	"github.com/sidecar-proxy/sidecar/overload"
	"github.com/sidecar-proxy/sidecar/policy"
)

// Settings configures a Proxy. The zero value is usable.
type Settings struct {
	// Logger receives operational logs. Default: slog.Default().
	Logger *slog.Logger
	// Metrics is where the proxy registers its series. Default: a new set
	// registered globally with metrics.RegisterSet.
	Metrics *metrics.Set
	// AccessLog receives the access log's JSON lines, written in whole
	// lines. Default: os.Stdout.
	AccessLog io.Writer
}

// Proxy forwards requests according to the current policy snapshot.
// Apply swaps the snapshot atomically; requests in flight finish on the
// snapshot they started with.
type Proxy struct {
	log   *slog.Logger
	set   *metrics.Set
	m     *proxyMetrics
	ids   *requestIDs
	state atomic.Pointer[state]

	applyMu sync.Mutex // serialises Apply
	stop    chan struct{}
	wg      sync.WaitGroup

	lastShadowLog      atomic.Int64
	lastUnknownTierLog atomic.Int64 // minutes
	circuits           circuits
	// overloads are the upstreams' overload limiters by name, kept
	// across reloads; overloadMetrics their series. Apply owns both.
	overloads       map[string]*overload.Limiter
	overloadMetrics map[string]*overloadMetrics
	access          *accessLog
	h2Conns         atomic.Int64 // HTTP/2 client connections open (h2ConnState)
	active          *activeClients
}

// state is everything the handler needs, built from one snapshot.
type state struct {
	snap      *policy.Snapshot
	upstreams map[string]*upstreamRuntime
	routes    []routeRuntime // parallel to snap.Routes
	noRoute   *routeMetrics
	rl        *rateLimiting
	// filter says which client fields never reach the upstream;
	// apiKeyField matches identity.api_key_header in any spelling.
	filter      *requestFilter
	apiKeyField *fieldSet
	adm         *admission.Admitter         // route, identity, limits
	overload    map[string]*overloadRuntime // by upstream name; absent: off
}

type routeRuntime struct {
	route *policy.Route
	up    *upstreamRuntime
	m     *routeMetrics
	rl    *tierCounters
	brk   *breaker.Breaker // the route's own circuit (own_circuit), or nil
	ol    *overloadRuntime // the upstream's overload protection, or nil
}

// New builds a Proxy serving snap.
func New(snap *policy.Snapshot, s Settings) (*Proxy, error) {
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	if s.Metrics == nil {
		s.Metrics = metrics.NewSet()
		metrics.RegisterSet(s.Metrics)
	}
	p := &Proxy{log: s.Logger, set: s.Metrics, ids: newRequestIDs(), stop: make(chan struct{}),
		overloads: map[string]*overload.Limiter{}, overloadMetrics: map[string]*overloadMetrics{}}
	p.circuits = circuits{set: s.Metrics, m: map[string]*atomic.Pointer[breaker.Breaker]{}}
	p.m = newProxyMetrics(s.Metrics)
	p.active = newActiveClients(s.Metrics)
	if s.AccessLog == nil {
		s.AccessLog = os.Stdout
	}
	p.access = newAccessLog(s.AccessLog, s.Metrics, func() []byte { return p.state.Load().snap.AccessLog.Secret })
	if err := p.Apply(snap); err != nil {
		p.access.close()
		return nil, err
	}
	p.wg.Add(1)
	go p.reapIdle()
	return p, nil
}

// Snapshot returns the policy currently served.
func (p *Proxy) Snapshot() *policy.Snapshot { return p.state.Load().snap }

// Apply makes snap the served policy. Upstreams whose settings did not
// change keep their connection pools; the pools of removed or changed
// upstreams are closed once idle. Route and upstream counters continue
// (they are looked up by name).
//
// An error (an upstream's client could not be built) leaves the served
// policy as it was.
func (p *Proxy) Apply(snap *policy.Snapshot) error {
	p.applyMu.Lock()
	defer p.applyMu.Unlock()
	old := p.state.Load()
	st := &state{snap: snap, upstreams: make(map[string]*upstreamRuntime, len(snap.Upstreams)),
		filter: newRequestFilter(snap), apiKeyField: newFieldSet(snap.Identity.APIKeyHeader)}
	for name, spec := range snap.Upstreams {
		if old != nil {
			if u, ok := old.upstreams[name]; ok && u.spec.Fingerprint == spec.Fingerprint &&
				old.snap.Server.IdleTimeout == snap.Server.IdleTimeout {
				st.upstreams[name] = u
				continue
			}
		}
		u, err := newUpstreamRuntime(spec, newUpstreamMetrics(p.set, name), snap.Server.IdleTimeout)
		if err == nil {
			err = p.newBreaker(u)
		}
		if err != nil {
			st.closeNew(old)
			return fmt.Errorf("proxy: upstream %s: %w", name, err)
		}
		p.startChecks(u)
		st.upstreams[name] = u
		p.set.GetOrCreateGauge(fmt.Sprintf(`sidecar_upstream_healthy_endpoints{upstream=%q}`, name), func() float64 {
			if u := p.state.Load().upstreams[name]; u != nil {
				return float64(u.pool.UsableCount(time.Now()))
			}
			return 0
		})
	}
	for i := range snap.Routes {
		r := &snap.Routes[i]
		rr := routeRuntime{route: r, up: st.upstreams[r.Upstream],
			m: newRouteMetrics(p.set, r.Name, tierLabels(snap)), rl: newTierCounters(p.set, r.Name, snap.Tiers)}
		if r.OwnCircuit && rr.up.spec.Breaker != nil {
			var err error
			if rr.brk, err = p.circuit("route:"+r.Name, rr.up.spec.Breaker); err != nil {
				st.closeNew(old)
				return fmt.Errorf("proxy: route %s: %w", r.Name, err)
			}
		}
		st.routes = append(st.routes, rr)
	}
	st.noRoute = newRouteMetrics(p.set, "none", nil)
	// Overload limiters are updated after everything else that can fail
	// (only their Validate errors can, which policy has ruled out), so a
	// failed Apply leaves them as they were.
	st.overload = make(map[string]*overloadRuntime)
	for name, spec := range snap.Upstreams {
		o, err := p.overloadFor(name, spec.Overload)
		if err != nil {
			st.closeNew(old)
			return fmt.Errorf("proxy: upstream %s: overload: %w", name, err)
		}
		if o != nil {
			st.overload[name] = o
		}
	}
	for name := range p.overloads {
		if snap.Upstreams[name] == nil {
			delete(p.overloads, name) // removed: a later upstream of that name starts afresh
		}
	}
	for i := range st.routes {
		st.routes[i].ol = st.overload[st.routes[i].route.Upstream]
	}
	if old != nil && old.rl.sameConfig(snap) {
		st.rl = old.rl // limits carry over
	} else {
		st.rl = p.newRateLimiting(snap)
	}
	st.adm = admission.New(snap, st.rl.lim, func(r *policy.Route) *breaker.Breaker {
		if rr := &st.routes[r.Index]; rr.brk != nil {
			return rr.brk // the route's own circuit
		}
		return st.routes[r.Index].up.brk
	})
	p.state.Store(st)
	if old != nil {
		for name, u := range old.upstreams {
			if st.upstreams[name] != u {
				u.closeIdle() // in-flight requests still release into it; it closes them
			}
		}
		if old.rl != st.rl {
			old.rl.shutdown() // requests still deciding with it fall back
		}
	}
	return nil
}

// tierLabels are the tier label values a request can carry: the
// configured tiers and the identity's default ones.
func tierLabels(snap *policy.Snapshot) []string {
	labels := []string{snap.Identity.AnonymousTier, snap.Identity.AuthenticatedTier}
	for name := range snap.Tiers {
		labels = append(labels, name)
	}
	return labels
}

// startChecks runs the upstream's active health checks, if configured.
func (p *Proxy) startChecks(u *upstreamRuntime) {
	hc := u.spec.HealthCheck
	if hc == nil {
		return
	}
	endpoints := u.pool.Endpoints()
	checks := make([]health.Check, len(endpoints))
	for i, ep := range endpoints {
		checks[i] = health.Check{Addr: ep.Addr(), Path: hc.Path, Interval: hc.Interval, Timeout: hc.Timeout,
			ExpectedStatus: hc.ExpectedStatus, HealthyThreshold: hc.HealthyThreshold, UnhealthyThreshold: hc.UnhealthyThreshold,
			TLS: ep.TLS()}
	}
	u.checker = health.StartChecks(checks, func(i int, healthy bool) {
		endpoints[i].SetHealthy(healthy)
		p.log.Warn("endpoint health changed", "upstream", u.spec.Name, "endpoint", endpoints[i].Addr(), "healthy", healthy)
	}, func(i int, pass bool) {
		if pass {
			u.m.checkPass.Inc()
		} else {
			u.m.checkFail.Inc()
		}
	})
}

// Ready returns an error naming the upstreams that /readyz waits for
// (required_for_readiness) and that have no usable endpoint.
func (p *Proxy) Ready() error {
	st := p.state.Load()
	now := time.Now()
	var down []string
	for _, name := range st.snap.UpstreamNames {
		u := st.upstreams[name]
		if u.spec.RequiredForReady && u.pool.UsableCount(now) == 0 {
			down = append(down, name)
		}
	}
	if len(down) > 0 {
		return fmt.Errorf("no usable endpoint for upstream %s", strings.Join(down, ", "))
	}
	return nil
}

// Close stops background work and closes idle upstream connections.
func (p *Proxy) Close() {
	close(p.stop)
	p.wg.Wait()
	st := p.state.Load()
	for _, u := range st.upstreams {
		u.closeIdle()
	}
	st.rl.shutdown()
	p.access.close()
}

// reapIdle closes pooled upstream connections past their idle timeout, so
// idle pools do not hold sockets the upstream has long given up on.
func (p *Proxy) reapIdle() {
	defer p.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-t.C:
			for _, u := range p.state.Load().upstreams {
				u.pool.ReapIdle(now)
			}
		}
	}
}

// match routes the request (see admission.Admitter.Route). It routes by
// the Host field as it will go upstream (originForm made it the absolute
// target's authority), not by fasthttp's URI host, which percent-decodes
// it: the route and the upstream see one authority. The paths it offers:
// fasthttp's (percent-decoded, dot segments resolved), which routes match,
// and the readings a backend may make instead: the raw target, and, when
// it has backslashes, the same with '\\' as '/' (a path separator to WHATWG
// URL parsers, Node and browsers, and to IIS, not to fasthttp on Linux).
// closeNew stops what a state being built started and old does not share:
// for an Apply that fails half-way.
func (st *state) closeNew(old *state) {
	for name, u := range st.upstreams {
		if old == nil || old.upstreams[name] != u {
			u.closeIdle()
		}
	}
}

func (st *state) match(ctx *fasthttp.RequestCtx, req *admission.Request) (*routeRuntime, error) {
	h := &ctx.Request.Header
	raw := h.RequestURI()
	if i := bytes.IndexByte(raw, '?'); i >= 0 {
		raw = raw[:i]
	}
	req.Method, req.Host = h.Method(), h.Host()
	req.Paths = append(req.Paths[:0], ctx.Path(), raw)
	if alt := backslashesAsSlashes(raw); alt != nil {
		var u fasthttp.URI
		u.SetPathBytes(alt)
		req.Paths = append(req.Paths, alt, u.Path())
	}
	if alt := withoutPathParams(raw); alt != nil {
		// Tomcat, Jetty and Spring drop each segment's ";parameters"
		// before they resolve dot segments: "/healthz/..;/x" is /x to them.
		var u fasthttp.URI
		u.SetPathBytes(alt)
		req.Paths = append(req.Paths, alt, u.Path())
	}
	r, err := st.adm.Route(req)
	if err != nil {
		return nil, err
	}
	return &st.routes[r.Index], nil
}

// withoutPathParams returns path with each segment's parameters (from a
// ';', or its encoding "%3B", to the segment's end) removed, or nil when
// it has none (the common case, without allocating).
func withoutPathParams(path []byte) []byte {
	if bytes.IndexByte(path, ';') < 0 && !bytes.Contains(path, []byte("%3b")) && !bytes.Contains(path, []byte("%3B")) {
		return nil
	}
	out := make([]byte, 0, len(path))
	for i := 0; i < len(path); i++ {
		param := path[i] == ';' || path[i] == '%' && i+2 < len(path) && path[i+1] == '3' && (path[i+2] == 'b' || path[i+2] == 'B')
		if !param {
			out = append(out, path[i])
			continue
		}
		for i < len(path) && path[i] != '/' {
			i++
		}
		i-- // the '/' (or the end) is the next segment's
	}
	return out
}

// backslashesAsSlashes returns path with every '\\' and "%5C" as '/', or
// nil when it has none (the common case, without allocating).
func backslashesAsSlashes(path []byte) []byte {
	has := bytes.IndexByte(path, '\\') >= 0
	for i := bytes.IndexByte(path, '%'); !has && i >= 0 && i+2 < len(path); {
		has = path[i+1] == '5' && (path[i+2] == 'c' || path[i+2] == 'C')
		j := bytes.IndexByte(path[i+1:], '%')
		if j < 0 {
			break
		}
		i += 1 + j
	}
	if !has {
		return nil
	}
	alt := bytes.ReplaceAll(path, []byte{'\\'}, []byte{'/'})
	alt = bytes.ReplaceAll(alt, []byte("%5c"), []byte{'/'})
	return bytes.ReplaceAll(alt, []byte("%5C"), []byte{'/'})
}

// NewServer returns the fasthttp server for the proxy listener, configured
// from the snapshot's [server] table. These settings need a restart to
// change; everything else reloads.
func (p *Proxy) NewServer(srv *policy.Server) *fasthttp.Server {
	return &fasthttp.Server{
		Handler:                      p.Handler,
		StreamRequestBody:            true, // the handler runs once the head is in
		DisablePreParseMultipartForm: true, // else multipart bodies are consumed by fasthttp
		ReadBufferSize:               srv.MaxHeaderBytes,
		// A connection waiting for its next request holds no read or
		// write buffer (fasthttp reads the first byte alone): 10,000 idle
		// connections take ~90 MiB instead of ~150 MiB (TestChaosHostileClients).
		ReduceMemoryUsage:             true,
		WriteBufferSize:               copyBufSize,       // WriteTo sizes chunks to fit it
		ReadTimeout:                   srv.HeaderTimeout, // armed per request head; the body re-arms
		IdleTimeout:                   srv.IdleTimeout,
		Concurrency:                   srv.MaxConnections,
		MaxConnsPerIP:                 srv.MaxConnectionsPerIP,
		NoDefaultServerHeader:         true,
		NoDefaultContentType:          true,
		CloseOnShutdown:               true, // responses during drain carry Connection: close
		DisableHeaderNamesNormalizing: false,
		ErrorHandler:                  p.serverError,
		// fasthttp pre-reads min(8 KiB, limit, Content-Length) body bytes
		// before calling the handler; the current limit keeps that small.
		// Once the head is in, the read deadline moves from header_timeout
		// to idle_timeout, and fasthttp's body read-ahead (min(8 KiB,
		// this limit, Content-Length) under one deadline) is cut to one
		// byte: the handler streams the rest under progress deadlines, so
		// a slow but moving upload is never cut. The limit only sizes the
		// read-ahead: a larger body still streams (fasthttp hands it over
		// as a stream), and the handler enforces max_body_bytes itself.
		// A request without a body reads nothing more from the client
		// (an upgrade's tunnel arms its own deadlines), so its deadline is
		// left alone: one timer update fewer per small GET.
		HeaderReceived: func(h *fasthttp.RequestHeader) fasthttp.RequestConfig {
			if cl := h.ContentLength(); cl == 0 || cl == -2 { // -2: neither Content-Length nor chunked
				return fasthttp.RequestConfig{MaxRequestBodySize: 1}
			}
			return fasthttp.RequestConfig{MaxRequestBodySize: 1, ReadTimeout: p.state.Load().snap.Server.IdleTimeout}
		},
		// A client that asks before sending (Expect: 100-continue) learns
		// that its body is too large without sending it.
		ExpectHandler:         p.expect,
		Logger:                fasthttpLogger{p.log},
		SecureErrorLogMessage: true,
	}
}

// expect decides on Expect: 100-continue before any body is read: a body
// over the limit, an unknown client or one over its rate limit gets its
// final status without 100 Continue, and its body is never read.
func (p *Proxy) expect(ctx *fasthttp.RequestCtx) int {
	p.m.inFlight.Add(1)
	x := exchangePool.Get().(*exchange)
	x.p, x.r.ctx, x.r.start = p, ctx, ctx.Time()
	x.begin()
	if limit := x.r.srv.MaxBodyBytes; limit > 0 && int64(ctx.Request.Header.ContentLength()) > limit {
		// Answered as every 413 is: with the request id, in the access
		// log and the metrics.
		x.answer(ErrBodyTooLarge)
		x.finish(nil)
		x.release()
		return fasthttp.StatusRequestEntityTooLarge
	}
	if x.r.rt == nil || !checkRawHeaders(&ctx.Request.Header) {
		p.m.inFlight.Add(-1)
		x.release() // the handler answers these
		return fasthttp.StatusContinue
	}
	if err := x.limit(&ctx.Request.Header); err != nil {
		x.answer(err)
		x.finish(nil)
		x.release()
		return ctx.Response.StatusCode()
	}
	ctx.SetUserValue(decisionKey, &expectVerdict{rl: x.r.rl, clientID: append([]byte(nil), x.clientID...), tier: x.r.tier, priority: x.r.priority})
	p.m.inFlight.Add(-1)
	x.release()
	return fasthttp.StatusContinue
}

// serverError answers errors fasthttp detects before the handler runs.
func (p *Proxy) serverError(ctx *fasthttp.RequestCtx, err error) {
	p.m.badReqs.Inc()
	status, msg := fasthttp.StatusBadRequest, "malformed request"
	var small *fasthttp.ErrSmallBuffer
	switch {
	case errors.As(err, &small):
		status, msg = fasthttp.StatusRequestHeaderFieldsTooLarge, "request header too large"
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		status, msg = fasthttp.StatusRequestEntityTooLarge, "request body too large"
	}
	if ne, ok := err.(interface{ Timeout() bool }); ok && ne.Timeout() {
		status, msg = fasthttp.StatusRequestTimeout, "request header timeout"
	}
	writeError(ctx, status, msg, nil, "")
	ctx.SetConnectionClose()
}

type fasthttpLogger struct{ l *slog.Logger }

func (f fasthttpLogger) Printf(format string, args ...any) {
	f.l.Debug("fasthttp", "msg", format, "args", args)
}
