// Package upstream is sidecar's client side: one backend's endpoints, each
// with a pool of keep-alive HTTP/1.1 connections whose reads and writes
// run under progress deadlines, endpoint choice (round-robin or least
// connections, skipping unhealthy and ejected endpoints), passive ejection
// and the retry budget. It imports nothing of sidecar's: the proxy says
// what to send and how to answer; this package holds the sockets.
//
// Go's http.Transport is the model: the proxy decides, this talks to
// backends. Unlike http.Transport (and fasthttp.HostClient, which writes
// a whole request before reading any response), a Conn is handed to the
// caller, which drives the exchange itself and can read a response while
// it still writes the request (full duplex).
package upstream

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// Errors, as sentinels for errors.Is; the underlying error is joined to
// them. Acquire's say why there is no connection; ReadError's why a
// response failed.
var (
	ErrConnectRefused = errors.New("upstream: the endpoint refused the connection")
	ErrConnectTimeout = errors.New("upstream: connect timed out")
	ErrBusy           = errors.New("upstream: no free connection")
	ErrTLS            = errors.New("upstream: TLS handshake failed")

	ErrTimeout  = errors.New("upstream: no response in time")
	ErrReset    = errors.New("upstream: the connection was closed")
	ErrProtocol = errors.New("upstream: malformed response")

	// ErrCanceled: the sender gave up on the request (Request.Context
	// done) before the response head came; not the upstream's failure.
	ErrCanceled = errors.New("upstream: the request was canceled by its sender")
)

// Settings configure an Upstream. It is comparable: two Settings that are
// == describe the same upstream, so a reload can keep its pools.
type Settings struct {
	// Name labels the upstream's series. Required.
	Name string
	// Endpoints are the endpoints' URLs, "http://host:port" or
	// "https://host:port", separated by commas. Required.
	Endpoints string
	// ServerName is the name https endpoints must present and the SNI sent.
	// Default: each URL's host.
	ServerName string
	// CAPEM verifies https endpoints against these CAs. Default: the
	// system's roots.
	CAPEM string
	// ConnectTimeout bounds a connect, TLS handshake included. Required.
	ConnectTimeout time.Duration
	// IOTimeout is the progress timeout of reads and writes once a request
	// is under way: a read or write that makes no progress for this long
	// fails. Required.
	IOTimeout time.Duration
	// MaxConnections caps connections in use per endpoint. Required.
	MaxConnections int
	// MaxIdleConnections caps pooled idle connections per endpoint.
	MaxIdleConnections int
	// ConnWaitTimeout bounds the wait for a free connection slot; 0: no
	// wait.
	ConnWaitTimeout time.Duration
	// IdleConnTimeout closes pooled connections unused this long. Required.
	IdleConnTimeout time.Duration
	// LeastConnections picks the endpoint with the fewest connections in
	// use instead of the next one round-robin.
	LeastConnections bool
	// RetryBudget caps retries at this share of requests (0 to 1).
	RetryBudget float64
	// PassiveFailures consecutive failures eject an endpoint for
	// PassiveEjection; 0 turns passive ejection off.
	PassiveFailures int
	PassiveEjection time.Duration
	// HTTP2 speaks HTTP/2 to the endpoints: prior-knowledge h2c to
	// http:// ones, h2 by ALPN to https:// ones (see h2.go). Requests are
	// streams over few connections; MaxConnections caps the streams in
	// flight per endpoint.
	HTTP2 bool
	// Metrics is where sidecar_upstream_dials_total is counted. Default: a
	// set of its own.
	Metrics *metrics.Set
}

// Upstream is one backend: its endpoints and their pools.
type Upstream struct {
	s         Settings
	endpoints []*Endpoint
	next      atomic.Uint32

	retryMilli atomic.Int64 // retry budget, in thousandths of a retry
	retryEarn  int64        // earned per request
}

