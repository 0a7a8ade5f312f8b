package proxy

import (
	"bufio"
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
type exchange struct {
	p    *Proxy
	ctx  *fasthttp.RequestCtx
	st   *state
	srv  *policy.Server
	rt   *routeRuntime
	ep   *upstream.Endpoint
	conn *upstream.Conn
	resp fasthttp.Response

	start   time.Time
	reqID   []byte
	scratch []byte
	method  []byte
	http11  bool

	// Request body.
	body      io.Reader // the client's body stream; nil without a body
	bodyLen   int       // Content-Length, or -1 for chunked
	first     []byte    // chunked bodies: the first read, taken before dialing
	firstEOF  bool
	firstBuf  *[]byte
	pumpDone  chan error  // set while a pump goroutine runs
	pumpErr   error       // its result, once joined
	clientEOF atomic.Bool // the pump read the client's body to its end
	awaiting  atomic.Bool // waiting for the response head: uploads extend its deadline
	sent      int64       // body bytes written upstream (pump: read after join)

	rl        decision // the rate-limit decision, for the response headers
	clientID  []byte
	tier      string // the client's tier, once identified (from config or a verified token)
	peer      netip.Addr
	badTarget bool               // a request target that cannot be honoured (400): see originForm, state.match
	req       admission.Request  // the view admission decides on (views into the head)
	dec       admission.Decision // what it decided
	fwd       forwardedIn        // a trusted peer's X-Forwarded-*, copied before stripping

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
	gen        uint64 // incremented on release: tells a stale reference
}

var exchangePool = sync.Pool{New: func() any { return &exchange{pumpDone: make(chan error, 1)} }}

// Handler is the proxy's fasthttp.RequestHandler.
func (p *Proxy) Handler(ctx *fasthttp.RequestCtx) {
	p.m.inFlight.Add(1)
	x := exchangePool.Get().(*exchange)
	x.p, x.ctx, x.start = p, ctx, ctx.Time() // set by the server as the head arrived
	gen := x.gen
	defer func() {
		if r := recover(); r != nil {
			p.recovered(ctx, x, gen, r)
		}
	}()
	x.serve()
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
		if x.conn != nil {
			_ = x.conn.Conn.Close()
		}
		if !x.done {
			x.done = true
			p.m.inFlight.Add(-1)
		}
	}
	p.log.Error("panic in request path recovered", "panic", fmt.Sprint(r), "request_id", string(reqID),
		"stack", string(debug.Stack()))
	writeError(ctx, fasthttp.StatusInternalServerError, "internal error", reqID, idHeader)
	ctx.SetConnectionClose()
}

func (x *exchange) idHeader() string {
	if x.srv == nil {
		return policy.DefaultRequestIDHeader
	}
	return x.srv.RequestIDHeader
}

// testHookServe, when set by a test, runs at the start of every request.
var testHookServe func(*fasthttp.RequestCtx)

// begin loads the policy and the request's identity for the exchange.
func (x *exchange) begin() {
	x.st = x.p.state.Load()
	x.srv = &x.st.snap.Server
	h := &x.ctx.Request.Header
	if id := h.Peek(x.srv.RequestIDHeader); validRequestID(id) {
		x.reqID = append(x.reqID[:0], id...)
	} else {
		x.reqID = x.p.ids.next(x.reqID[:0])
	}
	x.method = append(x.method[:0], h.Method()...)
	x.http11 = h.IsHTTP11()
	x.peer = peerAddr(x.ctx)
	x.fwd.trusted = x.peer.IsValid() && x.srv.Trusted(x.peer)
	if x.badTarget = !originForm(&x.ctx.Request); x.badTarget {
		return // x.rt stays nil; serve answers 400
	}
	var err error
	x.rt, err = x.st.match(x.ctx, &x.req)
	x.badTarget = errors.Is(err, admission.ErrAmbiguousPath)
}

