package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime/debug"
	"strconv"
	"sync"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/admission"
	"github.com/sidecar-proxy/sidecar/breaker"
	"github.com/sidecar-proxy/sidecar/overload"
	"github.com/sidecar-proxy/sidecar/policy"
	"github.com/sidecar-proxy/sidecar/upstream"
)

// copyBufSize is the buffer for response body copies (and the chunk
// size for chunked responses).
const copyBufSize = 32 << 10

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// wholeBufPool holds buffers of bufferBodyLimit for streamed bodies no
// larger than that (see WriteTo).
var wholeBufPool = sync.Pool{New: func() any { b := make([]byte, bufferBodyLimit); return &b }}

// exchange is one request's trip through the proxy. It is pooled, and it
// is the response body stream fasthttp reads after the handler returns:
// its CloseWithError ends the exchange (connection back to the pool,
// metrics recorded). Nothing here is touched by another request.
//
// What one request sets is in r, reset by assignment on release; the
// exchange itself keeps only what outlives a request: buffers whose
// storage is reused, the upstream exchange (it holds a fasthttp.Response,
// which must not be copied), and gen.
type exchange struct {
	p  *Proxy
	r  request
	up upstream.Exchange // the round trip and the response body

	// Buffers reused from request to request (reset to length 0).
	reqID    []byte
	scratch  []byte
	method   []byte
	clientID []byte
	req      admission.Request  // the view admission decides on (views into the head)
	dec      admission.Decision // what it decided
	fwd      forwardedIn        // a trusted peer's X-Forwarded-*, copied before stripping

	gen        uint64      // incremented on release: tells a stale reference
	upReadable func() bool // up.Readable, made once (see WriteTo)
}

// request is one request's state in an exchange; its zero value is a
// fresh request.
type request struct {
	ctx     *fasthttp.RequestCtx
	st      *state
	srv     *policy.Server
	rt      *routeRuntime
	start   time.Time
	http11  bool
	upgrade []byte // the protocol an allowed upgrade asks for

	// Admission.
	rl        decision // the rate-limit decision, for the response headers
	charged   bool     // the rate limit counted this request (x.dec describes it): a refund is due if it is shed
	priority  int      // the verified tier's priority (policy.DefaultPriority without a tier table)
	tier      string   // the client's tier, once identified (from config or a verified token)
	peer      netip.Addr
	badTarget bool           // a request target that cannot be honoured (400): see originForm, state.match
	overload  overload.Token // the slot of the upstream's concurrency limit, with overload protection
	ticket    breaker.Ticket // the bulkhead slot and circuit verdict, if the upstream has a breaker

	// Upstream.
	send       upstream.Request // what goes upstream: the rewritten head and the body
	body       io.Reader        // the client's body stream; nil without a body
	bodyArmed  time.Time        // the client's read deadline was last pushed (pump goroutine)
	up         *upstreamRuntime // where the request goes: the route's, or its fallback
	ep         *upstream.Endpoint
	upStart    time.Time     // the first attempt upstream began
	upEnd      time.Time     // the upstream's part ended (response complete, or failed)
	upErr      error         // the response body failed upstream
	upLatency  time.Duration // the upstream's time to answer (or time out), overload's sample
	upDropped  bool          // with upLatency: it timed out
	fallback   string        // X-Sidecar-Fallback of this response, if any
	retryAfter time.Duration // with fallback: its Retry-After
	deadline   time.Time     // a gRPC client's deadline (grpc-timeout), if it sent one

	// Response.
	status     int
	direct     bool   // WriteTo writes to the client socket itself (see respond)
	holder     socket // the client connection, holding the head for the first body write
	writeArmed time.Time
	sent       int64 // request body bytes that went upstream
	bytesOut   int64
	failed     bool // answered with an error or a fallback: the upstream exchange is not reused
	done       bool
	handedOff  bool // fasthttp writes the body (CloseWithError) or runs a hijack: they release
}

var exchangePool = sync.Pool{New: func() any { return new(exchange) }}

