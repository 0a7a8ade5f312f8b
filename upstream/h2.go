package upstream

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
)

// HTTP/2 endpoints (Settings.HTTP2) are spoken to through Go's own
// http.Transport, which multiplexes requests as streams over few
// connections, gives each stream flow control (a slow reader slows the
// writer) and carries trailers, which gRPC needs. The Exchange keeps the
// same shape as for HTTP/1.1: the response head lands in Response.Header,
// the body streams through Read, and the trailers follow (Trailer).

// newH2Transport is ep's HTTP/2 client: h2c with prior knowledge for an
// http:// endpoint, h2 by ALPN for an https:// one.
func newH2Transport(ep *Endpoint) *http.Transport {
	var p http.Protocols
	var tc *tls.Config
	if ep.tls != nil {
		p.SetHTTP2(true)
		tc = ep.tls.Clone()
		tc.NextProtos = []string{"h2"}
	} else {
		p.SetUnencryptedHTTP2(true)
	}
	d := &net.Dialer{Timeout: ep.s.ConnectTimeout}
	return &http.Transport{
		Protocols:       &p,
		TLSClientConfig: tc,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			ep.dials.Inc()
			return d.DialContext(ctx, network, addr)
		},
		TLSHandshakeTimeout: ep.s.ConnectTimeout,
		IdleConnTimeout:     ep.s.IdleConnTimeout,
		MaxIdleConnsPerHost: max(ep.s.MaxIdleConnections, 1),
		DisableCompression:  true, // bodies pass as they are: no Accept-Encoding added, nothing decoded
		HTTP2: &http.HTTP2Config{
			SendPingTimeout: ep.s.IOTimeout / 2, // a ping on a silent connection finds a dead one
			PingTimeout:     ep.s.ConnectTimeout,
		},
	}
}

// h2Trip is the HTTP/2 part of one request's trip.
type h2Trip struct {
	resp     *http.Response
	cancel   context.CancelFunc
	timedOut atomic.Bool // the response or I/O timeout fired
	watchdog *time.Timer // the response timeout, then the body's progress timeout
	slot     bool        // a busy slot is held
	body     *h2Body     // the request body, while the transport may read it
}

// h2Body is the request body as the transport reads it (on its own
// goroutine): the bytes read ahead first, then the sender's stream, each
// read reported to the Sender.
type h2Body struct {
	e      *Exchange
	first  []byte
	eof    bool
	total  int64
	closed chan struct{} // the transport closed the body

	mu   sync.Mutex // held by a read in progress
	dead bool       // the exchange finished: reads touch nothing of it
}

func (b *h2Body) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dead {
		return 0, io.ErrClosedPipe
	}
	var n int
	var err error
	if len(b.first) > 0 {
		n = copy(p, b.first)
		b.first = b.first[n:]
		if len(b.first) == 0 && b.eof {
			err = io.EOF
		}
	} else if b.eof {
		return 0, io.EOF
	} else {
		n, err = b.e.t.req.Body.Read(p)
		if err != nil && err != io.EOF {
			err = fmt.Errorf("%w: %w", ErrRequestBody, err)
		}
	}
	if n > 0 {
		b.total += int64(n)
		if perr := b.e.t.req.Sender.BodyProgress(b.total); perr != nil {
			err = fmt.Errorf("%w: %w", ErrRequestBody, perr)
		}
		b.e.h2sent.Store(b.total)
	}
	if err == io.EOF {
		b.e.senderEOF.Store(true)
	} else if err != nil {
		b.e.h2bodyErr.Store(&err)
	}
	return n, err
}

// Close is the transport's: done with the body, sent or not. An upload
// it did not finish is cut, so the sender's read does not hang.
func (b *h2Body) Close() error {
	select {
	case <-b.closed:
	default:
		close(b.closed)
	}
	return nil
}

