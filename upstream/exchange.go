package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
)

// SyncBodyLimit is the largest Content-Length body written before the
// response is read. Anything this small fits in the socket's buffers, so
// the write cannot block on an upstream that answers early; larger and
// chunked bodies are pumped by a goroutine while the response is read
// (full duplex).
const SyncBodyLimit = 64 << 10

// Sender is the side a request comes from, as an Exchange sees it: told
// of upload progress and of interim responses, and asked to stop a body
// read that must end. The proxy's request is one; the methods of a body
// pump run on the pump's goroutine.
type Sender interface {
	// BodyProgress runs before each body write with the bytes read so far;
	// an error ends the upload (a body limit, say) as the sender's fault.
	BodyProgress(total int64) error
	// StopBody unblocks a read of the body in progress: the upload is cut
	// (the upstream answered early, or failed).
	StopBody()
	// Interim receives each interim (1xx) response head, in order; an
	// error it returns ends the exchange with that error.
	Interim(h *fasthttp.ResponseHeader) error
}

// Request is what an Exchange sends.
type Request struct {
	// Header is written as it is: the caller has made it the upstream's.
	Header *fasthttp.RequestHeader
	// Body is the request body, nil without one; BodyLen is its
	// Content-Length, or -1 for a body re-chunked upstream.
	Body    io.Reader
	BodyLen int
	// Head: the response to a HEAD request has no body.
	Head bool
	// Idempotent: the request may be sent again after the upstream
	// closed a reused connection without answering (RFC 9112 §9.3.1: a
	// proxy must not retry a non-idempotent request on its own; the
	// upstream may have acted on it before closing).
	Idempotent bool
	// ResponseTimeout bounds the wait for the response head; upload
	// progress extends it, because a long upload is not a slow upstream.
	ResponseTimeout time.Duration
	Sender          Sender
	// Context, when not nil, is the sender's: once it is done (an HTTP/2
	// client reset its stream or went away) the wait for the response
	// head ends with ErrCanceled, and the upstream's work with it (its
	// connection is closed, or its HTTP/2 stream reset).
	Context context.Context
}

// Exchange is one request's use of an upstream: the round trip (with the
// full-duplex body pump) and then the streamed response body. Its zero
// value is ready; Reset makes it ready again and keeps its storage, so an
// Exchange is pooled with whatever holds it.
type Exchange struct {
	// Response holds the response head once RoundTrip succeeds; its body
	// is read through Read (Response.StreamBody is set by RoundTrip).
	Response fasthttp.Response

	t trip // this request's state: reset by assignment

	// What outlives a request: the pump's channel, and flags the pump
	// goroutine shares (atomics).
	pumpDone  chan error
	senderEOF atomic.Bool           // the pump read the sender's body to its end
	awaiting  atomic.Bool           // waiting for the response head: uploads extend its deadline
	h2sent    atomic.Int64          // HTTP/2: body bytes the transport read (on its goroutine)
	h2bodyErr atomic.Pointer[error] // HTTP/2: the request body's failure
}

// trip is one request's state in an Exchange; its zero value is a fresh
// one.
type trip struct {
	ep   *Endpoint
	conn *Conn
	req  Request

	buf      *[]byte // the body buffer: first bytes read ahead, then the upload's
	first    int     // bytes of the body in buf's data area, not sent yet
	firstEOF bool    // the body ended within them
	sent     int64   // body bytes written upstream (a pump's: read after joining it)
	taken    bool    // the body's sending began: bytes taken from the sender may be gone
	canceled bool    // Request.Context ended the round trip: the connection is not pooled

	// bodyWatch ends the response body's reads when Request.Context is
	// done (an HTTP/2 client reset its stream mid-body): without it a
	// body that pauses (server-sent events) held the upstream connection
	// and the stream's handler until idle_timeout.
	bodyWatch *cancelWatch
	pumped    bool  // a pump started: body bytes may have gone upstream
	pumpErr   error // the pump's result once joined; errPumpRunning until then

	interimErr error

	stream     io.Reader // the response body
	pending    []byte    // body bytes read ahead to validate framing, served first
	pendingBuf *[]byte
	pendingEOF bool
	bodyEOF    bool

	h2 h2Trip // HTTP/2 endpoints
}