// New validates s and returns the Upstream; no connection is made yet.
func New(s Settings) (*Upstream, error) {
	switch {
	case s.Name == "":
		return nil, errors.New("upstream: a name is required")
	case s.ConnectTimeout <= 0, s.IOTimeout <= 0, s.IdleConnTimeout <= 0:
		return nil, fmt.Errorf("upstream %s: connect, I/O and idle-connection timeouts must be positive", s.Name)
	case s.MaxConnections <= 0 || s.MaxIdleConnections < 0 || s.MaxIdleConnections > s.MaxConnections:
		return nil, fmt.Errorf("upstream %s: want 0 <= max idle connections <= max connections, max connections > 0", s.Name)
	case s.RetryBudget < 0 || s.RetryBudget > 1:
		return nil, fmt.Errorf("upstream %s: retry budget %v not between 0 and 1", s.Name, s.RetryBudget)
	}
	set := s.Metrics
	if set == nil {
		set = metrics.NewSet()
	}
	u := &Upstream{s: s, retryEarn: int64(s.RetryBudget * 1000)}
	u.retryMilli.Store(3000) // a few retries allowed before any request has earned them
	dials := set.GetOrCreateCounter(fmt.Sprintf(`sidecar_upstream_dials_total{upstream=%q}`, s.Name))
	var roots *x509.CertPool
	if s.CAPEM != "" {
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM([]byte(s.CAPEM)) {
			return nil, fmt.Errorf("upstream %s: no PEM certificate in the CA bundle", s.Name)
		}
	}
	for raw := range strings.SplitSeq(s.Endpoints, ",") {
		pu, err := url.Parse(strings.TrimSpace(raw))
		if err != nil || pu.Host == "" || (pu.Scheme != "http" && pu.Scheme != "https") {
			return nil, fmt.Errorf("upstream %s: endpoint %q is not an http(s)://host:port URL", s.Name, raw)
		}
		port := pu.Port()
		if port == "" {
			port = map[string]string{"http": "80", "https": "443"}[pu.Scheme]
		}
		if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
			return nil, fmt.Errorf("upstream %s: endpoint %q has an invalid port", s.Name, raw)
		}
		e := &Endpoint{addr: net.JoinHostPort(pu.Hostname(), port), s: &u.s, dials: dials,
			busy: make(chan struct{}, s.MaxConnections)}
		if pu.Scheme == "https" {
			e.tls = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, ServerName: s.ServerName}
			if e.tls.ServerName == "" {
				e.tls.ServerName = pu.Hostname() // SNI and verification: the URL's host
			}
		}
		if s.HTTP2 {
			e.h2 = newH2Transport(e)
		}
		e.healthy.Store(true)
		u.endpoints = append(u.endpoints, e)
	}
	return u, nil
}

// Settings returns the settings u was built with.
func (u *Upstream) Settings() Settings { return u.s }

// Endpoints returns u's endpoints, in configuration order.
func (u *Upstream) Endpoints() []*Endpoint { return u.endpoints }

// Pick returns the endpoint for the next attempt: round-robin or least
// busy among the usable ones (healthy and not ejected), other than avoid;
// when none is usable, any of them (better a chance than a certain error).
func (u *Upstream) Pick(avoid *Endpoint, now time.Time) *Endpoint {
	n := len(u.endpoints)
	if n == 1 {
		return u.endpoints[0]
	}
	start := int(u.next.Add(1) - 1)
	var best *Endpoint
	for i := 0; i < n; i++ {
		ep := u.endpoints[(start+i)%n]
		if ep == avoid || !ep.Usable(now) {
			continue
		}
		if !u.s.LeastConnections {
			return ep
		}
		if best == nil || len(ep.busy) < len(best.busy) {
			best = ep
		}
	}
	if best != nil {
		return best
	}
	for i := 0; i < n; i++ {
		if ep := u.endpoints[(start+i)%n]; ep != avoid {
			return ep
		}
	}
	return u.endpoints[start%n]
}

// UsableCount is how many endpoints are healthy and not ejected.
func (u *Upstream) UsableCount(now time.Time) int {
	c := 0
	for _, ep := range u.endpoints {
		if ep.Usable(now) {
			c++
		}
	}
	return c
}

