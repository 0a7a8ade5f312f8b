package proxy

import (
	"fmt"
	"sync/atomic"

	"github.com/VictoriaMetrics/metrics"
)

// Label values here come only from config (route and upstream names, which
// policy restricts to [A-Za-z0-9_.-]) or from closed enums (method, status
// class, error kind). Never a path, client address or header value.

var methodNames = [...]string{"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other"}

func methodIndex(m []byte) int {
	switch string(m) { // no allocation: the compiler special-cases string(b) in switch
	case "GET":
		return 0
	case "HEAD":
		return 1
	case "POST":
		return 2
	case "PUT":
		return 3
	case "DELETE":
		return 4
	case "PATCH":
		return 5
	case "OPTIONS":
		return 6
	case "CONNECT":
		return 7
	case "TRACE":
		return 8
	}
	return 9
}

// durationBuckets suit a proxy: 0.5 ms to ~30 s.
var durationBuckets = metrics.ExponentialBuckets(0.0005, 2, 17)

// addedBuckets suit the proxy's own latency: 10 µs to ~0.3 s.
var addedBuckets = metrics.ExponentialBuckets(0.00001, 2, 16)

// proxyMetrics are the process-wide series of the forwarding path.
type proxyMetrics struct {
	set      *metrics.Set
	inFlight atomic.Int64
	panics   *metrics.Counter
	badReqs  *metrics.Counter
	// connsRefused counts HTTP/2 connections closed past max_connections.
	connsRefused *metrics.Counter
	// rapidResets counts HTTP/2 connections closed for resetting most of
	// their streams at once (streamEnded).
	rapidResets *metrics.Counter
	protocols   [len(protocolNames)]*metrics.Counter
	// identity counts identification problems by reason.
	identity [identityReasons]*metrics.Counter
}

// Reasons of sidecar_identity_problems_total.
const (
	reasonUnknownKey   = iota // an unknown or revoked API key (401)
	reasonBadToken            // a bearer token that failed verification (401)
	reasonAmbiguous           // two credentials, or one repeated (400)
	reasonUnknownTier         // a valid token's tier claim named no tier: the authenticated tier was used
	reasonFailureLimit        // refused with 429: the address failed identification too often
	identityReasons
)

// protocolNames label the protocol a client spoke, by clientProtocol.
var protocolNames = [...]string{"http1", "h2"}

var identityReasonNames = [identityReasons]string{"unknown_key", "bad_token", "ambiguous", "unknown_tier", "failure_limit"}

func newProxyMetrics(set *metrics.Set) *proxyMetrics {
	m := &proxyMetrics{set: set}
	set.GetOrCreateGauge(`sidecar_requests_in_flight`, func() float64 { return float64(m.inFlight.Load()) })
	m.panics = set.GetOrCreateCounter(`sidecar_panics_recovered_total`)
	m.badReqs = set.GetOrCreateCounter(`sidecar_requests_rejected_total{reason="malformed"}`)
	m.connsRefused = set.GetOrCreateCounter(`sidecar_connections_refused_total{protocol="h2"}`)
	m.rapidResets = set.GetOrCreateCounter(`sidecar_http2_rapid_reset_closes_total`)
	for i, name := range protocolNames {
		m.protocols[i] = set.GetOrCreateCounter(fmt.Sprintf(`sidecar_requests_by_protocol_total{protocol=%q}`, name))
	}
	for i, r := range identityReasonNames {
		m.identity[i] = set.GetOrCreateCounter(fmt.Sprintf(`sidecar_identity_problems_total{reason=%q}`, r))
	}
	return m
}

// routeMetrics are one route's series. Counters are created on first use
// so that /metrics does not list 50 zero series per route; GetOrCreate
// keeps them (and their values) across reloads for routes that stay.
type routeMetrics struct {
	set      *metrics.Set
	name     string
	requests map[string]*[len(methodNames)][6]atomic.Pointer[metrics.Counter] // by tier label; read-only after build
	duration *metrics.PrometheusHistogram
	added    *metrics.PrometheusHistogram // the sidecar's own share: total minus upstream
	bytesIn  *metrics.Counter
	bytesOut *metrics.Counter
}

// tierNone labels requests answered before their client was identified.
// tierOther labels a tier named by a token but absent from the config, so
// that a token cannot make up label values.
const (
	tierNone  = "none"
	tierOther = "other"
)

