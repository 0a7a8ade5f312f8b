package proxy

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/policy"
)

// The HTTP/2 front-end. fasthttp has no HTTP/2, so HTTP/2 (h2 by ALPN,
// prior-knowledge h2c) is served by Go's net/http, and ServeHTTP adapts
// each stream to the one request path: the stream's head becomes a
// fasthttp request head, its body the request body stream, and the
// exchange runs on a fasthttp.RequestCtx whose "connection" is the stream
// (h2Stream: addresses, TLS state, deadlines and writes go to the
// stream). Routing, identity, limits, the circuit and bulkhead, the
// upstream pools and their health are therefore the same objects for
// both protocols, and so are the metrics and the access log.

// NewHTTP2Server returns the net/http server for the proxy listener's
// HTTP/2 connections (see frontend/listen, which hands it the TLS ones
// that chose h2 by ALPN and, with server.h2c, the plaintext ones that
// open with the HTTP/2 preface). Its TLSConfig stays nil: connections
// come handshaken.
func (p *Proxy) NewHTTP2Server(srv *policy.Server, http1Conns func() int32) *http.Server {
	var protocols http.Protocols
	protocols.SetHTTP2(true)
	protocols.SetUnencryptedHTTP2(srv.H2C)
	return &http.Server{
		Handler:           p,
		Protocols:         &protocols,
		ReadHeaderTimeout: srv.HeaderTimeout,
		IdleTimeout:       srv.IdleTimeout,
		MaxHeaderBytes:    srv.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		ConnState:         p.h2ConnState(srv.MaxConnections, http1Conns),
		// "OPTIONS *" goes upstream as over HTTP/1.1, not to net/http's
		// own answer (200, never forwarded, never logged).
		DisableGeneralOptionsHandler: true,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, h2ConnKey{}, &h2Conn{c: c})
		},
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams: 250,
			// The protocol's default frame size, not net/http's 1 MiB: what
			// clients (and h2spec) assume before they read our SETTINGS.
			MaxReadFrameSize: 16 << 10,
		},
	}
}

// h2ConnState counts the HTTP/2 connections and holds server.max_connections
// over both protocols: a new HTTP/2 connection that would take the open
// ones (its own and fasthttp's HTTP/1.1 ones, http1Conns) past max is
// closed at once, as fasthttp closes an HTTP/1.1 one past its Concurrency.
// (fasthttp counts only its own, so HTTP/1.1 may still reach max beside
// the HTTP/2 connections: the bound on both together is 2 × max at worst.)
func (p *Proxy) h2ConnState(max int, http1Conns func() int32) func(net.Conn, http.ConnState) {
	return func(c net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			if n := int(p.h2Conns.Add(1)); max > 0 && n+int(http1Conns()) > max {
				p.m.connsRefused.Inc()
				_ = c.Close()
			}
		case http.StateClosed, http.StateHijacked:
			p.h2Conns.Add(-1)
		}
	}
}

// h2Conn is what the proxy keeps of an HTTP/2 client connection: how many
// of its streams went upstream or ended early, and how many of those its
// client gave up on before the answer (premature).
type h2Conn struct {
	c         net.Conn
	ended     atomic.Int64
	premature atomic.Int64
	closed    atomic.Bool
}

type h2ConnKey struct{}

// Rapid reset (CVE-2023-44487): a client that opens streams and resets
// them at once makes each one cost a request upstream (the reset often
// arrives after the request has gone), while the connection stays open
// for more. As Envoy does, a stream whose client gave up on it within
// prematureReset of its start, before its answer's head (it reset the
// stream, or its grpc-timeout passed, which costs as much and needs no
// reset), is premature; once prematureJudged of a connection's streams
// have ended, a connection whose premature streams are more than half of
// them is closed. Streams answered by the sidecar itself (a 404, a 429)
// count for neither side: they cost the upstream nothing, and mixed in
// they would dilute the share.
const (
	prematureReset  = time.Second
	prematureJudged = 200
)