func (x *exchange) serve() {
	ctx := x.ctx
	h := &ctx.Request.Header
	x.begin()
	if testHookServe != nil {
		testHookServe(ctx)
	}
	if !checkRawHeaders(h) || x.badTarget {
		x.p.m.badReqs.Inc()
		x.fail(ErrBadRequest)
		ctx.SetConnectionClose()
		return
	}
	if x.rt == nil {
		x.fail(ErrNoRoute)
		return
	}
	upgrade, ok := x.st.upgrade(h)
	if !ok {
		x.fail(ErrUpgradeRefused)
		return
	}
	if !x.limit(h) {
		return
	}
	x.up = x.rt.up
	if !x.admit() {
		return
	}
	cl := h.ContentLength()
	if x.srv.MaxBodyBytes > 0 && int64(cl) > x.srv.MaxBodyBytes {
		x.fail(ErrBodyTooLarge)
		return
	}
	if cl > 0 || cl == -1 {
		x.body, x.bodyLen = ctx.RequestBodyStream(), cl
		// The server armed header_timeout for the head; the body is
		// governed by the idle timeout from here on.
		_ = ctx.SetReadDeadline(x.start.Add(x.srv.IdleTimeout))
		if cl == -1 {
			// Read the first chunk before anything goes upstream, so a
			// malformed chunked body is refused with nothing forwarded.
			x.firstBuf = copyBufPool.Get().(*[]byte)
			n, err := io.ReadAtLeast(x.body, *x.firstBuf, 1)
			x.first = (*x.firstBuf)[:n]
			switch {
			case err == io.EOF || (err == nil && n == 0):
				x.firstEOF = true
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
			if x.srv.MaxBodyBytes > 0 && int64(n) > x.srv.MaxBodyBytes {
				x.fail(ErrBodyTooLarge)
				ctx.SetConnectionClose()
				return
			}
		}
	}

	x.prepareRequest(h, cl, upgrade)
	x.forward(upgrade)
}

// forward sends the request to x.up and answers with its response, or
// with the upstream's fallback when it fails. A request that could not
// connect is retried once on another endpoint, and an idempotent one
// without a body up to `retries` times after a timeout or reset, all
// within the upstream's retry budget.
func (x *exchange) forward(upgrade []byte) {
	ctx, h := x.ctx, &x.ctx.Request.Header
	x.up.pool.EarnRetry()
	if x.upStart.IsZero() {
		x.upStart = time.Now()
	}
	x.ep = x.up.pool.Pick(nil, time.Now())
	for attempt := 0; ; attempt++ {
		if x.up.spec.RewriteHost || len(h.Host()) == 0 {
			h.SetHost(x.ep.Addr()) // HTTP/1.1 upstreams require a Host; HTTP/1.0 clients may omit it
		}
		err := x.roundTrip()
		if err == nil {
			break
		}
		x.up.m.errorInc(err)
		clientSide := errors.Is(err, ErrClientBody) || errors.Is(err, ErrBodyTooLarge) || errors.Is(err, ErrClientGone)
		upstreamFault := !clientSide && !errors.Is(err, ErrUpstreamBusy) // a full pool is not the upstream's fault
		if upstreamFault {
			x.up.outcome(x.ep, true, time.Now(), x.p.log.Warn)
			if x.retryable(err, attempt) {
				x.up.m.retries.Inc()
				x.ep = x.up.pool.Pick(x.ep, time.Now())
				continue
			}
			x.ticket.Report(true, time.Now())
		}
		if !clientSide && x.up.spec.Fallback != nil {
			x.serveFallback(fallbackReason(err), 0)
			return
		}
		hadBody := x.body != nil
		x.fail(err)
		if hadBody {
			ctx.SetConnectionClose() // the body may be partly read
		}
		return
	}
	status := x.resp.StatusCode()
	failed := failureStatus(x.up.spec, status)
	x.up.outcome(x.ep, failed, time.Now(), x.p.log.Warn)
	if x.up.spec.Breaker != nil {
		x.ticket.Report(failed, time.Now())
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
	if len(x.up.pool.Endpoints()) < 2 {
		return false
	}
	connect := errors.Is(err, ErrConnectRefused) || errors.Is(err, ErrConnectTimeout)
	switch {
	case connect && attempt == 0 && x.sent == 0 && !x.pumped:
	case attempt < x.up.spec.Retries && x.body == nil && idempotent(x.method) &&
		(connect || errors.Is(err, ErrResponseTimeout) || errors.Is(err, ErrUpstreamReset)):
	default:
		return false
	}
	return x.up.pool.RetryToken()
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
	x.scratch = stripRequest(h, x.st.filter, x.fwd.trusted, x.scratch)
	h.Del("Expect") // 100-continue was answered by the server already
	if upgrade != nil {
		h.Set("Connection", "Upgrade")
		h.SetBytesV("Upgrade", upgrade)
	}
	h.SetProtocol("HTTP/1.1")       // keep-alive and chunking upstream, whatever the client spoke
	h.SetNoDefaultContentType(true) // no Content-Type that neither side sent
	x.scratch = setForwardedHeaders(x.ctx, &x.fwd, x.peer, x.scratch)
	id := &x.st.snap.Identity
	h.SetBytesV(id.ClientHeader, x.clientID)
	h.Set(id.TierHeader, x.tier)
	h.SetBytesV(x.srv.RequestIDHeader, x.reqID)
	if cl >= -1 {
		h.SetContentLength(cl) // regenerates framing: Content-Length, or chunked
	}
	h.ResetConnectionClose()
}

// roundTrip sends the request head (and body, or starts the pump) and
// reads the response head into x.resp.
func (x *exchange) roundTrip() error {
	up := x.up.spec
	for attempt := 0; ; attempt++ {
		now := time.Now()
		c, err := x.ep.Acquire(now)
		if err != nil {
			return err
		}
		if c.Reused && !c.Alive() {
			// Every pooled connection is looked at before use (one
			// non-blocking peek): one the upstream closed while idle
			// would cost a body that cannot be replayed, and one it wrote
			// to unasked is out of step — its next "response" would be
			// another client's (RFC 9112 §9.3).
			x.ep.Release(c, false, now)
			if attempt < 3 {
				continue
			}
			return ErrUpstreamReset
		}
		x.conn = c
		// Both take effect lazily, at the next network read or write.
		c.WriteTimeout, c.ReadTimeout = x.srv.IdleTimeout, up.ResponseTimeout

		err = x.ctx.Request.Header.Write(c.W)
		started := false
		if err == nil {
			switch {
			case x.body == nil:
				err = c.W.Flush()
			case x.bodyLen >= 0 && x.bodyLen <= syncBodyLimit:
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
		err = x.readResponse(c.R)
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
			if errors.Is(x.pumpErr, ErrClientBody) || errors.Is(x.pumpErr, ErrBodyTooLarge) {
				x.abandonConn()
				return x.pumpErr
			}
		}
		if errors.Is(err, ErrClientGone) {
			x.abortPump()
			x.abandonConn()
			return err
		}
		retry := c.Reused && x.body == nil && attempt == 0 && errors.Is(err, io.EOF)
		x.abandonConn()
		if retry {
			continue
		}
		return classifyReadErr(err)
	}
}

// maxInterim bounds the interim responses read before the final one.
const maxInterim = 16

var errTooManyInterim = errors.New("more than 16 interim (1xx) responses")

// readResponse reads the upstream's response head into x.resp and sets up
// its body stream. Interim responses are relayed to the client as they
// come, in order (RFC 9110 §15.2: a proxy MUST forward 1xx responses),
// except 100 Continue, which the sidecar's own server answered when the
// client asked for it (Expect is not forwarded), and 101, which is the
// final response of an upgrade. HTTP/1.0 clients get none (RFC 9110
// §15.2: a server must not send them a 1xx).
func (x *exchange) readResponse(br *bufio.Reader) error {
	r := &x.resp
	r.ResetBody()
	for n := 0; ; n++ {
		if err := r.Header.Read(br); err != nil {
			return err
		}
		status := r.Header.StatusCode()
		if status < 100 || status > 199 || status == fasthttp.StatusSwitchingProtocols {
			break
		}
		if n >= maxInterim {
			return errTooManyInterim
		}
		if status != fasthttp.StatusContinue && x.http11 {
			if err := x.relayInterim(); err != nil {
				return fmt.Errorf("%w: %w", ErrClientGone, err)
			}
		}
	}
	status := r.Header.StatusCode()
	if r.SkipBody || status < 200 || status == fasthttp.StatusNoContent || status == fasthttp.StatusNotModified {
		return nil
	}
	return r.ReadBody(br, 0) // StreamBody: only sets up the stream
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
	_ = x.ctx.Conn().SetWriteDeadline(time.Now().Add(x.srv.IdleTimeout))
	_, err := x.ctx.Conn().Write(b)
	return err
}

// abandonConn closes the upstream connection and frees its slot.
func (x *exchange) abandonConn() {
	if x.conn != nil {
		x.resp.CloseBodyStream() //nolint:errcheck // releases fasthttp's stream before its reader goes
		x.ep.Release(x.conn, false, time.Now())
		x.conn = nil
	}
}

func (x *exchange) startPump(c *upstream.Conn) {
	x.pumped = true
	go func() {
		err := x.copyBody(c)
		if err != nil && (errors.Is(err, ErrClientBody) || errors.Is(err, ErrBodyTooLarge)) {
			// The upstream waits for body bytes that will never come:
			// unblock the handler's read of the response head.
			_ = c.Conn.Close()
		}
		x.pumpDone <- err
	}()
	x.pumpErr = errPumpRunning
}

var errPumpRunning = errors.New("pump running")

// joinPump waits for the pump if one ran. If the client has not finished
// its upload (the upstream answered early), the upload is cut: the client's
// read deadline is moved to now and the upstream connection closed.
func (x *exchange) joinPump() {
	if x.pumpErr != errPumpRunning {
		return
	}
	if !x.clientEOF.Load() {
		x.abortPump()
		return
	}
	x.pumpErr = <-x.pumpDone
}

func (x *exchange) abortPump() {
	if x.pumpErr != errPumpRunning {
		return
	}
	_ = x.ctx.SetReadDeadline(time.Now())
	if x.conn != nil {
		_ = x.conn.Conn.SetWriteDeadline(time.Now())
	}
	x.pumpErr = <-x.pumpDone
	if x.pumpErr == nil {
		return
	}
	x.ctx.SetConnectionClose()
}

// copyBody streams the client's body upstream: Content-Length bodies as
// they are, others re-chunked. Client-side failures are wrapped in
// ErrClientBody, so callers can tell them from upstream ones.
func (x *exchange) copyBody(c *upstream.Conn) error {
	bufp := x.firstBuf
	if bufp == nil {
		bufp = copyBufPool.Get().(*[]byte)
	}
	x.firstBuf = nil
	defer copyBufPool.Put(bufp)
	buf := *bufp
	chunked := x.bodyLen < 0
	limit := x.srv.MaxBodyBytes
	idle := x.srv.IdleTimeout
	var armed time.Time

	write := func(p []byte) error {
		if chunked {
			var hdr [18]byte
			h := strconv.AppendUint(hdr[:0], uint64(len(p)), 16)
			h = append(h, '\r', '\n')
			if _, err := c.W.Write(h); err != nil {
				return err
			}
		}
		if _, err := c.W.Write(p); err != nil {
			return err
		}
		if chunked {
			if _, err := c.W.Write(crlf); err != nil {
				return err
			}
		}
		return c.W.Flush()
	}

	// Each read is sent with one write: a chunk is framed in place, its
	// size line in the room kept before the data and its CRLF after, so a
	// chunked upload costs one syscall per read, not three.
	const sizeLineRoom = 18 // up to 16 hex digits and CRLF
	data := buf
	if chunked {
		data = buf[sizeLineRoom : len(buf)-2]
	}
	send := func(n int) error {
		frame := data[:n]
		if chunked {
			var hdr [sizeLineRoom]byte
			h := strconv.AppendUint(hdr[:0], uint64(n), 16)
			h = append(h, '\r', '\n')
			start := sizeLineRoom - len(h)
			copy(buf[start:], h)
			buf[sizeLineRoom+n], buf[sizeLineRoom+n+1] = '\r', '\n'
			frame = buf[start : sizeLineRoom+n+2]
		}
		if c.W.Buffered() > 0 {
			if err := c.W.Flush(); err != nil {
				return err
			}
		}
		_, err := c.Write(frame)
		return err
	}

	if len(x.first) > 0 {
		n := len(x.first)
		// first aliases buf: write it before buf is reused.
		x.first = nil
		if err := write(buf[:n]); err != nil {
			return err
		}
		x.sent += int64(n)
	}
	eof := x.firstEOF
	for !eof {
		n, rerr := x.body.Read(data)
		if n > 0 {
			if limit > 0 && x.sent+int64(n) > limit {
				return ErrBodyTooLarge
			}
			now := time.Now()
			if rearm(now, armed, idle) {
				armed = now
				_ = x.ctx.SetReadDeadline(now.Add(idle))
				if x.awaiting.Load() {
					// Upload progress counts as progress for the response
					// timeout too: a long upload is not a slow upstream.
					_ = c.Conn.SetReadDeadline(now.Add(x.up.spec.ResponseTimeout))
				}
			}
			if err := send(n); err != nil {
				return err
			}
			x.sent += int64(n)
		}
		switch {
		case rerr == io.EOF:
			eof = true
		case rerr != nil:
			return fmt.Errorf("%w: %w", ErrClientBody, rerr)
		}
	}
	x.clientEOF.Store(true)
	if chunked {
		if _, err := c.W.Write(lastChunk); err != nil {
			return err
		}
	}
	return c.W.Flush()
}

var (
	http11    = []byte("HTTP/1.1")
	http10    = []byte("HTTP/1.0")
	crlf      = []byte("\r\n")
	lastChunk = []byte("0\r\n\r\n")
)

// respond turns the upstream response head into the client's response and
// hands the body stream to fasthttp.
func (x *exchange) respond(upgrade []byte) {
	ctx := x.ctx
	r := &x.resp
	x.status = r.StatusCode()
	if x.status == fasthttp.StatusSwitchingProtocols {
		if upgrade == nil {
			x.up.m.errorInc(ErrUpstreamProto)
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
	if x.http11 {
		rh.SetProtocol(http11)
	} else {
		rh.SetProtocol(http10)
	}
	x.scratch = stripResponseHop(rh, x.scratch)
	rh.ResetConnectionClose()
	rh.SetBytesV(x.srv.RequestIDHeader, x.reqID)
	x.rateLimitHeaders(rh)
	if x.fallback != "" {
		rh.Set("X-Sidecar-Fallback", x.fallback)
	}

	stream := r.BodyStream()
	if stream == nil { // HEAD, 1xx, 204, 304: no body
		x.bodyEOF = true
		x.finish(nil)
		return
	}
	x.stream = stream
	cl := r.Header.ContentLength()
	if cl == -1 && x.conn.R.Buffered() > 0 {
		// The first chunk came with the head: decode it now, so that a
		// response with broken chunking becomes a 502 instead of a 200
		// cut short. (Later chunks can only be cut: the head is out.)
		x.pendingBuf = copyBufPool.Get().(*[]byte)
		n, err := stream.Read(*x.pendingBuf)
		if err != nil && err != io.EOF {
			x.up.m.errorInc(ErrUpstreamProto)
			ctx.Response.Header.Reset()
			x.abortPump()
			x.abandonConn()
			x.fail(ErrUpstreamProto)
			return
		}
		x.pending, x.pendingEOF = (*x.pendingBuf)[:n], err == io.EOF
	}
	if cl >= 0 && cl <= bufferBodyLimit && cl <= x.conn.R.Buffered() {
		x.bufferBody(cl)
		return
	}
	switch {
	case cl < 0 && !x.http11:
		x.closeDelimited() // HTTP/1.0 clients cannot take chunked framing
		return
	case cl < 0:
		cl = -1
		// Streams (SSE) show their head at once; when the first chunk came
		// with the head, it goes out with it in the same write.
		ctx.Response.ImmediateHeaderFlush = len(x.pending) == 0 && !x.pendingEOF
	default:
		// A large Content-Length body: fasthttp would hold what arrives in
		// its 32 KiB write buffer until it fills, so a slow stream would
		// reach the client late, and a cut one not at all. Flush the head
		// now and write the body to the socket as it comes.
		x.direct = true
		ctx.Response.ImmediateHeaderFlush = true
	}
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
	ctx := x.ctx
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
			x.up.m.errorInc(ErrUpstreamReset)
			x.upErr = nil // counted once, as the failure it caused
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
	if now := time.Now(); rearm(now, x.writeArmed, x.srv.IdleTimeout) {
		x.writeArmed = now
		_ = x.ctx.SetWriteDeadline(now.Add(x.srv.IdleTimeout))
	}
	if len(x.pending) > 0 {
		n := copy(p, x.pending)
		x.pending = x.pending[n:]
		x.bytesOut += int64(n)
		return n, nil
	}
	if x.pendingEOF {
		x.bodyEOF = true
		return 0, io.EOF
	}
	x.conn.ReadTimeout = x.srv.IdleTimeout // the body streams under the idle timeout
	n, err := x.stream.Read(p)
	x.bytesOut += int64(n)
	switch {
	case err == io.EOF:
		x.bodyEOF = true
		x.upEnd = time.Now()
	case err != nil:
		x.upErr = classifyReadErr(err)
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
	if x.direct {
		w = x.ctx.Conn() // the head was flushed (ImmediateHeaderFlush): order is kept
	}
	bufp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bufp)
	buf := *bufp
	if !x.direct {
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
	return nil
}

// finish releases the upstream connection (pooled only when both bodies
// ended cleanly), records metrics and recycles the exchange.
func (x *exchange) finish(clientErr error) {
	if x.done {
		return
	}
	x.done = true
	x.joinPump()
	now := time.Now()
	if x.conn != nil {
		// Bytes left unread after the response are not the next one's: an
		// upstream that sent more than it framed (a body after a HEAD, 204
		// or 304 answer, a second response) would desync the connection.
		// Those arriving later are caught by the probe before reuse.
		reusable := x.bodyEOF && clientErr == nil && x.pumpErr == nil &&
			!x.resp.ConnectionClose() && x.resp.Header.ContentLength() != -2 && x.conn.R.Buffered() == 0
		x.resp.CloseBodyStream() //nolint:errcheck
		x.ep.Release(x.conn, reusable, now)
		x.conn = nil
	}
	if x.upErr != nil {
		x.up.m.errorInc(x.upErr)
	}
	x.ticket.Done()
	x.record(now)
	x.release()
}

func (x *exchange) record(now time.Time) {
	m := x.st.noRoute
	if x.rt != nil {
		m = x.rt.m
	}
	if !x.upStart.IsZero() && x.up != nil {
		end := x.upEnd
		if end.IsZero() {
			end = now
		}
		upstream := end.Sub(x.upStart)
		x.up.m.duration.Update(upstream.Seconds())
		m.added.Update(max(0, now.Sub(x.start)-upstream).Seconds())
	}
	status := x.status
	if status == 0 {
		status = x.ctx.Response.StatusCode()
	}
	tier := x.tier
	if tier == "" {
		tier = tierNone
	}
	m.request(x.method, status, tier).Inc()
	if x.tier != "" {
		x.p.active.add(m.tierLabel(x.tier), x.clientID, now)
	}
	x.accessLine(status, now)
	m.duration.Update(now.Sub(x.start).Seconds())
	if x.sent > 0 {
		m.bytesIn.Add(int(x.sent))
	}
	if x.bytesOut > 0 {
		m.bytesOut.Add(int(x.bytesOut))
	}
	x.p.m.inFlight.Add(-1)
}

// fail answers the client with the error's status and ends the exchange.
func (x *exchange) fail(err error) {
	status, msg := statusFor(err)
	writeError(x.ctx, status, msg, x.reqID, x.idHeader())
	x.rateLimitHeaders(&x.ctx.Response.Header)
	x.status = status
	x.abortPump()
	x.finish(nil)
}

// release recycles the exchange. Buffers and the response object are kept;
// everything else is zeroed field by field (fasthttp.Response must not be
// copied).
func (x *exchange) release() {
	if x.firstBuf != nil {
		copyBufPool.Put(x.firstBuf)
	}
	if x.pendingBuf != nil {
		copyBufPool.Put(x.pendingBuf)
	}
	x.direct, x.pending, x.pendingBuf, x.pendingEOF = false, nil, nil, false
	x.resp.Reset()
	x.gen++
	x.p, x.ctx, x.st, x.srv, x.rt, x.ep, x.conn = nil, nil, nil, nil, nil, nil, nil
	x.start = time.Time{}
	x.reqID, x.scratch, x.method, x.clientID = x.reqID[:0], x.scratch[:0], x.method[:0], x.clientID[:0]
	x.http11 = false
	x.body, x.bodyLen, x.first, x.firstEOF, x.firstBuf = nil, 0, nil, false, nil
	x.pumpErr, x.sent = nil, 0
	x.clientEOF.Store(false)
	x.awaiting.Store(false)
	x.stream, x.bodyEOF, x.bytesOut, x.writeArmed = nil, false, 0, time.Time{}
	x.status, x.upErr, x.done = 0, nil, false
	x.rl = decision{}
	x.tier = ""
	x.peer, x.badTarget = netip.Addr{}, false
	c := &x.req.Credentials
	x.req = admission.Request{Paths: x.req.Paths[:0], Credentials: policy.Credentials{
		APIKeys: c.APIKeys[:0], Authorization: c.Authorization[:0], ForwardedFor: c.ForwardedFor[:0]}}
	x.fwd.reset()
	x.up, x.ticket, x.pumped, x.fallback = nil, breaker.Ticket{}, false, ""
	x.upStart, x.upEnd = time.Time{}, time.Time{}
	exchangePool.Put(x)
}