func newRouteMetrics(set *metrics.Set, route string, tiers []string) *routeMetrics {
	req := make(map[string]*[len(methodNames)][6]atomic.Pointer[metrics.Counter], len(tiers)+2)
	for _, t := range append(tiers, tierNone, tierOther) {
		req[t] = new([len(methodNames)][6]atomic.Pointer[metrics.Counter])
	}
	return &routeMetrics{
		set:      set,
		name:     route,
		requests: req,
		duration: set.GetOrCreatePrometheusHistogramExt(fmt.Sprintf(`sidecar_request_duration_seconds{route=%q}`, route), durationBuckets),
		added:    set.GetOrCreatePrometheusHistogramExt(fmt.Sprintf(`sidecar_added_latency_seconds{route=%q}`, route), addedBuckets),
		bytesIn:  set.GetOrCreateCounter(fmt.Sprintf(`sidecar_request_body_bytes_total{route=%q}`, route)),
		bytesOut: set.GetOrCreateCounter(fmt.Sprintf(`sidecar_response_body_bytes_total{route=%q}`, route)),
	}
}

var statusClasses = [...]string{"1xx", "1xx", "2xx", "3xx", "4xx", "5xx"}

// tierLabel bounds a tier name to the label values this route knows.
func (m *routeMetrics) tierLabel(tier string) string {
	if _, ok := m.requests[tier]; ok {
		return tier
	}
	return tierOther
}

func (m *routeMetrics) request(method []byte, status int, tier string) *metrics.Counter {
	mi, ci := methodIndex(method), status/100
	if ci < 1 || ci > 5 {
		ci = 5
	}
	byTier, ok := m.requests[tier]
	if !ok {
		tier, byTier = tierOther, m.requests[tierOther]
	}
	return lazyCounter(m.set, &byTier[mi][ci], func() string {
		return fmt.Sprintf(`sidecar_requests_total{route=%q,method=%q,status_class=%q,tier=%q}`,
			m.name, methodNames[mi], statusClasses[ci], tier)
	})
}

// upstreamMetrics are one upstream's series.
type upstreamMetrics struct {
	set       *metrics.Set
	name      string
	errors    [len(errorKinds)]atomic.Pointer[metrics.Counter]
	fallbacks [len(fallbackReasons)]atomic.Pointer[metrics.Counter]
	dials     *metrics.Counter
	duration  *metrics.PrometheusHistogram
	retries   *metrics.Counter
	checkPass *metrics.Counter
	checkFail *metrics.Counter
}

func (m *upstreamMetrics) fallbackInc(reason string) {
	i := indexOr(fallbackReasons[:], reason)
	lazyCounter(m.set, &m.fallbacks[i], func() string {
		return fmt.Sprintf(`sidecar_fallbacks_total{upstream=%q,reason=%q}`, m.name, fallbackReasons[i])
	}).Inc()
}

// indexOr returns v's index in a closed set of label values, or the last
// one (the set's catch-all) when v is not in it.
func indexOr(set []string, v string) int {
	for i, s := range set[:len(set)-1] {
		if s == v {
			return i
		}
	}
	return len(set) - 1
}

// lazyCounter returns the counter held in p, registering it under name()
// on first use: series appear once they have something to count, and the
// name is built once, not per request.
func lazyCounter(set *metrics.Set, p *atomic.Pointer[metrics.Counter], name func() string) *metrics.Counter {
	if c := p.Load(); c != nil {
		return c
	}
	c := set.GetOrCreateCounter(name())
	p.Store(c)
	return c
}

var errorKinds = [...]string{"refused", "connect_timeout", "pool_exhausted", "timeout", "reset", "protocol", "tls", "other"}

func newUpstreamMetrics(set *metrics.Set, name string) *upstreamMetrics {
	return &upstreamMetrics{set: set, name: name,
		dials:     set.GetOrCreateCounter(fmt.Sprintf(`sidecar_upstream_dials_total{upstream=%q}`, name)),
		duration:  set.GetOrCreatePrometheusHistogramExt(fmt.Sprintf(`sidecar_upstream_duration_seconds{upstream=%q}`, name), durationBuckets),
		retries:   set.GetOrCreateCounter(fmt.Sprintf(`sidecar_upstream_retries_total{upstream=%q}`, name)),
		checkPass: set.GetOrCreateCounter(fmt.Sprintf(`sidecar_health_checks_total{upstream=%q,result="pass"}`, name)),
		checkFail: set.GetOrCreateCounter(fmt.Sprintf(`sidecar_health_checks_total{upstream=%q,result="fail"}`, name)),
	}
}

func (m *upstreamMetrics) errorInc(err error) {
	kind := answerFor(err).kind
	if kind == "" {
		return // the client's failure, not the upstream's
	}
	i := indexOr(errorKinds[:], kind)
	lazyCounter(m.set, &m.errors[i], func() string {
		return fmt.Sprintf(`sidecar_upstream_errors_total{upstream=%q,kind=%q}`, m.name, errorKinds[i])
	}).Inc()
}