// streamEnded counts a stream of c that ran from start: forwarded says it
// went upstream, premature that its client gave up on it before the
// answer. It closes c once its premature streams are past the budget.
func (p *Proxy) streamEnded(c *h2Conn, start time.Time, forwarded, premature bool) {
	premature = premature && time.Since(start) < prematureReset
	if !forwarded && !premature {
		return
	}
	n := c.ended.Add(1)
	if !premature {
		return
	}
	if r := c.premature.Add(1); n >= prematureJudged && 2*r > n && c.closed.CompareAndSwap(false, true) {
		p.m.rapidResets.Inc()
		p.log.Warn("HTTP/2 connection closed: its client gave up on most of its streams at once (rapid reset)",
			"remote", c.c.RemoteAddr().String(), "streams", n, "premature", r)
		_ = c.c.Close() // net/http has no GOAWAY for one connection
	}
}

// H2Connections is the number of HTTP/2 client connections open now.
func (p *Proxy) H2Connections() int { return int(p.h2Conns.Load()) }

// h2Stream is one HTTP/2 stream seen as the net.Conn of a RequestCtx.
type h2Stream struct {
	ctx    fasthttp.RequestCtx
	w      http.ResponseWriter
	rc     *http.ResponseController
	r      *http.Request
	remote net.Addr
	local  net.Addr
	err    error // the first write error: the client reset the stream or went away

	forwarded bool // the request went upstream (exchange.send)
	abandoned bool // its grpc-timeout passed before the upstream answered (exchange.answer)
}

// h2TLSStream is an h2Stream over TLS: it also has the TLS state, which
// is how fasthttp (IsTLS, TLSConnectionState) tells a TLS connection.
type h2TLSStream struct{ *h2Stream }

func (s h2TLSStream) Handshake() error                     { return nil }
func (s h2TLSStream) ConnectionState() tls.ConnectionState { return *s.r.TLS }

var h2StreamPool = sync.Pool{New: func() any { return new(h2Stream) }}

// ServeHTTP serves one HTTP/2 request (the http.Handler of the HTTP/2
// server).
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if bad := connectionSpecific(r.Header); bad != "" {
		// RFC 9113 §8.2.2: a request with a connection-specific field is
		// malformed. net/http (Go 1.26) answers those with 400 before the
		// handler runs; this keeps the guarantee if it ever lets one by
		// (it used to: golang/go#26321).
		p.m.badReqs.Inc()
		http.Error(w, `{"error":"malformed request: connection-specific field `+bad+` in HTTP/2"}`, http.StatusBadRequest)
		return
	}
	if !strings.HasPrefix(r.RequestURI, "/") && r.Method != http.MethodConnect && (r.Method != http.MethodOptions || r.RequestURI != "*") {
		// RFC 9113 §8.3.1: :path is a path and query (or "*"); an
		// absolute URI there is malformed. Taken as absolute-form, its
		// authority would override :authority, which a load balancer in
		// front may have routed by.
		p.m.badReqs.Inc()
		http.Error(w, `{"error":"malformed request: :path is not a path"}`, http.StatusBadRequest)
		return
	}
	if !validPath(r.RequestURI) {
		// A space or a control byte in :path would split or end the
		// HTTP/1.1 request line upstream differently for each backend
		// ("GET /x HTTP/1.0 HTTP/1.1"); the HTTP/1.1 front-end refuses
		// the same targets.
		p.m.badReqs.Inc()
		http.Error(w, `{"error":"malformed request: :path has a space or a control byte"}`, http.StatusBadRequest)
		return
	}
	if !consistentLength(r) {
		// RFC 9113 §8.1.1: a content-length that is repeated, or differs
		// from the DATA the stream carries (a HEADERS frame that ends the
		// stream carries none), makes the request malformed; the
		// HTTP/1.1 front-end refuses repeated ones too.
		p.m.badReqs.Inc()
		http.Error(w, `{"error":"malformed request: content-length"}`, http.StatusBadRequest)
		return
	}
	hc, _ := r.Context().Value(h2ConnKey{}).(*h2Conn)
	start := time.Now()
	s := h2StreamPool.Get().(*h2Stream)
	s.w, s.r, s.rc, s.err = w, r, http.NewResponseController(w), nil
	s.forwarded, s.abandoned = false, false
	s.remote, _ = net.ResolveTCPAddr("tcp", r.RemoteAddr)
	s.local, _ = r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	ctx := &s.ctx
	ctx.Request.Reset()
	ctx.Response.Reset()
	ctx.ResetUserValues()
	var conn net.Conn = s
	if r.TLS != nil {
		conn = h2TLSStream{s}
	}
	ctx.Init2(conn, nil, false)

	h := &ctx.Request.Header
	h.SetMethod(r.Method)
	h.SetRequestURI(r.RequestURI)
	h.SetProtocol("HTTP/1.1")
	h.SetHost(r.Host)
	for k, vs := range r.Header {
		switch k {
		case "Host":
			continue // :authority is the authority (r.Host); a second one is not taken from a field
		case "Content-Length":
			continue // the framing is r.ContentLength's, set below
		}
		for _, v := range vs {
			h.Add(k, v)
		}
	}
	switch {
	case r.ContentLength > 0:
		ctx.Request.SetBodyStream(r.Body, int(r.ContentLength))
	case r.ContentLength < 0:
		ctx.Request.SetBodyStream(r.Body, -1)
	case len(r.Header["Content-Length"]) > 0 || r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch:
		// "content-length: 0" goes on, as over HTTP/1.1; and a method
		// whose content means something says it has none (RFC 9110 §8.6:
		// a user agent SHOULD send Content-Length then).
		h.SetContentLength(0)
	default:
		// No content and no length (a GET): no framing field upstream
		// either (RFC 9110 §8.6), as for an HTTP/1.1 request without
		// one. fasthttp's "no body" length is -2, which only its parser
		// sets; SetContentLength(-2) adds a chunked Transfer-Encoding,
		// removed again here.
		h.SetContentLength(-2)
		h.Del(fasthttp.HeaderTransferEncoding)
	}

	p.Handler(ctx)
	// The answer's head goes out in respond: a stream reset by now was
	// given up on before it.
	premature := r.Context().Err() != nil || s.abandoned
	cut := s.respond()
	if hc != nil {
		p.streamEnded(hc, start, s.forwarded, premature)
	}

	s.w, s.r, s.rc, s.remote, s.local = nil, nil, nil, nil, nil
	ctx.Request.Reset()
	ctx.Response.Reset()
	h2StreamPool.Put(s)
	if cut {
		// A body cut short (the upstream failed mid-body) must not end
		// like a whole one: RST_STREAM, not END_STREAM, as an HTTP/1.1
		// client gets no last chunk.
		panic(http.ErrAbortHandler)
	}
}