// Handler is the proxy's fasthttp.RequestHandler: the request path, top
// to bottom. Each step returns nil to go on, or the error that ends the
// request, which answer turns into the client's response.
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

	x.begin()        // policy, request id, route
	err := x.admit() // the request itself, identity and rate limit, circuit and bulkhead
	if err == nil {
		err = x.prepare() // the body's first checks, and the head made the upstream's
	}
	if err == nil {
		err = x.forward() // the round trip, with retries and the fallback upstream
	}
	if err == nil {
		err = x.respond() // the response head, and its body handed to fasthttp
	}
	if err != nil {
		x.answer(err) // an error, or the upstream's fallback
	}

	// The exchange outlives the handler only when fasthttp still has to
	// write its body (CloseWithError ends it) or runs a hijack (a tunnel,
	// a close-delimited body): they end and release it. Otherwise it ends
	// here, its only owner.
	if !x.r.handedOff {
		x.finish(nil)
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
		x.up.Finish(false) // its connection is closed, an upload cut
		if !x.r.done {
			x.r.done = true
			// The slots it holds go back: a leaked one would lower the
			// upstream's capacity for good.
			tok, ticket := x.r.overload, x.r.ticket
			x.r.overload, x.r.ticket = overload.Token{}, breaker.Ticket{}
			tok.Ignore()
			ticket.Done()
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

// testHookServe, when set by a test, runs at the start of every request;
// testHookAdmitted once it is admitted (it holds its slots).
var testHookServe, testHookAdmitted func(*fasthttp.RequestCtx)

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

// admit checks the request itself, then runs admission: identity and the
// rate limit, a slot of the upstream's concurrency limit (overload
// protection), then the route's place in its circuit and bulkhead.
func (x *exchange) admit() error {
	h := &x.r.ctx.Request.Header
	if testHookServe != nil {
		testHookServe(x.r.ctx)
	}
	if !checkRawHeaders(h) || x.r.badTarget {
		x.p.m.badReqs.Inc()
		return ErrBadRequest
	}
	if h.IsConnect() {
		// A reverse proxy has no tunnel to open for CONNECT. Forwarded, a
		// 2xx from a backend that does would turn the pooled connection
		// into a tunnel (RFC 9110 §9.3.6) that later clients' requests went
		// into.
		return ErrConnectMethod
	}
	if x.r.rt == nil {
		return ErrNoRoute
	}
	var ok bool
	if x.r.upgrade, ok = x.r.st.upgrade(h); !ok {
		return ErrUpgradeRefused
	}
	if err := x.limit(h); err != nil {
		return err
	}
	x.r.up = x.r.rt.up
	if err := x.enterOverload(); err != nil || x.r.fallback != "" {
		return err // shed: the fallback answers, or the fallback upstream takes it
	}
	return x.enterCircuit()
}

// prepare checks the request body's size (and a chunked body's first
// chunk, read before anything goes upstream, so a malformed one is
// refused with nothing forwarded), then rewrites the head into the
// upstream's.
func (x *exchange) prepare() error {
	ctx := x.r.ctx
	if testHookAdmitted != nil {
		testHookAdmitted(ctx)
	}
	h := &ctx.Request.Header
	cl := h.ContentLength()
	limit := x.r.srv.MaxBodyBytes
	if limit > 0 && int64(cl) > limit {
		return ErrBodyTooLarge
	}
	if cl > 0 || cl == -1 {
		x.r.body = ctx.RequestBodyStream()
		// The server armed header_timeout for the head; the body is
		// governed by the idle timeout from here on.
		_ = ctx.SetReadDeadline(x.r.start.Add(x.r.srv.IdleTimeout))
	}
	if cl == -1 {
		n, eof, err := x.up.ReadAhead(x.r.body)
		switch {
		case err != nil:
			return fmt.Errorf("%w: %w", ErrClientBody, err)
		case eof && n == 0 && len(h.Peek(fasthttp.HeaderTrailer)) > 0:
			// The body ended at once, with a trailer section that
			// fasthttp parsed into the head's trailer store: it would
			// reach the upstream as head fields, past every check
			// above. Request trailers are never forwarded (RFC 9110
			// §6.5 lets a proxy drop them); with no body to stream
			// ahead of them, refusing is the safe answer.
			x.p.m.badReqs.Inc()
			return ErrBadRequest
		case limit > 0 && int64(n) > limit:
			return ErrBodyTooLarge
		}
	}
	if isGRPC(h) {
		if d, ok := grpcTimeout(h.Peek("Grpc-Timeout")); ok {
			x.r.deadline = x.r.start.Add(d)
		}
	}
	x.prepareRequest(h, cl)
	x.r.send = upstream.Request{Header: h, Body: x.r.body, BodyLen: cl, Head: string(x.method) == "HEAD",
		Idempotent: idempotent(x.method) || len(h.Peek("Idempotency-Key")) > 0, Sender: x}
	// An HTTP/2 stream's context: when its client resets it, the
	// upstream's work ends too (its slot, bulkhead place and connection
	// freed).
	x.r.send.Context = x.clientContext()
	return nil
}

// forward sends the request to x.r.up, and when that fails to the
// upstream's fallback upstream if it has one. On success the response
// head is in x.up.Response.
func (x *exchange) forward() error {
	for {
		err := x.send()
		if err == nil {
			return nil
		}
		if clientSide(err) || x.r.up.spec.Fallback == nil {
			return err
		}
		if err = x.fallBack(answerFor(err).reason, 0); err != nil {
			return err
		}
	}
}

// send tries the request on x.r.up's endpoints: a request that could not
// connect is retried once on another endpoint, and an idempotent one
// without a body up to `retries` times after a timeout or reset, all
// within the upstream's retry budget. The outcome feeds passive health
// and the circuit.
func (x *exchange) send() error {
	h := &x.r.ctx.Request.Header
	pool := x.r.up.pool
	pool.EarnRetry()
	var tried time.Time // this attempt's start, for overload's latency sample
	if x.r.upStart.IsZero() {
		x.r.upStart = time.Now()
		tried = x.r.upStart
	} else {
		tried = time.Now() // the fallback upstream's first attempt
	}
	x.r.send.ResponseTimeout = x.r.up.spec.ResponseTimeout
	clientBound := false // the client's deadline, not response_timeout, bounds the wait
	if !x.r.deadline.IsZero() {
		// A gRPC client's deadline (grpc-timeout) bounds the wait too.
		if left := time.Until(x.r.deadline); left < x.r.send.ResponseTimeout {
			x.r.send.ResponseTimeout, clientBound = max(left, time.Millisecond), true
		}
	}
	x.r.ep = pool.Pick(nil, time.Now())
	if s := clientStream(x.r.ctx); s != nil {
		s.forwarded = true // for the rapid-reset budget (streamEnded)
	}
	for attempt := 0; ; attempt++ {
		if x.r.up.spec.RewriteHost || len(h.Host()) == 0 {
			h.SetHost(x.r.ep.Addr()) // HTTP/1.1 upstreams require a Host; HTTP/1.0 clients may omit it
		}
		err := x.up.RoundTrip(x.r.ep, &x.r.send)
		now := time.Now()
		if clientBound && errors.Is(err, ErrResponseTimeout) {
			if s := clientStream(x.r.ctx); s != nil {
				s.abandoned = true // for the rapid-reset budget (streamEnded), judged or not
			}
		}
		if clientBound && errors.Is(err, ErrResponseTimeout) && !x.r.up.judges(x.r.send.ResponseTimeout) {
			// The client's deadline (shorter than response_timeout) gave
			// the upstream less than judgedDeadline times its typical
			// latency: its passing says nothing of the upstream's health,
			// so neither the circuit nor passive health (nor overload's
			// latency) hears of it, and a client cannot open the circuit
			// for everyone with short deadlines. A longer one that passes
			// is the upstream's timeout: a hung upstream behind clients
			// that all send deadlines is still cut off.
			err = ErrClientDeadline
		}
		if err == nil {
			if x.sampled() {
				x.r.upLatency, x.r.upDropped = now.Sub(tried), false
				x.r.up.noteLatency(x.r.upLatency)
			}
			failed := failureStatus(x.r.up.spec, x.up.Response.StatusCode())
			x.r.up.outcome(x.r.ep, failed, now, x.p.log.Warn)
			if x.r.up.spec.Breaker != nil {
				x.r.ticket.Report(failed, now)
			}
			return nil
		}
		if errors.Is(err, ErrResponseTimeout) && x.sampled() {
			x.r.upLatency, x.r.upDropped = now.Sub(tried), true
		}
		x.r.up.m.errorInc(err)
		if clientSide(err) || errors.Is(err, ErrUpstreamBusy) { // a full pool is not the upstream's fault
			return err
		}
		x.r.up.outcome(x.r.ep, true, time.Now(), x.p.log.Warn)
		if x.retryable(err, attempt) {
			x.r.up.m.retries.Inc()
			x.r.ep = pool.Pick(x.r.ep, time.Now())
			tried = time.Now()
			continue
		}
		x.r.ticket.Report(true, time.Now())
		return err
	}
}

// sampled reports whether the upstream's time to answer measures the
// upstream alone: the request had no body, or a small one sent with the
// head. A streamed upload's time is the client's too: sampled, a few slow
// uploaders would pass for a slow upstream and drag its limit down.
func (x *exchange) sampled() bool {
	return x.r.body == nil || x.r.send.BodyLen >= 0 && x.r.send.BodyLen <= upstream.SyncBodyLimit
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
	case connect && attempt == 0 && x.up.Replayable():
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
func (x *exchange) prepareRequest(h *fasthttp.RequestHeader, cl int) {
	if x.fwd.trusted {
		x.fwd.capture(h)
	}
	x.scratch = stripRequest(h, x.r.st.filter, x.fwd.trusted, x.scratch)
	h.Del("Expect") // 100-continue was answered by the server already
	if x.r.upgrade != nil {
		h.Set("Connection", "Upgrade")
		h.SetBytesV("Upgrade", x.r.upgrade)
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

// Interim relays an interim response from the upstream to the client
// (upstream.Sender), as it comes, in order (RFC 9110 §15.2: a proxy MUST
// forward 1xx responses), except 100 Continue, which the sidecar's own
// server answered when the client asked for it (Expect is not
// forwarded), and 101, which is the final response of an upgrade.
// HTTP/1.0 clients get none (RFC 9110 §15.2: a server must not send them
// a 1xx).
func (x *exchange) Interim(h *fasthttp.ResponseHeader) error {
	if h.StatusCode() == fasthttp.StatusContinue || !x.r.http11 {
		return nil
	}
	// Connection-specific fields go on neither hop (RFC 9110 §7.6.1); in
	// HTTP/2 they make the response malformed (RFC 9113 §8.2.2), and
	// clients reset the stream.
	x.scratch = stripResponseHop(h, x.scratch)
	if s := clientStream(x.r.ctx); s != nil {
		s.writeInterim(h)
		return nil
	}
	if err := x.relayInterim(h); err != nil {
		return fmt.Errorf("%w: %w", ErrClientGone, err)
	}
	return nil
}

// relayInterim writes the interim response h (its hop-by-hop fields
// gone) to the client. fasthttp has no interim-response writer beyond Early
// Hints' Link fields, so this writes to the connection the way its
// EarlyHints does: nothing of this request's response is buffered yet.
func (x *exchange) relayInterim(h *fasthttp.ResponseHeader) error {
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

// BodyProgress enforces the body limit on an upload as it streams
// (upstream.Sender; on the pump's goroutine for a large body) and pushes
// the client's read deadline on as data moves.
func (x *exchange) BodyProgress(total int64) error {
	if limit := x.r.srv.MaxBodyBytes; limit > 0 && total > limit {
		return ErrBodyTooLarge
	}
	if now, idle := time.Now(), x.r.srv.IdleTimeout; rearm(now, x.r.bodyArmed, idle) {
		x.r.bodyArmed = now
		_ = x.r.ctx.SetReadDeadline(now.Add(idle))
	}
	return nil
}

// StopBody cuts the client's upload (upstream.Sender): the pump's read of
// it returns at once.
func (x *exchange) StopBody() { _ = x.r.ctx.SetReadDeadline(time.Now()) }

var (
	http11 = []byte("HTTP/1.1")
	http10 = []byte("HTTP/1.0")
	crlf   = []byte("\r\n")
)

// respond turns the upstream response head into the client's response and
// hands the body stream to fasthttp (or reads a small body whole first).
func (x *exchange) respond() error {
	ctx := x.r.ctx
	r := &x.up.Response
	x.r.status = r.StatusCode()
	if x.r.status == fasthttp.StatusSwitchingProtocols {
		if x.r.upgrade == nil || !offered(x.r.upgrade, r.Header.Peek("Upgrade")) {
			// Unasked, or to a protocol the client did not list (RFC 9110
			// §7.8): the client could not speak what follows.
			x.r.up.m.errorInc(ErrUpstreamProto)
			return ErrUpstreamProto
		}
		x.tunnel()
		return nil
	}
	if err := x.up.Prefetch(); err != nil {
		// The first chunk came with the head and is malformed: a 502
		// now, instead of a 200 cut short.
		x.r.up.m.errorInc(ErrUpstreamProto)
		return ErrUpstreamProto
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

	if !x.up.HasBody() { // HEAD, 1xx, 204, 304
		return nil
	}
	cl := r.Header.ContentLength()
	if cl >= 0 && cl <= bufferBodyLimit && cl <= x.up.Buffered() {
		return x.bufferBody()
	}
	switch {
	case cl < 0 && !x.r.http11:
		x.closeDelimited() // HTTP/1.0 clients cannot take chunked framing
		return nil
	case cl < 0:
		cl = -1
		// Streams (SSE) show their head at once; when the first chunk came
		// with the head, it goes out with it in the same write.
		ctx.Response.ImmediateHeaderFlush = !x.up.Prefetched()
	default:
		// A large Content-Length body: fasthttp would hold what arrives in
		// its 32 KiB write buffer until it fills, so a slow stream would
		// reach the client late, and a cut one not at all. Flush the head
		// now and write the body to the socket as it comes.
		x.r.direct = true
		ctx.Response.ImmediateHeaderFlush = true
		if x.up.Buffered() > 0 {
			// Body bytes came with the head: the first body write will
			// not wait for the upstream, so the head can wait for it and
			// leave in the same system call.
			if h := clientSocket(ctx.Conn()); h != nil {
				h.HoldNextWrite()
				x.r.holder = h
			}
		}
	}
	// The upstream has answered: the stream that follows is the client's
	// pace, not the upstream's, and a slow reader must not hold a slot of
	// the concurrency limit (the bulkhead still counts it to the end).
	x.leaveOverload(time.Now())
	x.r.handedOff = true // fasthttp writes the body and calls CloseWithError
	ctx.Response.SetBodyStream(x, cl)
	return nil
}

// bufferBodyLimit is the largest Content-Length body read whole before the
// response goes out (and only one already in the upstream connection's
// read buffer, which is smaller: see respond), as NGINX's proxy_buffering does: the upstream
// connection is free again at once (a slow client no longer holds it), head
// and body leave in one write, and a body cut short becomes a 502 instead
// of a truncated 200. Larger bodies stream.
const bufferBodyLimit = 64 << 10

// bufferBody reads a small body into the client's response.
func (x *exchange) bufferBody() error {
	ctx := x.r.ctx
	bufp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bufp)
	buf := *bufp
	for {
		n, err := x.Read(buf)
		ctx.Response.AppendBody(buf[:n])
		if err == io.EOF {
			return nil
		}
		if clientSide(err) {
			return err // an HTTP/2 client reset its stream
		}
		if err != nil {
			x.r.up.m.errorInc(ErrUpstreamReset)
			x.r.upErr = nil // counted once, as the failure it caused
			return ErrUpstreamReset
		}
	}
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
	n, err := x.up.Read(p)
	x.r.bytesOut += int64(n)
	switch {
	case err == io.EOF:
		x.r.upEnd = time.Now()
	case err != nil && !clientSide(err): // a reset stream is not the upstream's failure
		x.r.upErr = err
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
		// The head was flushed (ImmediateHeaderFlush; held for the first
		// write when body bytes came with it): order is kept. Each write
		// carries what has arrived by then, never waiting for more. A body
		// of up to bufferBodyLimit gets a buffer that holds it whole, for
		// the time it takes: one that came at once leaves in one write
		// with the head, not two; larger ones stream through copyBufSize.
		pool := &copyBufPool
		if cl := x.up.Response.Header.ContentLength(); cl > copyBufSize && cl <= bufferBodyLimit {
			pool = &wholeBufPool
		}
		bufp := pool.Get().(*[]byte)
		defer pool.Put(bufp)
		if x.upReadable == nil {
			x.upReadable = x.up.Readable // once per pooled exchange: a method value allocates
		}
		return upstream.CopyGathered(x.r.ctx.Conn(), x, *bufp, x.upReadable)
	}
	bufp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bufp)
	buf := *bufp
	// fasthttp frames each write as a chunk (size line, data, CRLF) in its
	// write buffer, which is copyBufSize too: leave room for the framing,
	// or every full read costs a second write of 8 bytes.
	return upstream.Copy(w, x, buf[:copyBufSize-chunkFraming])
}

// socket is an HTTP/1.1 client's TCP connection as frontend/listen.Conn
// has it: it can hold its next write back to send it with the one after,
// and close lingering.
type socket interface {
	HoldNextWrite()
	Flush() error
	LingerOnClose()
}

// clientSocket finds the socket under an HTTP/1.1 client connection
// (beneath TLS and the replay of sniffed bytes), or nil: an HTTP/2 stream
// shares its connection with other streams and has none.
func clientSocket(c net.Conn) socket {
	for {
		switch v := c.(type) {
		case socket:
			return v
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil
		}
	}
}

// clientContext is the HTTP/2 stream's context, nil for HTTP/1.1.
func (x *exchange) clientContext() context.Context {
	if c, ok := x.r.ctx.Conn().(interface{ Context() context.Context }); ok {
		return c.Context()
	}
	return nil
}

// CloseWithError is called by fasthttp once the response is written (or
// failed: err is the client write error). It ends the exchange.
func (x *exchange) CloseWithError(err error) error {
	if x.r.holder != nil {
		// A head held for a body write that never came (the upstream
		// failed first) goes now, as it would have without the hold.
		_ = x.r.holder.Flush()
	}
	x.finish(err)
	x.release()
	return nil
}

// answer responds to a request that ends with err: with the upstream's
// fallback when err is errFallback, else with err's status and message.
// The upstream exchange is not reused after it.
func (x *exchange) answer(err error) {
	x.r.failed = true
	if clientSide(err) && x.clientContext() != nil && x.clientContext().Err() != nil {
		// Whatever failed on the client's side (its body, a write), the
		// stream was reset: 499, the same for every path.
		err = ErrClientCanceled
	}
	x.r.ctx.Response.Reset()
	var msg string
	if errors.Is(err, errFallback) {
		msg = x.serveFallback()
	} else {
		a := answerFor(err)
		writeError(x.r.ctx, a.status, a.message, x.reqID, x.idHeader())
		x.r.status, msg = a.status, a.message
	}
	x.rateLimitHeaders(&x.r.ctx.Response.Header)
	if isGRPC(&x.r.ctx.Request.Header) {
		x.grpcAnswer(msg)
	}
	if errors.Is(err, ErrBadRequest) || x.r.body != nil {
		x.r.ctx.SetConnectionClose() // the request is not understood, or its body may be partly read
	}
}

// finish ends the request once: it ends the upstream exchange (its
// connection pooled only when both bodies ended cleanly) and records
// metrics. The exchange stays valid; whoever owns it last releases it
// (the handler, CloseWithError, or a hijack).
func (x *exchange) finish(clientErr error) {
	if x.r.done {
		return
	}
	x.r.done = true
	sent, uploadErr := x.up.Finish(clientErr == nil && !x.r.failed)
	x.r.sent += sent
	if uploadErr != nil {
		x.r.ctx.SetConnectionClose() // the client's body is partly read
		if c := clientSocket(x.r.ctx.Conn()); c != nil {
			// The client may still be sending it: closing at once would
			// reset the connection, and the reset can drop the end of the
			// answer before the client reads it (an early 413).
			c.LingerOnClose()
		}
	}
	if x.r.upErr != nil {
		x.r.up.m.errorInc(x.r.upErr)
	}
	now := time.Now()
	x.leaveOverload(now)
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
	x.p.m.protocols[clientProtocol(x.r.ctx)].Inc()
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

// release recycles the exchange: the request's state goes with one
// assignment; buffers keep their storage.
func (x *exchange) release() {
	x.r = request{}
	x.p = nil
	x.up.Reset()
	x.gen++
	x.reqID, x.scratch, x.method, x.clientID = x.reqID[:0], x.scratch[:0], x.method[:0], x.clientID[:0]
	c := &x.req.Credentials
	x.req = admission.Request{Paths: x.req.Paths[:0], Credentials: policy.Credentials{
		APIKeys: c.APIKeys[:0], Authorization: c.Authorization[:0], ForwardedFor: c.ForwardedFor[:0]}}
	x.fwd.reset()
	exchangePool.Put(x)
}
