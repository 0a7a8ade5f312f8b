package upstream

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

type nopSender struct{}

func (nopSender) BodyProgress(int64) error               { return nil }
func (nopSender) StopBody()                              {}
func (nopSender) Interim(*fasthttp.ResponseHeader) error { return nil }

// roundTrip sends a bodiless request for path with method and reads the
// whole response; the connection goes back to the pool when it ended
// cleanly.
func roundTrip(ep *Endpoint, method, path string, idempotent bool) (string, error) {
	var h fasthttp.RequestHeader
	h.SetMethod(method)
	h.SetRequestURI(path)
	h.SetHost("up")
	var e Exchange
	defer e.Reset()
	if err := e.RoundTrip(ep, &Request{Header: &h, BodyLen: 0, Idempotent: idempotent, ResponseTimeout: time.Second, Sender: nopSender{}}); err != nil {
		e.Finish(false)
		return "", err
	}
	b, err := io.ReadAll(readerFunc(e.Read))
	e.Finish(err == nil)
	return string(b), err
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// A request that is not idempotent is never sent twice on its own (RFC
// 9112 §9.3.1): when the upstream reads it on a reused connection and
// closes without answering, it may have acted on it. An idempotent one is
// sent again on a fresh connection.
func TestNoReplayOfANonIdempotentRequest(t *testing.T) {
	var got atomic.Int64 // requests the upstream read after the first of a connection
	addr := listen(t, func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		for n := 0; ; n++ {
			var h fasthttp.RequestHeader
			if err := h.Read(br); err != nil {
				return
			}
			if n > 0 {
				got.Add(1)
				return // read it, then close without answering
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	for _, c := range []struct {
		method     string
		idempotent bool
		replayed   bool
	}{{"POST", false, false}, {"PATCH", false, false}, {"GET", true, true}, {"POST", true, true}} {
		u, err := New(settings(addr)) // a pool of its own
		if err != nil {
			t.Fatal(err)
		}
		ep := u.Endpoints()[0]
		got.Store(0)
		if _, err := roundTrip(ep, c.method, "/warm", c.idempotent); err != nil {
			t.Fatal(err)
		}
		body, err := roundTrip(ep, c.method, "/charge", c.idempotent)
		switch {
		case c.replayed && (err != nil || body != "ok"):
			t.Errorf("%s (idempotent): %q %v, want it sent again and answered", c.method, body, err)
		case !c.replayed && !errors.Is(err, ErrReset):
			t.Errorf("%s: %q %v, want ErrReset", c.method, body, err)
		}
		if n := got.Load(); n != 1 {
			t.Errorf("%s: the upstream read the request on a reused connection %d times, want 1", c.method, n)
		}
		u.CloseIdle()
	}
}

// After an upstream restart every pooled connection is dead: each is
// closed on sight and the request goes on a fresh one, however many there
// are (it failed with ErrReset after four).
func TestEveryDeadPooledConnectionIsSkipped(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	s := settings("http://" + ln.Addr().String())
	s.MaxConnections, s.MaxIdleConnections = 10, 10
	u, err := New(s)
	if err != nil {
		t.Fatal(err)
	}
	ep := u.Endpoints()[0]
	var conns []*Conn
	for range 8 {
		c, err := ep.Acquire(time.Now())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	for _, c := range conns {
		ep.Release(c, true, time.Now())
	}
	for range 8 { // the upstream restarts: every pooled connection closes
		(<-accepted).Close()
	}
	go func() { // the restarted upstream
		c := <-accepted
		defer c.Close()
		br := bufio.NewReader(c)
		var h fasthttp.RequestHeader
		if h.Read(br) == nil {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
		time.Sleep(time.Second)
	}()
	time.Sleep(100 * time.Millisecond) // the closes have arrived
	body, err := roundTrip(ep, "GET", "/", true)
	if err != nil || body != "ok" {
		t.Fatalf("after 8 dead pooled connections: %q %v, want the answer on a fresh one", body, err)
	}
	if ep.Idle() > 1 {
		t.Errorf("%d pooled connections left", ep.Idle())
	}
}

// canceledGet is a bodiless GET whose sender's context is ctx.
func canceledGet(ctx context.Context) *Request {
	var h fasthttp.RequestHeader
	h.SetMethod("GET")
	h.SetRequestURI("/")
	h.SetHost("up")
	return &Request{Header: &h, BodyLen: 0, Idempotent: true, ResponseTimeout: 3 * time.Second, Sender: nopSender{}, Context: ctx}
}

// A sender gone before the round trip (an HTTP/2 stream reset while the
// request waited in admission or the overload queue) sends nothing, and
// one gone during it is never undone: the connection is closed, not given
// a deadline that the connection's own re-arming would move (found by a
// review: 1–2 of 20 such round trips waited for the upstream's answer).
func TestCanceledBeforeTheReadIsNotLost(t *testing.T) {
	var got atomic.Int64
	addr := listen(t, func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		for {
			var h fasthttp.RequestHeader
			if err := h.Read(br); err != nil {
				return
			}
			got.Add(1)
			time.Sleep(1500 * time.Millisecond) // a slow upstream
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	s := settings(addr)
	s.MaxConnections, s.MaxIdleConnections = 50, 50
	u, err := New(s)
	if err != nil {
		t.Fatal(err)
	}
	ep := u.Endpoints()[0]
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	const n = 20
	lost := 0
	for i := range n {
		var e Exchange
		start := time.Now()
		err := e.RoundTrip(ep, canceledGet(ctx))
		if !errors.Is(err, ErrCanceled) || time.Since(start) > 500*time.Millisecond {
			lost++
			t.Logf("round trip %d: %v after %v", i, err, time.Since(start).Round(time.Millisecond))
		}
		e.Finish(false)
		e.Reset()
	}
	if lost > 0 || got.Load() > 0 {
		t.Errorf("%d of %d round trips with a done context waited for the upstream (it got %d requests)", lost, n, got.Load())
	}

	// Canceled while waiting for the head: cut at once.
	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	var e Exchange
	start := time.Now()
	err = e.RoundTrip(ep, canceledGet(ctx))
	if !errors.Is(err, ErrCanceled) || time.Since(start) > time.Second {
		t.Errorf("canceled while waiting: %v after %v, want ErrCanceled at once", err, time.Since(start))
	}
	e.Finish(false)
	e.Reset()
}

// A status code outside 100-599 is a protocol error (RFC 9110 §15, RFC 9112
// §4), and the connection is not reused: "000" was read as 200 (fasthttp's
// StatusCode for 0) and "099" went to the client as a two-digit status.
func TestStatusOutOfRangeIsAProtocolError(t *testing.T) {
	ep, answer := answering(t)
	for _, s := range []string{"000", "099", "600", "999", "200", "599"} {
		answer <- "HTTP/1.1 " + s + " X\r\nContent-Length: 5\r\n\r\nhello"
		body, err := roundTrip(ep, "GET", "/", true)
		want := s == "200" || s == "599"
		if (err == nil) != want || !want && !errors.Is(ReadError(err), ErrProtocol) {
			t.Errorf("status %s: %q %v, want ok=%v (else ErrProtocol)", s, body, err, want)
		}
	}
	// Lines fasthttp read as 200 that are not one (a hostile review):
	// a sign, two spaces, four digits, no space after the code; and the
	// valid forms beside them.
	for line, want := range map[string]bool{
		"HTTP/1.1 +200 X": false, "HTTP/1.1  200 X": false, "HTTP/1.1 2000 X": false, "HTTP/1.1 200X": false,
		"HTTP/1.1 20 X": false, "HTTP/2.0 200 X": false, "http/1.1 200 X": false,
		"HTTP/1.1 200 OK": true, "HTTP/1.0 200 OK": true, "HTTP/1.1 200 ": true, "HTTP/1.1 200": true,
	} {
		answer <- line + "\r\nContent-Length: 5\r\n\r\nhello"
		body, err := roundTrip(ep, "GET", "/", true)
		if (err == nil) != want || !want && !errors.Is(ReadError(err), ErrProtocol) {
			t.Errorf("%q: %q %v, want ok=%v (else ErrProtocol)", line, body, err, want)
		}
	}
}

// The response head must come within ResponseTimeout: a head that trickles
// in a byte at a time is not progress (it held a request for as long as
// the upstream kept trickling), while each complete interim response is
// (a 1xx every so often keeps a long request alive).
func TestResponseTimeoutBoundsTheHead(t *testing.T) {
	mode := make(chan string, 1)
	addr := listen(t, func(c net.Conn) {
		defer c.Close()
		var h fasthttp.RequestHeader
		if err := h.Read(bufio.NewReader(c)); err != nil {
			return
		}
		switch <-mode {
		case "trickle": // 33 bytes, one per 100 ms: 3.3 s against a 1 s timeout
			for _, b := range []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") {
				if _, err := c.Write([]byte{b}); err != nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		case "interim": // three 103s 600 ms apart, then the answer: 1.8 s
			for range 3 {
				time.Sleep(600 * time.Millisecond)
				io.WriteString(c, "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
		time.Sleep(time.Second)
	})
	u, err := New(settings(addr))
	if err != nil {
		t.Fatal(err)
	}
	mode <- "trickle"
	start := time.Now()
	if body, err := roundTrip(u.Endpoints()[0], "GET", "/", true); !errors.Is(err, ErrTimeout) {
		t.Errorf("a trickling head: %q %v after %s, want ErrTimeout", body, err, time.Since(start).Round(time.Millisecond))
	} else {
		t.Logf("a trickling head timed out after %s (response timeout 1s)", time.Since(start).Round(time.Millisecond))
	}
	mode <- "interim"
	if body, err := roundTrip(u.Endpoints()[0], "GET", "/", true); err != nil || body != "ok" {
		t.Errorf("interim responses 600 ms apart: %q %v, want the answer", body, err)
	}
}

// Response heads whose framing or field names are faulty are protocol
// errors: an HTTP/1.0 response with Transfer-Encoding (RFC 9112 §6.1; it
// was framed by Content-Length, its chunks passed on as the body, and the
// connection reused) and a field name with a space (RFC 9110 §5.1; it was
// relayed).
func TestFaultyResponseHeadsAreProtocolErrors(t *testing.T) {
	ep, answer := answering(t)
	for _, tc := range []struct {
		head string
		ok   bool
	}{
		{"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\nContent-Length: 13\r\n\r\n3\r\nabc\r\n0\r\n\r\n", false},
		{"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\nX Foo: bar\r\nContent-Length: 3\r\n\r\nabc", false},
		{"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc", true},
		{"HTTP/1.1 200 OK\r\nX-Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", true},
	} {
		answer <- tc.head
		body, err := roundTrip(ep, "GET", "/", true)
		if tc.ok && (err != nil || body != "abc") || !tc.ok && (err == nil || !errors.Is(ReadError(err), ErrProtocol)) {
			t.Errorf("%q: %q %v, want ok=%v (else ErrProtocol)", tc.head, body, err, tc.ok)
		}
	}
}

// An HTTP/1.0 head that comes in pieces cannot be checked for
// Transfer-Encoding before fasthttp drops the field: its connection is
// not reused, so bytes it framed wrongly cannot reach the next request.
func TestSplitHTTP10HeadIsNotReused(t *testing.T) {
	var conns atomic.Int64
	addr := listen(t, func(c net.Conn) {
		defer c.Close()
		conns.Add(1)
		br := bufio.NewReader(c)
		for {
			var h fasthttp.RequestHeader
			if err := h.Read(br); err != nil {
				return
			}
			io.WriteString(c, "HTTP/1.0 200 OK\r\n")
			time.Sleep(50 * time.Millisecond)
			io.WriteString(c, "Connection: keep-alive\r\nTransfer-Encoding: chunked\r\nContent-Length: 13\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
		}
	})
	u, err := New(settings(addr))
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := roundTrip(u.Endpoints()[0], "GET", "/", true); err != nil {
			t.Fatal(err)
		}
	}
	if n := conns.Load(); n != 2 {
		t.Errorf("two requests on %d connection(s): one whose HTTP/1.0 head came in pieces was reused", n)
	}
}

// answering is an endpoint whose upstream reads one request per
// connection and writes, raw, the next response sent on answer.
func answering(t *testing.T) (*Endpoint, chan<- string) {
	answer := make(chan string, 1)
	addr := listen(t, func(c net.Conn) {
		defer c.Close()
		var h fasthttp.RequestHeader
		if err := h.Read(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, <-answer)
		time.Sleep(100 * time.Millisecond)
	})
	u, err := New(settings(addr))
	if err != nil {
		t.Fatal(err)
	}
	return u.Endpoints()[0], answer
}