// RetryToken spends one retry from the budget: every request earns
// RetryBudget of a retry (EarnRetry), so retries stay within that share of
// requests (plus a small allowance at start), and never multiply an outage.
func (u *Upstream) RetryToken() bool {
	for {
		t := u.retryMilli.Load()
		if t < 1000 {
			return false
		}
		if u.retryMilli.CompareAndSwap(t, t-1000) {
			return true
		}
	}
}

// EarnRetry credits one request's share of a retry.
func (u *Upstream) EarnRetry() {
	if t := u.retryMilli.Add(u.retryEarn); t > retryTokenCap {
		u.retryMilli.Store(retryTokenCap)
	}
}

const retryTokenCap = 10_000 // at most 10 retries saved up

// Outcome feeds passive health: PassiveFailures consecutive failures eject
// the endpoint for PassiveEjection. It reports whether this one did.
func (u *Upstream) Outcome(ep *Endpoint, failed bool, now time.Time) (ejected bool) {
	if u.s.PassiveFailures <= 0 {
		return false
	}
	if !failed {
		ep.fails.Store(0)
		return false
	}
	if int(ep.fails.Add(1)) >= u.s.PassiveFailures {
		ep.fails.Store(0)
		ep.ejectedUntil.Store(now.Add(u.s.PassiveEjection).UnixNano())
		return true
	}
	return false
}

// CloseIdle closes every pooled connection for good: connections still in
// use are closed when they are released.
func (u *Upstream) CloseIdle() {
	for _, ep := range u.endpoints {
		ep.closeIdle(time.Time{})
	}
}

// ReapIdle closes pooled connections unused for IdleConnTimeout, so idle
// pools do not hold sockets the upstream has long given up on.
func (u *Upstream) ReapIdle(now time.Time) {
	for _, ep := range u.endpoints {
		ep.closeIdle(now.Add(-u.s.IdleConnTimeout)) // a non-zero cutoff never retires the endpoint
	}
}

// Endpoint is one address of an upstream with its pool of keep-alive
// connections. busy is a semaphore: one slot per connection in use, so at
// most MaxConnections requests hold a connection at once.
type Endpoint struct {
	addr  string
	s     *Settings
	dials *metrics.Counter
	busy  chan struct{}

	mu     sync.Mutex
	idle   []*Conn // LIFO: the most recently used connection is the warmest
	closed bool

	tls          *tls.Config     // https endpoint; nil: plain TCP
	h2           *http.Transport // HTTP2 endpoints: the client that holds their connections
	healthy      atomic.Bool     // active health checks' verdict (true without checks)
	fails        atomic.Int32    // consecutive failures (passive health)
	ejectedUntil atomic.Int64    // unix ns; passive ejection
}

// Addr is the endpoint's host:port.
func (ep *Endpoint) Addr() string { return ep.addr }

// TLS is the endpoint's client TLS configuration, nil for plain TCP. It
// must not be modified.
func (ep *Endpoint) TLS() *tls.Config { return ep.tls }

// SetHealthy records the active health checks' verdict.
func (ep *Endpoint) SetHealthy(ok bool) { ep.healthy.Store(ok) }

// Healthy is the active health checks' last verdict (true without checks).
func (ep *Endpoint) Healthy() bool { return ep.healthy.Load() }

// Ejected reports whether passive ejection keeps the endpoint out at now.
func (ep *Endpoint) Ejected(now time.Time) bool { return ep.ejectedUntil.Load() > now.UnixNano() }

// Usable reports whether the endpoint is healthy and not ejected.
func (ep *Endpoint) Usable(now time.Time) bool { return ep.Healthy() && !ep.Ejected(now) }

// Busy is the number of connections in use; Idle the pooled ones.
func (ep *Endpoint) Busy() int { return len(ep.busy) }

// Idle is the number of pooled idle connections.
func (ep *Endpoint) Idle() int {
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return len(ep.idle)
}

// Acquire returns a connection with a busy slot held, a pooled one when
// there is one, a new one otherwise; Release gives it back. The wait for a
// slot is bounded by ConnWaitTimeout (ErrBusy).
func (ep *Endpoint) Acquire(now time.Time) (*Conn, error) {
	if err := ep.takeSlot(); err != nil {
		return nil, err
	}
	if c := ep.popIdle(now); c != nil {
		return c, nil
	}
	c, err := ep.dial()
	if err != nil {
		<-ep.busy
		return nil, err
	}
	return c, nil
}

