package proxy

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/admission"
	"github.com/sidecar-proxy/sidecar/breaker"
	"github.com/sidecar-proxy/sidecar/policy"
	"github.com/sidecar-proxy/sidecar/upstream"
)

// syncBodyLimit is the largest Content-Length body written on the handler
// goroutine before the response is read. Anything this small fits in the
// upstream socket's buffers, so the write cannot block on an upstream that
// answers early; larger and chunked bodies are pumped by a goroutine while
// the handler reads the response (full duplex).
const syncBodyLimit = 64 << 10

// copyBufSize is the buffer for body copies in both directions (and the
// chunk size for chunked responses).
const copyBufSize = 32 << 10

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// exchange is one request's trip through the proxy. It is pooled, and it
// is the response body stream fasthttp reads after the handler returns:
// its CloseWithError ends the exchange (connection back to the pool,
// metrics recorded). Nothing here is touched by another request.
//
// What one request sets is in r, reset by assignment on release; the
// exchange itself keeps only what outlives a request: buffers whose
// storage is reused, the response object (fasthttp.Response must not be
// copied), the pump's channel and flags (atomics), and gen.
type exchange struct {
	p    *Proxy
	r    request
	resp fasthttp.Response

	// Buffers reused from request to request (reset to length 0).
	reqID    []byte
	scratch  []byte
	method   []byte
	clientID []byte
	req      admission.Request  // the view admission decides on (views into the head)
	dec      admission.Decision // what it decided
	fwd      forwardedIn        // a trusted peer's X-Forwarded-*, copied before stripping

	pumpDone  chan error  // the pump goroutine's result
	clientEOF atomic.Bool // the pump read the client's body to its end
	awaiting  atomic.Bool // waiting for the response head: uploads extend its deadline
	gen       uint64      // incremented on release: tells a stale reference
}

// request is one request's state in an exchange; its zero value is a
// fresh request.
type request struct {
	ctx    *fasthttp.RequestCtx
	st     *state
	srv    *policy.Server
	rt     *routeRuntime
	ep     *upstream.Endpoint
	conn   *upstream.Conn
	start  time.Time
	http11 bool

	// Request body.
	body     io.Reader // the client's body stream; nil without a body
	bodyLen  int       // Content-Length, or -1 for chunked
	first    []byte    // chunked bodies: the first read, taken before dialing
	firstEOF bool
	firstBuf *[]byte
	pumpErr  error // the pump's result, once joined
	sent     int64 // body bytes written upstream (pump: read after join)

	rl        decision // the rate-limit decision, for the response headers
	tier      string   // the client's tier, once identified (from config or a verified token)
	peer      netip.Addr
	badTarget bool // a request target that cannot be honoured (400): see originForm, state.match

	upStart  time.Time        // the first attempt upstream began
	upEnd    time.Time        // the upstream's part ended (response complete, or failed)
	up       *upstreamRuntime // where the request goes: the route's, or its fallback
	ticket   breaker.Ticket   // the bulkhead slot and circuit verdict, if the upstream has a breaker
	pumped   bool             // a pump started: body bytes may have gone upstream
	fallback string           // X-Sidecar-Fallback of this response, if any

	// Response body.
	stream     io.Reader
	direct     bool   // WriteTo writes to the client socket itself (see respond)
	pending    []byte // body bytes read ahead to validate framing, served first
	pendingBuf *[]byte
	pendingEOF bool
	bodyEOF    bool
	bytesOut   int64
	writeArmed time.Time
	status     int
	upErr      error
	done       bool
	handedOff  bool // fasthttp writes the body (CloseWithError) or runs a hijack: they release
}

var exchangePool = sync.Pool{New: func() any { return &exchange{pumpDone: make(chan error, 1)} }}

// Handler is the proxy's fasthttp.RequestHandler.
func (p *Proxy) Handler(ctx *fasthttp.RequestCtx) {
	p.m.inFlight.Add(1)
	x := exchangePool.Get().(*exchange)
	x.p, x.r.ctx, x.r.start = p, ctx, ctx.Time() // set by the server as the head arrived
	gen := x.gen
	defer func() {
		if r := recover(); r != nil {
			p.recovered(ctx, x, gen, r)
		}
	}()
	x.serve()
	// The exchange outlives the handler only when fasthttp still has to
	// write its body (CloseWithError ends it) or runs a hijack (a tunnel,
	// a close-delimited body): they release it. Otherwise it ends here,
	// and nothing before this line has to fear that it was recycled.
	if !x.r.handedOff {
		x.release()
	}
}