// validPath reports whether :path can be an HTTP/1.1 request-target: no
// space, no control byte (RFC 9112 §3.2).
func validPath(p string) bool {
	for i := 0; i < len(p); i++ {
		if c := p[i]; c <= ' ' || c == 0x7f {
			return false
		}
	}
	return true
}

// consistentLength reports whether a request's content-length, if it has
// one, is a single value that agrees with its body: net/http takes the
// first of several, and ignores one on a stream its HEADERS frame ended.
func consistentLength(r *http.Request) bool {
	vs := r.Header["Content-Length"]
	switch {
	case len(vs) == 0:
		return true
	case len(vs) > 1:
		return false
	}
	n, err := strconv.ParseUint(vs[0], 10, 63)
	return err == nil && int64(n) == r.ContentLength
}

// respond writes the response the request path made to the stream: the
// head, then the body as it streams (each write flushed: HTTP/2 flow
// control is the backpressure), then the upstream's trailers. cut
// reports a streamed body that ended with an error.
func (s *h2Stream) respond() (cut bool) {
	resp := &s.ctx.Response
	wh := s.w.Header()
	for k, v := range resp.Header.All() {
		switch string(k) {
		case fasthttp.HeaderConnection, fasthttp.HeaderTransferEncoding, "Keep-Alive", "Proxy-Connection", fasthttp.HeaderContentLength:
			continue // connection-specific: HTTP/2 frames the body itself
		}
		wh.Add(string(k), string(v))
	}
	if _, ok := wh["Content-Type"]; !ok {
		// None from the upstream: none to the client. net/http would
		// sniff one from the body (text/html for markup), which an
		// upstream's nosniff is there to prevent.
		wh["Content-Type"] = nil
	}
	x, streamed := resp.BodyStream().(*exchange)
	if !streamed {
		switch status := resp.StatusCode(); {
		case s.r.Method == http.MethodHead:
			// The length the GET would have (RFC 9110 §9.3.2), when the
			// upstream said it; never the empty body's.
			if cl := resp.Header.ContentLength(); cl >= 0 {
				wh.Set(fasthttp.HeaderContentLength, strconv.Itoa(cl))
			}
		case status < 200 || status == fasthttp.StatusNoContent || status == fasthttp.StatusNotModified:
			// No Content-Length in a 1xx or 204 (RFC 9110 §8.6), nor a
			// wrong one in a 304.
		case !resp.SkipBody:
			wh.Set(fasthttp.HeaderContentLength, strconv.Itoa(len(resp.Body())))
		}
		s.w.WriteHeader(resp.StatusCode())
		_, _ = s.w.Write(resp.Body())
		return
	}
	if cl := resp.Header.ContentLength(); cl >= 0 {
		wh.Set(fasthttp.HeaderContentLength, strconv.Itoa(cl))
	}
	s.w.WriteHeader(resp.StatusCode())
	_, err := x.WriteTo(s)
	if err == nil {
		for k, vs := range x.up.Trailer() {
			for _, v := range vs {
				wh.Add(http.TrailerPrefix+k, v)
			}
		}
	}
	// End the exchange with the write's error, but leave its release to
	// ServeHTTP's Response.Reset, which closes the body stream (x) once
	// more through CloseWithError: finish runs once, and x goes back to
	// its pool only when nothing refers to it any longer.
	x.finish(err)
	return err != nil
}

