package proxy

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/sidecar-proxy/sidecar/breaker"
	"github.com/sidecar-proxy/sidecar/health"
	"github.com/sidecar-proxy/sidecar/policy"
)

// upstream is the runtime side of a policy.Upstream: its endpoints and their
// connection pools. It outlives a reload when its settings are unchanged.
type upstream struct {
	spec      *policy.Upstream
	endpoints []*endpoint
	next      atomic.Uint32
	m         *upstreamMetrics
	brk       *breaker.Breaker // nil: no circuit breaker
	rejected  *metrics.Counter // bulkhead rejections

	retryMilli atomic.Int64 // retry budget, in thousandths of a retry
	retryEarn  int64        // earned per request
	checker    *health.Checker
}

func newUpstream(spec *policy.Upstream, m *upstreamMetrics, idle time.Duration) *upstream {
	u := &upstream{spec: spec, m: m, retryEarn: int64(spec.RetryBudget * 1000)}
	u.retryMilli.Store(3000) // a few retries allowed before any request has earned them
	for _, ep := range spec.Endpoints {
		e := &endpoint{addr: ep.Addr, spec: spec, idleTimeout: idle, m: m, busy: make(chan struct{}, spec.MaxConnections)}
		if ep.TLS {
			e.tls = spec.TLSConfig.Clone()
			if e.tls.ServerName == "" {
				e.tls.ServerName, _, _ = net.SplitHostPort(ep.Addr) // SNI and verification: the URL's host
			}
		}
		e.healthy.Store(true)
		u.endpoints = append(u.endpoints, e)
	}
	return u
}