// recovered turns a panic in the request path into a 500 and keeps the
// process serving. The exchange is dropped, not pooled: its state is
// unknown.
func (p *Proxy) recovered(ctx *fasthttp.RequestCtx, x *exchange, gen uint64, r any) {
	p.m.panics.Inc()
	var reqID []byte
	idHeader := policy.DefaultRequestIDHeader
	if x.gen == gen { // not yet released: it is ours to clean up
		reqID = append(reqID, x.reqID...)
		idHeader = x.idHeader()
		if x.r.conn != nil {
			_ = x.r.conn.Conn.Close()
		}
		if !x.r.done {
			x.r.done = true
			p.m.inFlight.Add(-1)
		}
	}
	p.log.Error("panic in request path recovered", "panic", fmt.Sprint(r), "request_id", string(reqID),
		"stack", string(debug.Stack()))
	writeError(ctx, fasthttp.StatusInternalServerError, "internal error", reqID, idHeader)
	ctx.SetConnectionClose()
}

func (x *exchange) idHeader() string {
	if x.r.srv == nil {
		return policy.DefaultRequestIDHeader
	}
	return x.r.srv.RequestIDHeader
}

// testHookServe, when set by a test, runs at the start of every request.
var testHookServe func(*fasthttp.RequestCtx)

// begin loads the policy and the request's identity for the exchange.
func (x *exchange) begin() {
	x.r.st = x.p.state.Load()
	x.r.srv = &x.r.st.snap.Server
	h := &x.r.ctx.Request.Header
	if id := h.Peek(x.r.srv.RequestIDHeader); validRequestID(id) {
		x.reqID = append(x.reqID[:0], id...)
	} else {
		x.reqID = x.p.ids.next(x.reqID[:0])
	}
	x.method = append(x.method[:0], h.Method()...)
	x.r.http11 = h.IsHTTP11()
	x.r.peer = peerAddr(x.r.ctx)
	x.fwd.trusted = x.r.peer.IsValid() && x.r.srv.Trusted(x.r.peer)
	if x.r.badTarget = !originForm(&x.r.ctx.Request); x.r.badTarget {
		return // x.r.rt stays nil; serve answers 400
	}
	var err error
	x.r.rt, err = x.r.st.match(x.r.ctx, &x.req)
	x.r.badTarget = errors.Is(err, admission.ErrAmbiguousPath)
}

func (x *exchange) serve() {
	ctx := x.r.ctx
	h := &ctx.Request.Header
	x.begin()
	if testHookServe != nil {
		testHookServe(ctx)
	}
	if !checkRawHeaders(h) || x.r.badTarget {
		x.p.m.badReqs.Inc()
		x.fail(ErrBadRequest)
		ctx.SetConnectionClose()
		return
	}
	if x.r.rt == nil {
		x.fail(ErrNoRoute)
		return
	}
	upgrade, ok := x.r.st.upgrade(h)
	if !ok {
		x.fail(ErrUpgradeRefused)
		return
	}
	if !x.limit(h) {
		return
	}
	x.r.up = x.r.rt.up
	if !x.admit() {
		return
	}
	cl := h.ContentLength()
	if x.r.srv.MaxBodyBytes > 0 && int64(cl) > x.r.srv.MaxBodyBytes {
		x.fail(ErrBodyTooLarge)
		return
	}
	if cl > 0 || cl == -1 {
		x.r.body, x.r.bodyLen = ctx.RequestBodyStream(), cl
		// The server armed header_timeout for the head; the body is
		// governed by the idle timeout from here on.
		_ = ctx.SetReadDeadline(x.r.start.Add(x.r.srv.IdleTimeout))
		if cl == -1 {
			// Read the first chunk before anything goes upstream, so a
			// malformed chunked body is refused with nothing forwarded.
			x.r.firstBuf = copyBufPool.Get().(*[]byte)
			// Read where the chunk framing of copyBody wants the data.
			n, err := io.ReadAtLeast(x.r.body, (*x.r.firstBuf)[upstream.ChunkRoom:len(*x.r.firstBuf)-2], 1)
			x.r.first = (*x.r.firstBuf)[upstream.ChunkRoom : upstream.ChunkRoom+n]
			switch {
			case err == io.EOF || (err == nil && n == 0):
				x.r.firstEOF = true
				if len(h.Peek(fasthttp.HeaderTrailer)) > 0 {
					// The body ended at once, with a trailer section that
					// fasthttp parsed into the head's trailer store: it would
					// reach the upstream as head fields, past every check
					// above. Request trailers are never forwarded (RFC 9110
					// §6.5 lets a proxy drop them); with no body to stream
					// ahead of them, refusing is the safe answer.
					x.p.m.badReqs.Inc()
					x.fail(ErrBadRequest)
					ctx.SetConnectionClose()
					return
				}
			case err != nil:
				x.fail(fmt.Errorf("%w: %w", ErrClientBody, err))
				ctx.SetConnectionClose()
				return
			}
			if x.r.srv.MaxBodyBytes > 0 && int64(n) > x.r.srv.MaxBodyBytes {
				x.fail(ErrBodyTooLarge)
				ctx.SetConnectionClose()
				return
			}
		}
	}

	x.prepareRequest(h, cl, upgrade)
	x.forward(upgrade)
}