// roundTripH2 is RoundTrip for an HTTP/2 endpoint.
func (e *Exchange) roundTripH2(ep *Endpoint, req *Request) error {
	if err := ep.takeSlot(); err != nil {
		return err
	}
	h := &e.t.h2
	h.slot = true
	parent := req.Context
	if parent == nil {
		parent = context.Background()
	}
	ctx, cancel := context.WithCancel(parent)
	h.cancel = cancel
	hreq, err := e.newH2Request(ctx, ep, req)
	if err != nil {
		e.finishH2()
		return errors.Join(ErrProtocol, err)
	}
	h.watchdog = time.AfterFunc(req.ResponseTimeout, func() { h.timedOut.Store(true); cancel() })
	resp, err := ep.h2.RoundTrip(hreq)
	if !h.watchdog.Stop() && err == nil {
		// The response timeout fired as the head arrived: the request's
		// context is canceled (or about to be), so its body cannot be
		// read. A timeout, as if the head had come a moment later, not
		// the protocol error the body's first read would report (a
		// gRPC backend that honours the same grpc-timeout answers at that
		// very moment).
		resp.Body.Close()
		h.timedOut.Store(true)
		err = context.DeadlineExceeded
	}
	if err != nil {
		defer e.finishH2()
		return e.h2Error(err)
	}
	h.resp = resp
	rh := &e.Response.Header
	rh.SetNoDefaultContentType(true)
	rh.SetStatusCode(resp.StatusCode)
	for k, vs := range resp.Header {
		for _, v := range vs {
			rh.Add(k, v)
		}
	}
	switch {
	case req.Head || resp.Body == http.NoBody || resp.StatusCode == 204 || resp.StatusCode == 304:
		if resp.ContentLength >= 0 {
			rh.SetContentLength(int(resp.ContentLength))
		} else {
			rh.SetContentLength(-2) // none given: none passed on, as from an HTTP/1.1 upstream
		}
		e.t.bodyEOF = true
	case resp.ContentLength >= 0:
		rh.SetContentLength(int(resp.ContentLength))
		e.t.stream = resp.Body
	default:
		rh.SetContentLength(-1)
		e.t.stream = resp.Body
	}
	if e.t.stream != nil {
		// The body streams under the I/O timeout: the watchdog is pushed
		// on by every read (see readH2).
		h.timedOut.Store(false)
		h.watchdog = time.AfterFunc(ep.s.IOTimeout, func() { h.timedOut.Store(true); cancel() })
	}
	return nil
}

// newH2Request turns the request head into the transport's request.
// Hop-by-hop fields are gone already (the caller made the head the
// upstream's); HTTP/2 forbids them anyway, and carries Host as :authority.
func (e *Exchange) newH2Request(ctx context.Context, ep *Endpoint, req *Request) (*http.Request, error) {
	scheme := "http"
	if ep.tls != nil {
		scheme = "https"
	}
	rh := req.Header
	u := scheme + "://" + ep.addr + string(rh.RequestURI())
	var body io.ReadCloser = http.NoBody
	if req.Body != nil {
		first := []byte(nil)
		if e.t.buf != nil {
			first = (*e.t.buf)[ChunkRoom : ChunkRoom+e.t.first]
		}
		e.t.h2.body = &h2Body{e: e, first: first, eof: e.t.firstEOF, closed: make(chan struct{})}
		body = e.t.h2.body
		e.t.pumped, e.t.taken = true, true
	}
	trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, header textproto.MIMEHeader) error {
		if code == fasthttp.StatusSwitchingProtocols {
			return nil
		}
		var ih fasthttp.ResponseHeader
		ih.SetStatusCode(code)
		for k, vs := range header {
			for _, v := range vs {
				ih.Add(k, v)
			}
		}
		e.t.interimErr = e.t.req.Sender.Interim(&ih)
		return e.t.interimErr
	}}
	hreq, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), string(rh.Method()), u, body)
	if err != nil {
		return nil, err
	}
	hreq.Host = string(rh.Host())
	hreq.ContentLength = int64(req.BodyLen)
	if req.Body == nil {
		hreq.ContentLength = 0
	} else if req.BodyLen < 0 {
		hreq.ContentLength = -1
	}
	for k, v := range rh.All() {
		switch string(k) {
		case fasthttp.HeaderHost, fasthttp.HeaderContentLength, fasthttp.HeaderTransferEncoding, fasthttp.HeaderConnection:
			continue
		}
		hreq.Header.Add(string(k), string(v))
	}
	// The proxy relays trailers (gRPC's status is one): say so, as gRPC
	// servers expect (the client's TE, hop-by-hop, was not forwarded).
	hreq.Header.Set("Te", "trailers")
	return hreq, nil
}