// pick returns the endpoint for the next attempt: round-robin or least
// busy among the usable ones (healthy and not ejected), other than avoid;
// when none is usable, any of them (better a chance than a certain error).
func (u *upstream) pick(avoid *endpoint, now time.Time) *endpoint {
	n := len(u.endpoints)
	if n == 1 {
		return u.endpoints[0]
	}
	start := int(u.next.Add(1) - 1)
	var best *endpoint
	for i := 0; i < n; i++ {
		ep := u.endpoints[(start+i)%n]
		if ep == avoid || !ep.usable(now) {
			continue
		}
		if !u.spec.LeastConnections {
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

// usableCount is how many endpoints are healthy and not ejected.
func (u *upstream) usableCount(now time.Time) int {
	c := 0
	for _, ep := range u.endpoints {
		if ep.usable(now) {
			c++
		}
	}
	return c
}

// retryToken spends one retry from the budget: every request earns
// RetryBudget of a retry, so retries stay within that share of requests
// (plus a small allowance at start), and never multiply an outage.
func (u *upstream) retryToken() bool {
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

func (u *upstream) earnRetry() {
	if t := u.retryMilli.Add(u.retryEarn); t > retryTokenCap {
		u.retryMilli.Store(retryTokenCap)
	}
}

const retryTokenCap = 10_000 // at most 10 retries saved up

// outcome feeds passive health: consecutive failures eject an endpoint.
func (u *upstream) outcome(ep *endpoint, failed bool, now time.Time, log func(string, ...any)) {
	if u.spec.PassiveFailures <= 0 {
		return
	}
	if !failed {
		ep.fails.Store(0)
		return
	}
	if int(ep.fails.Add(1)) >= u.spec.PassiveFailures {
		ep.fails.Store(0)
		ep.ejectedUntil.Store(now.Add(u.spec.PassiveEjection).UnixNano())
		log("endpoint ejected after consecutive failures", "upstream", u.spec.Name, "endpoint", ep.addr,
			"failures", u.spec.PassiveFailures, "for", u.spec.PassiveEjection.String())
	}
}

func (u *upstream) closeIdle() {
	for _, ep := range u.endpoints {
		ep.closeIdle(time.Time{})
	}
	if u.checker != nil {
		u.checker.Stop()
	}
}

// endpoint is one address of an upstream with its pool of keep-alive
// connections. busy is a semaphore: one slot per connection in use, so at
// most spec.MaxConnections requests hold a connection at once.
type endpoint struct {
	addr        string
	spec        *policy.Upstream
	idleTimeout time.Duration // per-read/write progress timeout (server.idle_timeout)
	m           *upstreamMetrics
	busy        chan struct{}

	mu     sync.Mutex
	idle   []*upConn // LIFO: the most recently used connection is the warmest
	closed bool

	tls          *tls.Config  // https endpoint; nil: plain TCP
	healthy      atomic.Bool  // active health checks' verdict (true without checks)
	fails        atomic.Int32 // consecutive failures (passive health)
	ejectedUntil atomic.Int64 // unix ns; passive ejection
}

func (ep *endpoint) usable(now time.Time) bool {
	return ep.healthy.Load() && ep.ejectedUntil.Load() <= now.UnixNano()
}

// acquire returns a connection with a busy slot held: a pooled one when
// there is one, a new one otherwise. wait bounds the wait for a slot.
func (ep *endpoint) acquire(now time.Time) (*upConn, error) {
	select {
	case ep.busy <- struct{}{}:
	default:
		if ep.spec.ConnWaitTimeout <= 0 {
			return nil, ErrUpstreamBusy
		}
		t := time.NewTimer(ep.spec.ConnWaitTimeout)
		select {
		case ep.busy <- struct{}{}:
			t.Stop()
		case <-t.C:
			return nil, ErrUpstreamBusy
		}
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

func (ep *endpoint) popIdle(now time.Time) *upConn {
	ep.mu.Lock()
	for n := len(ep.idle); n > 0; n = len(ep.idle) {
		c := ep.idle[n-1]
		ep.idle[n-1] = nil
		ep.idle = ep.idle[:n-1]
		if now.Sub(c.lastUsed) < ep.spec.IdleConnTimeout {
			ep.mu.Unlock()
			c.reused = true
			return c
		}
		_ = c.Conn.Close()
	}
	ep.mu.Unlock()
	return nil
}

func (ep *endpoint) dial() (*upConn, error) {
	ep.m.dials.Inc()
	raw, err := net.DialTimeout("tcp", ep.addr, ep.spec.ConnectTimeout)
	if err != nil {
		return nil, classifyDialErr(err)
	}
	c := &upConn{Conn: raw, ep: ep}
	if ep.tls != nil {
		tc := tls.Client(raw, ep.tls)
		_ = tc.SetDeadline(time.Now().Add(ep.spec.ConnectTimeout)) // the handshake is part of connecting
		if err := tc.Handshake(); err != nil {
			_ = raw.Close()
			return nil, errors.Join(ErrUpstreamTLS, err)
		}
		_ = tc.SetDeadline(time.Time{})
		c.Conn = tc
	} else if sc, ok := raw.(syscall.Conn); ok {
		c.raw, _ = sc.SyscallConn() // plain TCP only: readAfterWait reads the socket itself
	}
	c.br = bufio.NewReaderSize(c, 16<<10) // also the largest response head accepted
	c.bw = bufio.NewWriterSize(c, 16<<10)
	return c, nil
}

// release hands a connection back: to the pool when reusable, closed
// otherwise. Either way the busy slot is freed.
func (ep *endpoint) release(c *upConn, reusable bool, now time.Time) {
	if reusable {
		c.lastUsed = now
		c.reused = false
		ep.mu.Lock()
		if !ep.closed && len(ep.idle) < ep.spec.MaxIdleConnections {
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
func (ep *endpoint) closeIdle(cutoff time.Time) {
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

// upConn is one upstream connection. Its Read and Write keep a deadline
// ahead of them, which turns fasthttp-style absolute timeouts into progress
// timeouts: a transfer that keeps moving is never cut, a stalled one is cut
// after readTimeout/writeTimeout.
type upConn struct {
	net.Conn
	ep       *endpoint
	br       *bufio.Reader
	bw       *bufio.Writer
	lastUsed time.Time
	reused   bool

	// readTimeout is the response timeout while waiting for the head, then
	// the idle timeout while the body streams. Only the goroutine that
	// reads sets it; it takes effect at the next network read.
	readTimeout   time.Duration
	writeTimeout  time.Duration
	readDeadline  time.Time // as last set on the socket; zero: unknown
	writeDeadline time.Time

	raw        syscall.RawConn // nil if the conn has none
	awaitReply bool            // a request was just flushed: see readAfterWait
	// probeOnReuse: the last response had no body (HEAD, 204, 304), so a
	// broken upstream may still send one; check the connection is quiet
	// before the next request goes on it.
	probeOnReuse bool
}

// rearm reports whether a deadline armed at armed with timeout d should be
// pushed forward; re-arming on every call would cost a timer update per
// read, so it happens once d/8 has passed.
func rearm(now, armed time.Time, d time.Duration) bool {
	return now.Sub(armed) > d>>3
}

// drifted reports whether the deadline on the socket (cur) is more than
// d/8 away from the one wanted, either way. Setting a deadline costs a
// timer update under a lock; on a busy connection this keeps it to one
// every d/8 instead of one per read, at the price of stall detection
// within 1/8 of the timeout.
func drifted(cur, want time.Time, d time.Duration) bool {
	diff := want.Sub(cur)
	return diff > d>>3 || diff < -(d>>3)
}

func (c *upConn) Read(p []byte) (int, error) {
	if now := time.Now(); drifted(c.readDeadline, now.Add(c.readTimeout), c.readTimeout) {
		c.readDeadline = now.Add(c.readTimeout)
		_ = c.Conn.SetReadDeadline(c.readDeadline)
	}
	if c.awaitReply && c.raw != nil {
		c.awaitReply = false
		return c.readAfterWait(p)
	}
	return c.Conn.Read(p)
}

// readAfterWait reads the first bytes of a reply. Right after a request
// was written the reply cannot be there yet, so a plain read would cost a
// syscall that only says EAGAIN before the goroutine parks; instead, park
// first (the runtime's poller wakes us when the socket is readable, or at
// the read deadline), then read once.
func (c *upConn) readAfterWait(p []byte) (n int, err error) {
	waited := false
	rerr := c.raw.Read(func(fd uintptr) bool {
		if !waited {
			waited = true
			return false // not ready: wait for readability
		}
		n, err = syscall.Read(int(fd), p)
		if err == syscall.EAGAIN {
			return false
		}
		if err == syscall.EINTR {
			return false
		}
		return true
	})
	switch {
	case rerr != nil:
		return 0, rerr
	case err != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", err)}
	case n == 0 && len(p) > 0:
		return 0, io.EOF
	}
	return n, nil
}

func (c *upConn) Write(p []byte) (int, error) {
	if now := time.Now(); drifted(c.writeDeadline, now.Add(c.writeTimeout), c.writeTimeout) {
		c.writeDeadline = now.Add(c.writeTimeout)
		_ = c.Conn.SetWriteDeadline(c.writeDeadline)
	}
	return c.Conn.Write(p)
}

// alive reports whether a pooled connection still looks open and quiet:
// nothing to read yet means yes; EOF, a reset or unsolicited bytes mean the
// upstream closed it while idle or is out of sync. It peeks (MSG_PEEK,
// MSG_DONTWAIT) rather than reading under a past deadline, which Go
// answers with a timeout before looking at the socket at all.
func (c *upConn) alive() bool {
	if c.br.Buffered() > 0 {
		return false // unsolicited bytes: the connection is out of sync
	}
	if c.raw == nil {
		return true // TLS: a timed-out read is not a probe to make on it
	}
	c.readDeadline = time.Time{} // an expired deadline fails raw reads too; Read re-arms
	_ = c.Conn.SetReadDeadline(c.readDeadline)
	quiet := false
	err := c.raw.Read(func(fd uintptr) bool {
		var b [1]byte
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		quiet = err == syscall.EAGAIN
		return true // one look, never wait
	})
	return err == nil && quiet
}