var errPumpRunning = errors.New("upstream: body pump running")

// ReadAhead reads the first bytes of body (at least one, unless it ends)
// into the exchange's buffer, where they are sent from: a caller that
// wants to refuse a malformed chunked body before anything goes upstream
// calls it before RoundTrip. It returns the bytes read and whether the
// body ended.
func (e *Exchange) ReadAhead(body io.Reader) (n int, eof bool, err error) {
	e.t.buf = getBuf()
	n, err = io.ReadAtLeast(body, (*e.t.buf)[ChunkRoom:len(*e.t.buf)-2], 1)
	e.t.first, e.t.firstEOF = n, err == io.EOF || (err == nil && n == 0)
	if err == io.EOF {
		err = nil
	}
	return n, e.t.firstEOF, err
}

// RoundTrip sends req to ep and reads the response head into e.Response.
// A pooled connection the upstream closed while idle is replaced, and the
// request sent again when nothing of it can have been taken. Errors are
// Acquire's, ReadError's (ErrTimeout, ErrReset, ErrProtocol),
// ErrRequestBody for the sender's side, or the Sender's Interim error.
// After an error the exchange holds no connection and no pump; RoundTrip
// may be called again, on another endpoint.
func (e *Exchange) RoundTrip(ep *Endpoint, req *Request) error {
	e.t.ep, e.t.req, e.t.interimErr = ep, *req, nil
	if ep.h2 != nil {
		return e.roundTripH2(ep, req)
	}
	var watch *cancelWatch
	defer func() { watch.end() }() // every way out: a late cancel touches nothing
	for attempt := 0; ; attempt++ {
		if e.senderGone() {
			// Reset while queued (admission, the overload queue): nothing
			// is sent.
			return ErrCanceled
		}
		now := time.Now()
		c, err := acquireLive(ep, now)
		if err != nil {
			return err
		}
		e.t.conn = c
		// Both take effect lazily, at the next network read or write.
		c.WriteTimeout, c.ReadTimeout = ep.s.IOTimeout, req.ResponseTimeout
		if req.Context != nil {
			watch.end()
			watch = watchCancel(req.Context, c.Conn)
		}

		err = req.Header.Write(c.W)
		started := false
		if err == nil {
			switch {
			case req.Body == nil:
				err = c.W.Flush()
			case req.BodyLen >= 0 && req.BodyLen <= SyncBodyLimit:
				started, e.t.taken = true, true
				if err = e.sendBody(c); errors.Is(err, ErrRequestBody) {
					e.closeConn()
					return e.senderFailed(err)
				}
			default:
				started, e.t.taken = true, true
				e.awaiting.Store(true)
				e.startPump(c)
			}
		}
		if err != nil {
			e.closeConn()
			if e.t.canceled = watch.end(); e.t.canceled {
				return ErrCanceled
			}
			if c.Reused && !started && attempt == 0 {
				continue // a stale keep-alive connection: nothing was sent yet
			}
			return ReadError(err)
		}

		e.Response.StreamBody = true
		e.Response.SkipBody = req.Head
		e.Response.Header.SetNoDefaultContentType(true)
		c.headWait = true
		c.ForgetReadDeadline() // the head's deadline starts at its first read
		err = c.ReadResponse(&e.Response, e.interim)
		c.headWait = false
		c.ForgetReadDeadline()
		e.awaiting.Store(false)
		if e.t.canceled = watch.end(); e.t.canceled {
			// Even with a head read: the watch closed the connection, so
			// its body could not be.
			e.abortPump()
			e.closeConn()
			return ErrCanceled
		}
		if e.t.pumped {
			c.ForgetReadDeadline() // the pump may have moved it
		}
		if err == nil {
			e.t.stream = e.Response.BodyStream()
			e.t.bodyEOF = e.t.stream == nil // HEAD, 1xx, 204, 304: no body
			if e.t.stream != nil && req.Context != nil {
				e.t.bodyWatch = watchCancel(req.Context, c.Conn)
			}
			return nil
		}
		// The pump may be what failed (the sender gone, its body too
		// large): stop it and report its error rather than the symptom.
		if e.abortPump(); errors.Is(e.t.pumpErr, ErrRequestBody) {
			e.closeConn()
			return e.senderFailed(e.t.pumpErr)
		}
		e.closeConn()
		if e.t.interimErr != nil {
			return e.t.interimErr
		}
		if c.Reused && req.Body == nil && req.Idempotent && attempt == 0 && errors.Is(err, io.EOF) {
			continue
		}
		return ReadError(err)
	}
}