// h2Error maps a failed HTTP/2 round trip to the package's errors.
func (e *Exchange) h2Error(err error) error {
	if e.senderGone() {
		return errors.Join(ErrCanceled, err)
	}
	if p := e.h2bodyErr.Load(); p != nil && errors.Is(*p, ErrRequestBody) {
		return *p
	}
	if e.t.interimErr != nil {
		return e.t.interimErr
	}
	var oe *net.OpError
	var cv *tls.CertificateVerificationError
	var ae tls.AlertError
	var rh tls.RecordHeaderError
	switch {
	case e.t.h2.timedOut.Load():
		return errors.Join(ErrTimeout, err)
	case errors.As(err, &oe) && oe.Op == "dial":
		return dialError(err)
	case errors.As(err, &cv), errors.As(err, &ae), errors.As(err, &rh), strings.Contains(err.Error(), "tls: "):
		return errors.Join(ErrTLS, err)
	}
	return ReadError(err)
}

// readH2 reads the HTTP/2 response body, pushing the I/O watchdog on.
func (e *Exchange) readH2(p []byte) (int, error) {
	h := &e.t.h2
	n, err := e.t.stream.Read(p)
	if n > 0 || err == nil {
		h.watchdog.Reset(e.t.ep.s.IOTimeout)
	}
	switch {
	case err == io.EOF:
		e.t.bodyEOF = true
		h.watchdog.Stop()
	case err != nil && h.timedOut.Load():
		err = errors.Join(ErrTimeout, err)
	case err != nil && e.senderGone():
		err = errors.Join(ErrCanceled, err) // the stream's context is the client's
	case err != nil:
		err = ReadError(err)
	}
	return n, err
}

// Trailer returns the response's trailer fields, once the body has been
// read to its end (nil before, and for HTTP/1.1 upstreams).
func (e *Exchange) Trailer() http.Header {
	if e.t.h2.resp == nil || !e.t.bodyEOF {
		return nil
	}
	return e.t.h2.resp.Trailer
}

// finishH2 ends the HTTP/2 part of a trip: the stream is reset unless it
// ended, the slot freed.
func (e *Exchange) finishH2() {
	h := &e.t.h2
	if h.watchdog != nil {
		h.watchdog.Stop()
	}
	if h.resp != nil {
		_ = h.resp.Body.Close()
	}
	if h.cancel != nil {
		h.cancel()
	}
	if b := h.body; b != nil {
		// The transport closes the body when it is done with it, maybe
		// after RoundTrip returned (a stream still uploading); a read it
		// has in progress is stopped, then the body forgets the exchange.
		if !e.senderEOF.Load() {
			e.t.req.Sender.StopBody()
		}
		<-b.closed
		b.mu.Lock()
		b.dead = true
		b.mu.Unlock()
		h.body = nil
	}
	if h.slot {
		h.slot = false
		<-e.t.ep.busy
	}
	if p := e.h2bodyErr.Load(); p != nil && e.t.pumpErr == nil {
		e.t.pumpErr = *p
	}
	e.t.sent = e.h2sent.Load()
}