// forward sends the request to x.r.up and answers with its response, or
// with the upstream's fallback when it fails. A request that could not
// connect is retried once on another endpoint, and an idempotent one
// without a body up to `retries` times after a timeout or reset, all
// within the upstream's retry budget.
func (x *exchange) forward(upgrade []byte) {
	ctx, h := x.r.ctx, &x.r.ctx.Request.Header
	x.r.up.pool.EarnRetry()
	if x.r.upStart.IsZero() {
		x.r.upStart = time.Now()
	}
	x.r.ep = x.r.up.pool.Pick(nil, time.Now())
	for attempt := 0; ; attempt++ {
		if x.r.up.spec.RewriteHost || len(h.Host()) == 0 {
			h.SetHost(x.r.ep.Addr()) // HTTP/1.1 upstreams require a Host; HTTP/1.0 clients may omit it
		}
		err := x.roundTrip()
		if err == nil {
			break
		}
		x.r.up.m.errorInc(err)
		clientSide := errors.Is(err, ErrClientBody) || errors.Is(err, ErrBodyTooLarge) || errors.Is(err, ErrClientGone)
		upstreamFault := !clientSide && !errors.Is(err, ErrUpstreamBusy) // a full pool is not the upstream's fault
		if upstreamFault {
			x.r.up.outcome(x.r.ep, true, time.Now(), x.p.log.Warn)
			if x.retryable(err, attempt) {
				x.r.up.m.retries.Inc()
				x.r.ep = x.r.up.pool.Pick(x.r.ep, time.Now())
				continue
			}
			x.r.ticket.Report(true, time.Now())
		}
		if !clientSide && x.r.up.spec.Fallback != nil {
			x.serveFallback(fallbackReason(err), 0)
			return
		}
		x.fail(err)
		if x.r.body != nil {
			ctx.SetConnectionClose() // the body may be partly read
		}
		return
	}
	status := x.resp.StatusCode()
	failed := failureStatus(x.r.up.spec, status)
	x.r.up.outcome(x.r.ep, failed, time.Now(), x.p.log.Warn)
	if x.r.up.spec.Breaker != nil {
		x.r.ticket.Report(failed, time.Now())
	}
	x.respond(upgrade)
}

// failureStatus: the breaker's failure statuses, or 502, 503 and 504.
func failureStatus(u *policy.Upstream, status int) bool {
	if u.Breaker != nil {
		return u.Breaker.Failure(status)
	}
	return status == 502 || status == 503 || status == 504
}

// retryable decides whether a failed attempt may go to another endpoint:
// nothing may be replayed half-sent, and the budget must allow it.
func (x *exchange) retryable(err error, attempt int) bool {
	if len(x.r.up.pool.Endpoints()) < 2 {
		return false
	}
	connect := errors.Is(err, ErrConnectRefused) || errors.Is(err, ErrConnectTimeout)
	switch {
	case connect && attempt == 0 && x.r.sent == 0 && !x.r.pumped:
	case attempt < x.r.up.spec.Retries && x.r.body == nil && idempotent(x.method) &&
		(connect || errors.Is(err, ErrResponseTimeout) || errors.Is(err, ErrUpstreamReset)):
	default:
		return false
	}
	return x.r.up.pool.RetryToken()
}