// Write writes body bytes to the stream and flushes them.
func (s *h2Stream) Write(b []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	n, err := s.w.Write(b)
	if err == nil {
		err = s.rc.Flush()
	}
	s.err = err
	return n, err
}

// writeInterim sends an interim (1xx) response on the stream.
func (s *h2Stream) writeInterim(h *fasthttp.ResponseHeader) {
	wh := s.w.Header()
	var names []string
	for k, v := range h.All() { // hop-by-hop fields are gone (Interim)
		if string(k) == fasthttp.HeaderContentLength {
			continue
		}
		names = append(names, string(k))
		wh.Add(string(k), string(v))
	}
	s.w.WriteHeader(h.StatusCode())
	for _, k := range names {
		wh.Del(k) // they were the interim response's, not the final one's
	}
}

func (s *h2Stream) Read([]byte) (int, error)           { return 0, io.EOF } // the body comes as the request's body stream
func (s *h2Stream) Close() error                       { return nil }       // the server ends the stream
func (s *h2Stream) LocalAddr() net.Addr                { return s.local }
func (s *h2Stream) RemoteAddr() net.Addr               { return s.remote }
func (s *h2Stream) SetDeadline(t time.Time) error      { return s.SetReadDeadline(t) }
func (s *h2Stream) SetReadDeadline(t time.Time) error  { return s.rc.SetReadDeadline(t) }
func (s *h2Stream) SetWriteDeadline(t time.Time) error { return s.rc.SetWriteDeadline(t) }

// Context is the stream's: done when its client resets it or goes away
// (the request path gives it to the upstream exchange).
func (s *h2Stream) Context() context.Context { return s.r.Context() }

// connectionSpecific names a field HTTP/2 forbids in a request (RFC 9113
// §8.2.2), or returns "".
func connectionSpecific(h http.Header) string {
	for _, k := range [...]string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade"} {
		if _, ok := h[k]; ok {
			return k
		}
	}
	if te, ok := h["Te"]; ok && (len(te) != 1 || !strings.EqualFold(strings.TrimSpace(te[0]), "trailers")) {
		return "TE"
	}
	return ""
}

// clientProtocol is the index in protocolNames of the protocol ctx's
// client spoke.
func clientProtocol(ctx *fasthttp.RequestCtx) int {
	if clientStream(ctx) != nil {
		return 1
	}
	return 0
}

// clientStream returns the HTTP/2 stream a request came on, or nil for an
// HTTP/1.1 connection.
func clientStream(ctx *fasthttp.RequestCtx) *h2Stream {
	switch c := ctx.Conn().(type) {
	case *h2Stream:
		return c
	case h2TLSStream:
		return c.h2Stream
	}
	return nil
}