// senderGone reports whether the sender's context (Request.Context) is
// done: an HTTP/2 client reset its stream or went away.
func (e *Exchange) senderGone() bool {
	return e.t.req.Context != nil && e.t.req.Context.Err() != nil
}

// senderFailed is err, a failure of the request body's side, or
// ErrCanceled when the sender is gone: a reset stream, not a bad body.
func (e *Exchange) senderFailed(err error) error {
	if e.senderGone() {
		return errors.Join(ErrCanceled, err)
	}
	return err
}

// cancelWatch ends a round trip when its sender's context is done: it
// closes the connection (a deadline would not do: Conn re-arms its own),
// so its reads and writes fail at once. end stops the watch and reports
// whether it fired; after end a late cancellation touches nothing (the
// connection may be pooled and another request's by then).
type cancelWatch struct {
	mu          sync.Mutex
	over, fired bool
	stop        func() bool
}

func watchCancel(ctx context.Context, c net.Conn) *cancelWatch {
	w := &cancelWatch{}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stop = context.AfterFunc(ctx, func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if !w.over {
			w.fired = true
			_ = c.Close()
		}
	})
	return w
}

// end stops w (nil: no watch) and reports whether it fired.
func (w *cancelWatch) end() bool {
	if w == nil {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.over {
		w.over = true
		w.stop()
	}
	return w.fired
}

// acquireLive takes a connection to ep. Every pooled connection is looked
// at before use (one non-blocking peek): one the upstream closed while
// idle would cost a body that cannot be replayed, and one it wrote to
// unasked is out of step — its next "response" would be another client's
// (RFC 9112 §9.3). Each such one is closed and the next taken, until a
// live one or a fresh dial: after an upstream restart every pooled
// connection is dead, and none of them is a failure of the request (the
// pool is finite: the loop ends).
func acquireLive(ep *Endpoint, now time.Time) (*Conn, error) {
	for {
		c, err := ep.Acquire(now)
		if err != nil || !c.Reused || c.Alive() {
			return c, err
		}
		ep.Release(c, false, now)
	}
}

func (e *Exchange) interim(h *fasthttp.ResponseHeader) error {
	e.t.conn.ForgetReadDeadline() // an interim response is progress: the final head gets a full timeout
	e.t.interimErr = e.t.req.Sender.Interim(h)
	return e.t.interimErr
}

// Replayable reports whether the request can still go whole to another
// endpoint or upstream: its body's sending has not begun. Bytes read ahead
// (ReadAhead) stay in the exchange's buffer and go first wherever it is
// sent next; once sending began, bytes taken from the sender may be gone
// though none was written (a write that fails at once), so a count of
// bytes written would not do: a reroute would send a body missing its
// start.
func (e *Exchange) Replayable() bool { return !e.t.taken }

// startPump streams the body from its own goroutine, so that the
// response can be read while the request is still being written.
func (e *Exchange) startPump(c *Conn) {
	e.t.pumped = true
	e.t.pumpErr = errPumpRunning
	if e.pumpDone == nil {
		e.pumpDone = make(chan error, 1)
	}
	go func() {
		err := e.sendBody(c)
		if errors.Is(err, ErrRequestBody) {
			// The upstream waits for body bytes that will never come:
			// unblock the read of the response head.
			_ = c.Conn.Close()
		}
		e.pumpDone <- err
	}()
}

// sendBody streams the request body upstream: a Content-Length body as it
// is, others re-chunked. Failures of the sender's side are wrapped in
// ErrRequestBody.
func (e *Exchange) sendBody(c *Conn) error {
	if e.t.buf == nil {
		e.t.buf = getBuf()
	}
	first := e.t.first
	e.t.first = 0
	timeout := e.t.req.ResponseTimeout
	var armed time.Time
	// A pumped body is not held (see SendBody): the upstream may answer
	// while the client is still sending, and must get the head at once.
	sent, err := c.SendBody(e.t.req.Body, *e.t.buf, first, e.t.firstEOF, e.t.req.BodyLen < 0, !e.t.pumped, func(total int64, eof bool) error {
		if eof {
			e.senderEOF.Store(true)
			return nil
		}
		if err := e.t.req.Sender.BodyProgress(total); err != nil {
			return fmt.Errorf("%w: %w", ErrRequestBody, err)
		}
		if now := time.Now(); e.awaiting.Load() && now.Sub(armed) > timeout>>3 {
			// Upload progress counts as progress for the response
			// timeout too.
			armed = now
			_ = c.Conn.SetReadDeadline(now.Add(timeout))
		}
		return nil
	})
	e.t.sent += sent
	return err
}

// joinPump waits for the pump if one runs. If the sender has not finished
// its upload (the upstream answered early), the upload is cut.
func (e *Exchange) joinPump() {
	if e.t.pumpErr != errPumpRunning {
		return
	}
	if !e.senderEOF.Load() {
		e.abortPump()
		return
	}
	e.t.pumpErr = <-e.pumpDone
}

// abortPump cuts a running upload: the sender's read is stopped and the
// upstream write unblocked, then the pump is joined.
func (e *Exchange) abortPump() {
	if e.t.pumpErr != errPumpRunning {
		return
	}
	e.t.req.Sender.StopBody()
	if e.t.conn != nil {
		_ = e.t.conn.Conn.SetWriteDeadline(time.Now())
	}
	e.t.pumpErr = <-e.pumpDone
}

// closeConn closes the connection and frees its slot.
func (e *Exchange) closeConn() {
	if e.t.conn != nil {
		e.Response.CloseBodyStream() //nolint:errcheck // releases fasthttp's stream before its reader goes
		e.t.ep.Release(e.t.conn, false, time.Now())
		e.t.conn = nil
	}
}

// Prefetch decodes the first chunk of a chunked body when it came with
// the head, so that a response with broken chunking is known before its
// head goes anywhere (later chunks can only be cut). Its bytes are served
// first by Read. A framing error is ErrProtocol.
func (e *Exchange) Prefetch() error {
	if e.t.conn == nil || e.t.stream == nil || e.Response.Header.ContentLength() != -1 || e.t.conn.R.Buffered() == 0 {
		return nil
	}
	e.t.pendingBuf = getBuf()
	n, err := e.t.stream.Read(*e.t.pendingBuf)
	if err != nil && err != io.EOF {
		return errors.Join(ErrProtocol, err)
	}
	e.t.pending, e.t.pendingEOF = (*e.t.pendingBuf)[:n], err == io.EOF
	return nil
}

// HasBody reports whether the response has a body to read (HEAD, 1xx,
// 204 and 304 answers have none).
func (e *Exchange) HasBody() bool { return e.t.stream != nil }

// Buffered returns the response bytes already read past the head (a body
// of up to this length can be read without waiting for the network), or
// -1 for an HTTP/2 response: its body is read through the stream, whose
// trailers come after it (Trailer), so it is never read ahead.
func (e *Exchange) Buffered() int {
	if e.t.conn == nil {
		return -1
	}
	return e.t.conn.R.Buffered()
}

// Readable reports, without waiting, whether Read would return bytes now:
// some are in hand, or have arrived from the upstream (HTTP/1.1 only; an
// HTTP/2 body says no). For gathering what has arrived into one write.
func (e *Exchange) Readable() bool {
	return len(e.t.pending) > 0 || e.t.conn != nil && e.t.stream != nil && !e.t.bodyEOF && e.t.conn.Readable()
}

// Prefetched reports whether Read has bytes (or the end) in hand.
func (e *Exchange) Prefetched() bool { return len(e.t.pending) > 0 || e.t.pendingEOF }

// Read reads the response body, each read under the I/O timeout: one
// read upstream per call, so a slow reader slows the upstream
// (backpressure). It returns io.EOF at the end, and ReadError's errors.
func (e *Exchange) Read(p []byte) (int, error) {
	if len(e.t.pending) > 0 {
		n := copy(p, e.t.pending)
		e.t.pending = e.t.pending[n:]
		return n, nil
	}
	if e.t.pendingEOF || e.t.stream == nil {
		e.t.bodyEOF = true
		return 0, io.EOF
	}
	if e.t.conn == nil {
		return e.readH2(p)
	}
	e.t.conn.ReadTimeout = e.t.ep.s.IOTimeout
	n, err := e.t.stream.Read(p)
	switch {
	case err == io.EOF:
		e.t.bodyEOF = true
	case err != nil && e.senderGone():
		err = errors.Join(ErrCanceled, err) // the body watch closed the connection
	case err != nil:
		err = ReadError(err)
	}
	return n, err
}

// Tunnel completes a protocol upgrade after a 101 response: see
// Conn.Tunnel. The connection is closed when it ends.
func (e *Exchange) Tunnel(client net.Conn, idle time.Duration) (up, down int64) {
	e.joinPump() // an upgrade request has no body; nothing to wait for in practice
	c := e.t.conn
	e.t.conn = nil
	defer e.t.ep.Release(c, false, time.Now())
	return c.Tunnel(client, idle)
}

// Finish ends the exchange once: the upload is joined (or cut, if the
// sender has not finished it), and the connection goes back to the pool
// when clean says the caller read the whole response and the exchange
// ended cleanly on both sides, else it is closed. It returns the body
// bytes sent and the upload's error, if it failed.
func (e *Exchange) Finish(clean bool) (sent int64, uploadErr error) {
	if e.t.ep != nil && e.t.ep.h2 != nil {
		e.finishH2()
		return e.t.sent, e.t.pumpErr
	}
	if clean {
		e.joinPump()
	} else {
		e.abortPump()
	}
	if e.t.bodyWatch.end() {
		e.t.canceled = true // it closed the connection
	}
	e.t.bodyWatch = nil
	if e.t.conn != nil {
		// Bytes left unread after the response are not the next one's: an
		// upstream that sent more than it framed (a body after a HEAD, 204
		// or 304 answer, a second response) would desync the connection.
		// Those arriving later are caught by the probe before reuse.
		// Nor is a connection whose request had a body that was answered
		// with an error: an upstream that answers 401 or 413 without
		// reading the body may take the body for its next request, and
		// its answer, arriving later than the probe before reuse looks,
		// would be the next client's.
		reusable := clean && e.t.bodyEOF && e.t.pumpErr == nil && !e.t.canceled && !e.Response.ConnectionClose() &&
			e.Response.Header.ContentLength() != -2 && e.t.conn.R.Buffered() == 0 &&
			!(e.t.taken && e.Response.StatusCode() >= 400)
		e.Response.CloseBodyStream() //nolint:errcheck
		e.t.ep.Release(e.t.conn, reusable, time.Now())
		e.t.conn = nil
	}
	return e.t.sent, e.t.pumpErr
}

// Reset readies the exchange for another request; it must be finished.
func (e *Exchange) Reset() {
	putBuf(e.t.buf)
	putBuf(e.t.pendingBuf)
	e.t = trip{}
	e.Response.Reset()
	e.senderEOF.Store(false)
	e.awaiting.Store(false)
	e.h2sent.Store(0)
	e.h2bodyErr.Store(nil)
}

func getBuf() *[]byte { return copyBufPool.Get().(*[]byte) }

func putBuf(b *[]byte) {
	if b != nil {
		copyBufPool.Put(b)
	}
}