// idempotent methods (RFC 9110 §9.2.2) may be sent again.
func idempotent(m []byte) bool {
	switch string(m) {
	case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE":
		return true
	}
	return false
}

// prepareRequest rewrites the client's request head in place into the one
// sent upstream. What the sidecar writes itself (X-Forwarded-*, the
// verified identity, the request id) is written last, after every client
// copy of those fields and every hop-by-hop field is gone: nothing the
// client sends, names in Connection or spells with '_' can remove, repeat
// or forge them.
func (x *exchange) prepareRequest(h *fasthttp.RequestHeader, cl int, upgrade []byte) {
	if x.fwd.trusted {
		x.fwd.capture(h)
	}
	x.scratch = stripRequest(h, x.r.st.filter, x.fwd.trusted, x.scratch)
	h.Del("Expect") // 100-continue was answered by the server already
	if upgrade != nil {
		h.Set("Connection", "Upgrade")
		h.SetBytesV("Upgrade", upgrade)
	}
	h.SetProtocol("HTTP/1.1")       // keep-alive and chunking upstream, whatever the client spoke
	h.SetNoDefaultContentType(true) // no Content-Type that neither side sent
	x.scratch = setForwardedHeaders(x.r.ctx, &x.fwd, x.r.peer, x.scratch)
	id := &x.r.st.snap.Identity
	h.SetBytesV(id.ClientHeader, x.clientID)
	h.Set(id.TierHeader, x.r.tier)
	h.SetBytesV(x.r.srv.RequestIDHeader, x.reqID)
	if cl >= -1 {
		h.SetContentLength(cl) // regenerates framing: Content-Length, or chunked
	}
	h.ResetConnectionClose()
}

// roundTrip sends the request head (and body, or starts the pump) and
// reads the response head into x.resp.
func (x *exchange) roundTrip() error {
	up := x.r.up.spec
	for attempt := 0; ; attempt++ {
		now := time.Now()
		c, err := x.r.ep.Acquire(now)
		if err != nil {
			return err
		}
		if c.Reused && !c.Alive() {
			// Every pooled connection is looked at before use (one
			// non-blocking peek): one the upstream closed while idle
			// would cost a body that cannot be replayed, and one it wrote
			// to unasked is out of step — its next "response" would be
			// another client's (RFC 9112 §9.3).
			x.r.ep.Release(c, false, now)
			if attempt < 3 {
				continue
			}
			return ErrUpstreamReset
		}
		x.r.conn = c
		// Both take effect lazily, at the next network read or write.
		c.WriteTimeout, c.ReadTimeout = x.r.srv.IdleTimeout, up.ResponseTimeout

		err = x.r.ctx.Request.Header.Write(c.W)
		started := false
		if err == nil {
			switch {
			case x.r.body == nil:
				err = c.W.Flush()
			case x.r.bodyLen >= 0 && x.r.bodyLen <= syncBodyLimit:
				started = true
				err = x.copyBody(c)
				if errors.Is(err, ErrClientBody) || errors.Is(err, ErrBodyTooLarge) {
					x.abandonConn()
					return err
				}
			default:
				started = true
				x.awaiting.Store(true)
				x.startPump(c)
			}
		}
		if err != nil {
			if c.Reused && !started && attempt == 0 {
				x.abandonConn()
				continue // stale keep-alive connection: nothing was sent yet
			}
			x.abandonConn()
			return classifyReadErr(err)
		}

		c.AwaitReply = x.pumpDone == nil && c.R.Buffered() == 0
		x.resp.StreamBody = true
		x.resp.SkipBody = string(x.method) == "HEAD"
		x.resp.Header.SetNoDefaultContentType(true)
		err = x.readResponse(c)
		x.awaiting.Store(false)
		if x.pumpDone != nil {
			c.ForgetReadDeadline() // the pump may have moved it
		}
		if err == nil {
			return nil
		}
		if x.pumpDone != nil {
			// The pump may be what failed (client gone, body too large):
			// stop it and report its error rather than the symptom.
			x.abortPump()
			if errors.Is(x.r.pumpErr, ErrClientBody) || errors.Is(x.r.pumpErr, ErrBodyTooLarge) {
				x.abandonConn()
				return x.r.pumpErr
			}
		}
		if errors.Is(err, ErrClientGone) {
			x.abortPump()
			x.abandonConn()
			return err
		}
		retry := c.Reused && x.r.body == nil && attempt == 0 && errors.Is(err, io.EOF)
		x.abandonConn()
		if retry {
			continue
		}
		return classifyReadErr(err)
	}
}