// takeSlot takes a busy slot, waiting at most ConnWaitTimeout (ErrBusy);
// <-ep.busy gives it back.
func (ep *Endpoint) takeSlot() error {
	select {
	case ep.busy <- struct{}{}:
		return nil
	default:
	}
	if ep.s.ConnWaitTimeout <= 0 {
		return ErrBusy
	}
	t := time.NewTimer(ep.s.ConnWaitTimeout)
	defer t.Stop()
	select {
	case ep.busy <- struct{}{}:
		return nil
	case <-t.C:
		return ErrBusy
	}
}

func (ep *Endpoint) popIdle(now time.Time) *Conn {
	ep.mu.Lock()
	for n := len(ep.idle); n > 0; n = len(ep.idle) {
		c := ep.idle[n-1]
		ep.idle[n-1] = nil
		ep.idle = ep.idle[:n-1]
		if now.Sub(c.lastUsed) < ep.s.IdleConnTimeout {
			ep.mu.Unlock()
			c.Reused = true
			return c
		}
		_ = c.Conn.Close()
	}
	ep.mu.Unlock()
	return nil
}

func (ep *Endpoint) dial() (*Conn, error) {
	ep.dials.Inc()
	raw, err := net.DialTimeout("tcp", ep.addr, ep.s.ConnectTimeout)
	if err != nil {
		return nil, dialError(err)
	}
	c := &Conn{Conn: raw, ReadTimeout: ep.s.IOTimeout, WriteTimeout: ep.s.IOTimeout}
	if ep.tls != nil {
		tc := tls.Client(raw, ep.tls)
		_ = tc.SetDeadline(time.Now().Add(ep.s.ConnectTimeout)) // the handshake is part of connecting
		if err := tc.Handshake(); err != nil {
			_ = raw.Close()
			return nil, errors.Join(ErrTLS, err)
		}
		_ = tc.SetDeadline(time.Time{})
		c.Conn, c.tls = tc, tc
	}
	if sc, ok := raw.(syscall.Conn); ok {
		c.raw, _ = sc.SyscallConn() // Alive peeks at the socket itself (under TLS too)
		c.peek, c.peekReady = c.peekQuiet, c.peekReadable
	}
	c.R = bufio.NewReaderSize(c, 16<<10) // also the largest response head accepted
	c.W = bufio.NewWriterSize(c, 16<<10)
	return c, nil
}

// dialError maps a dial failure to a sentinel.
func dialError(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return errors.Join(ErrConnectTimeout, err)
	}
	return errors.Join(ErrConnectRefused, err)
}

// Release hands a connection back: to the pool when reusable, closed
// otherwise. Either way the busy slot is freed.
func (ep *Endpoint) Release(c *Conn, reusable bool, now time.Time) {
	if reusable {
		c.lastUsed = now
		c.Reused = false
		ep.mu.Lock()
		if !ep.closed && len(ep.idle) < ep.s.MaxIdleConnections {
			ep.idle = append(ep.idle, c)
			ep.mu.Unlock()
			<-ep.busy
			return
		}
		ep.mu.Unlock()
	}
	_ = c.Conn.Close()
	<-ep.busy
}

// closeIdle closes pooled connections unused since before cutoff; a zero
// cutoff closes them all and retires the endpoint (after a reload).
func (ep *Endpoint) closeIdle(cutoff time.Time) {
	if ep.h2 != nil {
		if cutoff.IsZero() {
			ep.h2.CloseIdleConnections() // the transport reaps idle ones itself (IdleConnTimeout)
		}
		return
	}
	ep.mu.Lock()
	keep := ep.idle[:0]
	for _, c := range ep.idle {
		if cutoff.IsZero() || c.lastUsed.Before(cutoff) {
			_ = c.Conn.Close()
		} else {
			keep = append(keep, c)
		}
	}
	clear(ep.idle[len(keep):])
	ep.idle = keep
	if cutoff.IsZero() {
		ep.closed = true
	}
	ep.mu.Unlock()
}