// readResponse reads the upstream's response head into x.resp and sets up
// its body stream. Interim responses are relayed to the client as they
// come, in order (RFC 9110 §15.2: a proxy MUST forward 1xx responses),
// except 100 Continue, which the sidecar's own server answered when the
// client asked for it (Expect is not forwarded), and 101, which is the
// final response of an upgrade. HTTP/1.0 clients get none (RFC 9110
// §15.2: a server must not send them a 1xx).
func (x *exchange) readResponse(c *upstream.Conn) error {
	return c.ReadResponse(&x.resp, func(h *fasthttp.ResponseHeader) error {
		if h.StatusCode() == fasthttp.StatusContinue || !x.r.http11 {
			return nil
		}
		if err := x.relayInterim(); err != nil {
			return fmt.Errorf("%w: %w", ErrClientGone, err)
		}
		return nil
	})
}

// relayInterim writes the interim response in x.resp.Header to the client,
// without its hop-by-hop fields. fasthttp has no interim-response writer
// beyond Early Hints' Link fields, so this writes to the connection the
// way its EarlyHints does: nothing of this request's response is buffered
// yet.
func (x *exchange) relayInterim() error {
	h := &x.resp.Header
	x.scratch = stripResponseHop(h, x.scratch)
	b := append(x.scratch[:0], "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(h.StatusCode()), 10)
	b = append(b, ' ')
	if msg := h.StatusMessage(); len(msg) > 0 {
		b = append(b, msg...)
	} else {
		b = append(b, fasthttp.StatusMessage(h.StatusCode())...)
	}
	b = append(b, crlf...)
	for k, v := range h.All() {
		if string(k) == fasthttp.HeaderContentLength {
			continue // an interim response has no content (RFC 9110 §15.2)
		}
		b = append(append(append(append(b, k...), ": "...), v...), crlf...)
	}
	b = append(b, crlf...)
	x.scratch = b
	_ = x.r.ctx.Conn().SetWriteDeadline(time.Now().Add(x.r.srv.IdleTimeout))
	_, err := x.r.ctx.Conn().Write(b)
	return err
}

// abandonConn closes the upstream connection and frees its slot.
func (x *exchange) abandonConn() {
	if x.r.conn != nil {
		x.resp.CloseBodyStream() //nolint:errcheck // releases fasthttp's stream before its reader goes
		x.r.ep.Release(x.r.conn, false, time.Now())
		x.r.conn = nil
	}
}

func (x *exchange) startPump(c *upstream.Conn) {
	x.r.pumped = true
	go func() {
		err := x.copyBody(c)
		if err != nil && (errors.Is(err, ErrClientBody) || errors.Is(err, ErrBodyTooLarge)) {
			// The upstream waits for body bytes that will never come:
			// unblock the handler's read of the response head.
			_ = c.Conn.Close()
		}
		x.pumpDone <- err
	}()
	x.r.pumpErr = errPumpRunning
}

var errPumpRunning = errors.New("pump running")

// joinPump waits for the pump if one ran. If the client has not finished
// its upload (the upstream answered early), the upload is cut: the client's
// read deadline is moved to now and the upstream connection closed.
func (x *exchange) joinPump() {
	if x.r.pumpErr != errPumpRunning {
		return
	}
	if !x.clientEOF.Load() {
		x.abortPump()
		return
	}
	x.r.pumpErr = <-x.pumpDone
}

func (x *exchange) abortPump() {
	if x.r.pumpErr != errPumpRunning {
		return
	}
	_ = x.r.ctx.SetReadDeadline(time.Now())
	if x.r.conn != nil {
		_ = x.r.conn.Conn.SetWriteDeadline(time.Now())
	}
	x.r.pumpErr = <-x.pumpDone
	if x.r.pumpErr == nil {
		return
	}
	x.r.ctx.SetConnectionClose()
}

// copyBody streams the client's body upstream: Content-Length bodies as
// they are, others re-chunked. Client-side failures are wrapped in
// ErrClientBody, so callers can tell them from upstream ones.
func (x *exchange) copyBody(c *upstream.Conn) error {
	bufp := x.r.firstBuf
	if bufp == nil {
		bufp = copyBufPool.Get().(*[]byte)
	}
	x.r.firstBuf = nil
	defer copyBufPool.Put(bufp)
	first := len(x.r.first)
	x.r.first = nil // it aliases the buffer
	limit, idle := x.r.srv.MaxBodyBytes, x.r.srv.IdleTimeout
	var armed time.Time
	sent, err := c.SendBody(x.r.body, *bufp, first, x.r.firstEOF, x.r.bodyLen < 0, func(total int64, eof bool) error {
		if eof {
			x.clientEOF.Store(true)
			return nil
		}
		if limit > 0 && total > limit {
			return ErrBodyTooLarge
		}
		if now := time.Now(); rearm(now, armed, idle) {
			armed = now
			_ = x.r.ctx.SetReadDeadline(now.Add(idle))
			if x.awaiting.Load() {
				// Upload progress counts as progress for the response
				// timeout too: a long upload is not a slow upstream.
				_ = c.Conn.SetReadDeadline(now.Add(x.r.up.spec.ResponseTimeout))
			}
		}
		return nil
	})
	x.r.sent += sent
	return err
}

var (
	http11 = []byte("HTTP/1.1")
	http10 = []byte("HTTP/1.0")
	crlf   = []byte("\r\n")
)

// respond turns the upstream response head into the client's response and
// hands the body stream to fasthttp.
func (x *exchange) respond(upgrade []byte) {
	ctx := x.r.ctx
	r := &x.resp
	x.r.status = r.StatusCode()
	if x.r.status == fasthttp.StatusSwitchingProtocols {
		if upgrade == nil {
			x.r.up.m.errorInc(ErrUpstreamProto)
			x.abortPump()
			x.abandonConn()
			x.fail(ErrUpstreamProto)
			return
		}
		x.tunnel()
		return
	}
	r.Header.CopyTo(&ctx.Response.Header)
	rh := &ctx.Response.Header
	// The client gets the version it spoke, not the upstream's: an
	// HTTP/1.0 upstream's answer goes to an HTTP/1.1 client as HTTP/1.1,
	// with framing regenerated for it (RFC 9112 §6.1).
	if x.r.http11 {
		rh.SetProtocol(http11)
	} else {
		rh.SetProtocol(http10)
	}
	x.scratch = stripResponseHop(rh, x.scratch)
	rh.ResetConnectionClose()
	rh.SetBytesV(x.r.srv.RequestIDHeader, x.reqID)
	x.rateLimitHeaders(rh)
	if x.r.fallback != "" {
		rh.Set("X-Sidecar-Fallback", x.r.fallback)
	}

	stream := r.BodyStream()
	if stream == nil { // HEAD, 1xx, 204, 304: no body
		x.r.bodyEOF = true
		x.finish(nil)
		return
	}
	x.r.stream = stream
	cl := r.Header.ContentLength()
	if cl == -1 && x.r.conn.R.Buffered() > 0 {
		// The first chunk came with the head: decode it now, so that a
		// response with broken chunking becomes a 502 instead of a 200
		// cut short. (Later chunks can only be cut: the head is out.)
		x.r.pendingBuf = copyBufPool.Get().(*[]byte)
		n, err := stream.Read(*x.r.pendingBuf)
		if err != nil && err != io.EOF {
			x.r.up.m.errorInc(ErrUpstreamProto)
			ctx.Response.Header.Reset()
			x.abortPump()
			x.abandonConn()
			x.fail(ErrUpstreamProto)
			return
		}
		x.r.pending, x.r.pendingEOF = (*x.r.pendingBuf)[:n], err == io.EOF
	}
	if cl >= 0 && cl <= bufferBodyLimit && cl <= x.r.conn.R.Buffered() {
		x.bufferBody(cl)
		return
	}
	switch {
	case cl < 0 && !x.r.http11:
		x.closeDelimited() // HTTP/1.0 clients cannot take chunked framing
		return
	case cl < 0:
		cl = -1
		// Streams (SSE) show their head at once; when the first chunk came
		// with the head, it goes out with it in the same write.
		ctx.Response.ImmediateHeaderFlush = len(x.r.pending) == 0 && !x.r.pendingEOF
	default:
		// A large Content-Length body: fasthttp would hold what arrives in
		// its 32 KiB write buffer until it fills, so a slow stream would
		// reach the client late, and a cut one not at all. Flush the head
		// now and write the body to the socket as it comes.
		x.r.direct = true
		ctx.Response.ImmediateHeaderFlush = true
	}
	x.r.handedOff = true // fasthttp writes the body and calls CloseWithError
	ctx.Response.SetBodyStream(x, cl)
}

// bufferBodyLimit is the largest Content-Length body read whole before the
// response goes out, as NGINX's proxy_buffering does: the upstream
// connection is free again at once (a slow client no longer holds it), head
// and body leave in one write, and a body cut short becomes a 502 instead
// of a truncated 200. Larger bodies stream.
const bufferBodyLimit = 64 << 10

// bufferBody reads a small body into the client's response and ends the
// upstream exchange before the client is written to.
func (x *exchange) bufferBody(cl int) {
	ctx := x.r.ctx
	bufp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bufp)
	buf := *bufp
	for {
		n, err := x.Read(buf)
		ctx.Response.AppendBody(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			x.r.up.m.errorInc(ErrUpstreamReset)
			x.r.upErr = nil // counted once, as the failure it caused
			ctx.Response.Header.Reset()
			x.abortPump()
			x.abandonConn()
			x.fail(ErrUpstreamReset)
			return
		}
	}
	x.finish(nil)
}

// Read implements io.Reader for fasthttp, which copies the upstream body
// to the client by calling it: one read upstream per write downstream, so
// a slow client slows the upstream read (backpressure). It re-arms the
// client's write deadline as data moves.
func (x *exchange) Read(p []byte) (int, error) {
	if now := time.Now(); rearm(now, x.r.writeArmed, x.r.srv.IdleTimeout) {
		x.r.writeArmed = now
		_ = x.r.ctx.SetWriteDeadline(now.Add(x.r.srv.IdleTimeout))
	}
	if len(x.r.pending) > 0 {
		n := copy(p, x.r.pending)
		x.r.pending = x.r.pending[n:]
		x.r.bytesOut += int64(n)
		return n, nil
	}
	if x.r.pendingEOF {
		x.r.bodyEOF = true
		return 0, io.EOF
	}
	x.r.conn.ReadTimeout = x.r.srv.IdleTimeout // the body streams under the idle timeout
	n, err := x.r.stream.Read(p)
	x.r.bytesOut += int64(n)
	switch {
	case err == io.EOF:
		x.r.bodyEOF = true
		x.r.upEnd = time.Now()
	case err != nil:
		x.r.upErr = classifyReadErr(err)
	}
	return n, err
}

// chunkFraming is the most a chunk's framing adds to its data: a size line
// of up to 8 hex digits, and two CRLFs.
const chunkFraming = 8 + 2 + 2

// SupportsBodyWriteTo opts in to WriteTo (see fasthttp.BodyWriterTo): the
// chunked path then frames 32 KiB chunks instead of 4 KiB ones.
func (x *exchange) SupportsBodyWriteTo() bool { return true }

// WriteTo copies the body to w through a pooled buffer, or, for a
// Content-Length body still arriving, straight to the client socket.
func (x *exchange) WriteTo(w io.Writer) (int64, error) {
	if x.r.direct {
		w = x.r.ctx.Conn() // the head was flushed (ImmediateHeaderFlush): order is kept
	}
	bufp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bufp)
	buf := *bufp
	if !x.r.direct {
		// fasthttp frames each write as a chunk (size line, data, CRLF) in
		// its write buffer, which is copyBufSize too: leave room for the
		// framing, or every full read costs a second write of 8 bytes.
		buf = buf[:copyBufSize-chunkFraming]
	}
	var total int64
	for {
		n, err := x.Read(buf)
		if n > 0 {
			m, werr := w.Write(buf[:n])
			total += int64(m)
			if werr != nil {
				return total, werr
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// CloseWithError is called by fasthttp once the response is written (or
// failed: err is the client write error). It ends the exchange.
func (x *exchange) CloseWithError(err error) error {
	x.finish(err)
	x.release()
	return nil
}

// finish ends the request once: it releases the upstream connection
// (pooled only when both bodies ended cleanly) and records metrics. The
// exchange stays valid; whoever owns it last releases it (the handler,
// CloseWithError, or a hijack).
func (x *exchange) finish(clientErr error) {
	if x.r.done {
		return
	}
	x.r.done = true
	x.joinPump()
	now := time.Now()
	if x.r.conn != nil {
		// Bytes left unread after the response are not the next one's: an
		// upstream that sent more than it framed (a body after a HEAD, 204
		// or 304 answer, a second response) would desync the connection.
		// Those arriving later are caught by the probe before reuse.
		reusable := x.r.bodyEOF && clientErr == nil && x.r.pumpErr == nil &&
			!x.resp.ConnectionClose() && x.resp.Header.ContentLength() != -2 && x.r.conn.R.Buffered() == 0
		x.resp.CloseBodyStream() //nolint:errcheck
		x.r.ep.Release(x.r.conn, reusable, now)
		x.r.conn = nil
	}
	if x.r.upErr != nil {
		x.r.up.m.errorInc(x.r.upErr)
	}
	x.r.ticket.Done()
	x.record(now)
}

func (x *exchange) record(now time.Time) {
	m := x.r.st.noRoute
	if x.r.rt != nil {
		m = x.r.rt.m
	}
	if !x.r.upStart.IsZero() && x.r.up != nil {
		end := x.r.upEnd
		if end.IsZero() {
			end = now
		}
		upstream := end.Sub(x.r.upStart)
		x.r.up.m.duration.Update(upstream.Seconds())
		m.added.Update(max(0, now.Sub(x.r.start)-upstream).Seconds())
	}
	status := x.r.status
	if status == 0 {
		status = x.r.ctx.Response.StatusCode()
	}
	tier := x.r.tier
	if tier == "" {
		tier = tierNone
	}
	m.request(x.method, status, tier).Inc()
	if x.r.tier != "" {
		x.p.active.add(m.tierLabel(x.r.tier), x.clientID, now)
	}
	x.accessLine(status, now)
	m.duration.Update(now.Sub(x.r.start).Seconds())
	if x.r.sent > 0 {
		m.bytesIn.Add(int(x.r.sent))
	}
	if x.r.bytesOut > 0 {
		m.bytesOut.Add(int(x.r.bytesOut))
	}
	x.p.m.inFlight.Add(-1)
}

// fail answers the client with the error's status and ends the exchange.
func (x *exchange) fail(err error) {
	status, msg := statusFor(err)
	writeError(x.r.ctx, status, msg, x.reqID, x.idHeader())
	x.rateLimitHeaders(&x.r.ctx.Response.Header)
	x.r.status = status
	x.abortPump()
	x.finish(nil)
}

// release recycles the exchange: the request's state goes with one
// assignment; buffers keep their storage.
func (x *exchange) release() {
	if x.r.firstBuf != nil {
		copyBufPool.Put(x.r.firstBuf)
	}
	if x.r.pendingBuf != nil {
		copyBufPool.Put(x.r.pendingBuf)
	}
	x.r = request{}
	x.p = nil
	x.resp.Reset()
	x.gen++
	x.reqID, x.scratch, x.method, x.clientID = x.reqID[:0], x.scratch[:0], x.method[:0], x.clientID[:0]
	c := &x.req.Credentials
	x.req = admission.Request{Paths: x.req.Paths[:0], Credentials: policy.Credentials{
		APIKeys: c.APIKeys[:0], Authorization: c.Authorization[:0], ForwardedFor: c.ForwardedFor[:0]}}
	x.fwd.reset()
	x.clientEOF.Store(false)
	x.awaiting.Store(false)
	exchangePool.Put(x)
}
