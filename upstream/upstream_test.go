package upstream

import (
	"crypto/tls"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func settings(endpoints string) Settings {
	return Settings{Name: "t", Endpoints: endpoints, ConnectTimeout: time.Second, IOTimeout: time.Second,
		MaxConnections: 2, MaxIdleConnections: 2, IdleConnTimeout: time.Minute, RetryBudget: 0.2,
		PassiveFailures: 2, PassiveEjection: time.Minute}
}

// listen accepts connections on a loopback port and hands each to handle.
func listen(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return "http://" + ln.Addr().String()
}

func TestNewValidates(t *testing.T) {
	for name, mutate := range map[string]func(*Settings){
		"no name":       func(s *Settings) { s.Name = "" },
		"bad URL":       func(s *Settings) { s.Endpoints = "ftp://x:1" },
		"bad port":      func(s *Settings) { s.Endpoints = "http://x:99999" },
		"no timeout":    func(s *Settings) { s.ConnectTimeout = 0 },
		"idle > max":    func(s *Settings) { s.MaxIdleConnections = 3 },
		"budget":        func(s *Settings) { s.RetryBudget = 2 },
		"not a CA":      func(s *Settings) { s.CAPEM = "nope" },
		"no connection": func(s *Settings) { s.MaxConnections = 0 },
	} {
		s := settings("http://127.0.0.1:1")
		mutate(&s)
		if _, err := New(s); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	u, err := New(settings("http://127.0.0.1:1, https://example.com"))
	if err != nil {
		t.Fatal(err)
	}
	eps := u.Endpoints()
	if len(eps) != 2 || eps[0].Addr() != "127.0.0.1:1" || eps[0].TLS() != nil || eps[1].Addr() != "example.com:443" ||
		eps[1].TLS() == nil || eps[1].TLS().ServerName != "example.com" {
		t.Errorf("endpoints %v %v", eps[0], eps[1])
	}
	if u.Settings() != settings("http://127.0.0.1:1, https://example.com") {
		t.Error("settings built twice from the same values differ")
	}
}

func TestPickSkipsEjectedAndBalances(t *testing.T) {
	u, err := New(settings("http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	seen := map[string]int{}
	for range 6 {
		seen[u.Pick(nil, now).Addr()]++
	}
	if len(seen) != 3 || seen["127.0.0.1:1"] != 2 {
		t.Errorf("round robin over 6 picks: %v", seen)
	}
	a := u.Endpoints()[0]
	if u.Outcome(a, true, now) || !u.Outcome(a, true, now) {
		t.Fatal("two failures in a row (PassiveFailures 2) must eject, the first alone not")
	}
	for range 6 {
		if ep := u.Pick(nil, now); ep == a {
			t.Fatal("an ejected endpoint was picked")
		}
	}
	if u.UsableCount(now) != 2 || u.UsableCount(now.Add(2*time.Minute)) != 3 {
		t.Errorf("usable %d now, %d after the ejection", u.UsableCount(now), u.UsableCount(now.Add(2*time.Minute)))
	}
	if ep := u.Pick(u.Endpoints()[1], now); ep == u.Endpoints()[1] || ep == a {
		t.Errorf("avoid ignored: %s", ep.Addr())
	}
}

func TestRetryBudget(t *testing.T) {
	u, err := New(settings("http://127.0.0.1:1"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for u.RetryToken() {
		n++
	}
	if n != 3 {
		t.Errorf("start allowance %d retries, want 3", n)
	}
	for range 10 {
		u.EarnRetry() // 10 requests at 0.2: two retries
	}
	if !u.RetryToken() || !u.RetryToken() || u.RetryToken() {
		t.Error("10 requests at a 0.2 budget must earn exactly 2 retries")
	}
}

// Connections are pooled and reused; a full endpoint answers ErrBusy; a
// refused connect is ErrConnectRefused.
func TestAcquireReleaseAndErrors(t *testing.T) {
	addr := listen(t, func(c net.Conn) { io.Copy(io.Discard, c) })
	s := settings(addr)
	s.MaxConnections, s.MaxIdleConnections = 1, 1
	u, err := New(s)
	if err != nil {
		t.Fatal(err)
	}
	ep := u.Endpoints()[0]
	now := time.Now()
	c, err := ep.Acquire(now)
	if err != nil || c.Reused {
		t.Fatalf("first acquire: %v reused=%v", err, c != nil && c.Reused)
	}
	if _, err := ep.Acquire(now); !errors.Is(err, ErrBusy) {
		t.Errorf("acquire on a full endpoint: %v, want ErrBusy", err)
	}
	ep.Release(c, true, now)
	if ep.Busy() != 0 || ep.Idle() != 1 {
		t.Errorf("after release: busy %d idle %d", ep.Busy(), ep.Idle())
	}
	c2, err := ep.Acquire(now)
	if err != nil || c2 != c || !c2.Reused {
		t.Errorf("the pooled connection was not reused: %v", err)
	}
	ep.Release(c2, false, now)
	if ep.Idle() != 0 {
		t.Error("a connection released as not reusable was pooled")
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	u2, _ := New(settings("http://" + dead))
	if _, err := u2.Endpoints()[0].Acquire(now); !errors.Is(err, ErrConnectRefused) {
		t.Errorf("dial to a closed port: %v, want ErrConnectRefused", err)
	}
}

// Alive tells a quiet pooled connection from one the upstream closed or
// wrote to while it was idle: it looks at the socket, without a read that
// a past deadline would turn into a timeout before looking.
func TestAliveSeesCloseAndStrayBytes(t *testing.T) {
	mode := make(chan string, 3)
	addr := listen(t, func(c net.Conn) {
		defer c.Close()
		switch <-mode {
		case "quiet":
			time.Sleep(time.Second)
		case "stray":
			io.WriteString(c, "hello")
			time.Sleep(time.Second)
		case "close":
		}
	})
	u, err := New(settings(addr))
	if err != nil {
		t.Fatal(err)
	}
	ep := u.Endpoints()[0]
	for _, m := range []string{"quiet", "stray", "close"} {
		mode <- m
		c, err := ep.Acquire(time.Now())
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond) // the upstream has written or closed
		if got, want := c.Alive(), m == "quiet"; got != want {
			t.Errorf("%s connection: Alive %v, want %v", m, got, want)
		}
		ep.Release(c, false, time.Now())
	}
}

// A stalled read fails after ReadTimeout; one that keeps moving does not.
func TestProgressDeadlines(t *testing.T) {
	addr := listen(t, func(c net.Conn) {
		defer c.Close()
		for range 6 {
			io.WriteString(c, "x")
			time.Sleep(50 * time.Millisecond)
		}
		time.Sleep(time.Second) // then stall
	})
	u, err := New(settings(addr))
	if err != nil {
		t.Fatal(err)
	}
	c, err := u.Endpoints()[0].Acquire(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Endpoints()[0].Release(c, false, time.Now())
	c.ReadTimeout = 200 * time.Millisecond // longer than each gap, shorter than their sum
	var got strings.Builder
	buf := make([]byte, 1)
	for {
		n, err := c.R.Read(buf)
		got.Write(buf[:n])
		if err != nil {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Errorf("stall ended with %v, want a timeout", err)
			}
			break
		}
	}
	if got.String() != "xxxxxx" {
		t.Errorf("read %q before the stall, want all 6 bytes", got.String())
	}
}

// SendBody frames each read as one chunk in place (or sends it as it is),
// sends data already read first, ends chunked bodies with the last chunk,
// stops on progress's error, and wraps a read error in ErrRequestBody.
func TestSendBody(t *testing.T) {
	got := make(chan string, 1)
	addr := listen(t, func(c net.Conn) {
		b, _ := io.ReadAll(c)
		got <- string(b)
	})
	u, err := New(settings(addr))
	if err != nil {
		t.Fatal(err)
	}
	send := func(src io.Reader, first string, chunked bool, progress func(int64, bool) error) (string, int64, error) {
		c, err := u.Endpoints()[0].Acquire(time.Now())
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, ChunkRoom+8+2) // 8 bytes of data per read
		copy(buf[ChunkRoom:], first)
		n, err := c.SendBody(src, buf, len(first), false, chunked, true, progress)
		u.Endpoints()[0].Release(c, false, time.Now()) // closes it: the server's ReadAll ends
		return <-got, n, err
	}
	var totals []int64
	eof := false
	body, n, err := send(strings.NewReader("0123456789"), "ab", true, func(total int64, end bool) error {
		totals = append(totals, total)
		eof = eof || end
		return nil
	})
	if err != nil || n != 12 || body != "2\r\nab\r\n8\r\n01234567\r\n2\r\n89\r\n0\r\n\r\n" || !eof || len(totals) != 4 || totals[2] != 12 {
		t.Errorf("chunked: %q, %d bytes, %v, totals %v, eof %v", body, n, err, totals, eof)
	}
	if body, n, err := send(strings.NewReader("0123456789"), "", false, func(int64, bool) error { return nil }); err != nil || n != 10 || body != "0123456789" {
		t.Errorf("as it is: %q, %d bytes, %v", body, n, err)
	}
	stop := errors.New("too large")
	if _, n, err := send(strings.NewReader("0123456789"), "", false, func(total int64, _ bool) error {
		if total > 8 {
			return stop
		}
		return nil
	}); !errors.Is(err, stop) || n != 8 {
		t.Errorf("progress error: %d bytes, %v", n, err)
	}
	if _, _, err := send(io.MultiReader(strings.NewReader("0123"), iotest{}), "", true, func(int64, bool) error { return nil }); !errors.Is(err, ErrRequestBody) {
		t.Errorf("read error: %v, want ErrRequestBody", err)
	}
}

type iotest struct{}

func (iotest) Read([]byte) (int, error) { return 0, errors.New("client gone") }

// ReadResponse hands each interim response to its callback in order, reads
// the final head, and refuses more than MaxInterim interim responses.
func TestReadResponse(t *testing.T) {
	reply := make(chan string, 2)
	addr := listen(t, func(c net.Conn) {
		io.WriteString(c, <-reply)
		time.Sleep(100 * time.Millisecond)
		c.Close()
	})
	u, err := New(settings(addr))
	if err != nil {
		t.Fatal(err)
	}
	read := func(raw string) ([]int, *fasthttp.Response, error) {
		reply <- raw
		c, err := u.Endpoints()[0].Acquire(time.Now())
		if err != nil {
			t.Fatal(err)
		}
		defer u.Endpoints()[0].Release(c, false, time.Now())
		var seen []int
		resp := &fasthttp.Response{StreamBody: true}
		err = c.ReadResponse(resp, func(h *fasthttp.ResponseHeader) error {
			seen = append(seen, h.StatusCode())
			return nil
		})
		if err == nil {
			body, _ := io.ReadAll(resp.BodyStream())
			resp.SetBody(body)
		}
		return seen, resp, err
	}
	seen, resp, err := read("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	if err != nil || len(seen) != 2 || seen[0] != 103 || seen[1] != 102 || resp.StatusCode() != 200 || string(resp.Body()) != "ok" {
		t.Errorf("interims %v, final %d %q, %v", seen, resp.StatusCode(), resp.Body(), err)
	}
	if _, _, err := read(strings.Repeat("HTTP/1.1 102 Processing\r\n\r\n", MaxInterim+1) + "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"); err == nil {
		t.Errorf("%d interim responses accepted", MaxInterim+1)
	}
	if errors.Is(ReadError(io.EOF), ErrReset) != true || !errors.Is(ReadError(errors.New("junk")), ErrProtocol) {
		t.Error("ReadError misclassifies")
	}
}

// stepReader returns one step per Read, calling before(i) ahead of step i.
type stepReader struct {
	steps  []string
	i      int
	before func(i int)
}

func (r *stepReader) Read(p []byte) (int, error) {
	if r.i == len(r.steps) {
		return 0, io.EOF
	}
	r.before(r.i)
	n := copy(p, r.steps[r.i])
	r.i++
	return n, nil
}

// A tiny first read (the server's one-byte read-ahead) waits for the next
// one, and the request head leaves with them: nothing reaches the upstream
// before the second read, where it used to get the head, then one byte,
// then the rest, in three writes.
func TestSendBodyHeadLeavesWithTheBody(t *testing.T) {
	arrived := make(chan struct{}, 1)
	got := make(chan string, 1)
	addr := listen(t, func(c net.Conn) {
		b := make([]byte, 1)
		if _, err := c.Read(b); err != nil {
			return
		}
		arrived <- struct{}{}
		rest, _ := io.ReadAll(c)
		got <- string(b) + string(rest)
	})
	u, err := New(settings(addr))
	if err != nil {
		t.Fatal(err)
	}
	c, err := u.Endpoints()[0].Acquire(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	const head = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
	_, _ = c.W.WriteString(head)
	early := false
	src := &stepReader{steps: []string{"a", "bcde"}, before: func(i int) {
		if i == 1 {
			select {
			case <-arrived:
				early = true
			case <-time.After(200 * time.Millisecond):
			}
		}
	}}
	buf := make([]byte, ChunkRoom+1024+2)
	if n, err := c.SendBody(src, buf, 0, false, false, true, func(int64, bool) error { return nil }); err != nil || n != 5 {
		t.Fatalf("SendBody: %d bytes, %v", n, err)
	}
	u.Endpoints()[0].Release(c, false, time.Now())
	if body := <-got; body != head+"abcde" {
		t.Errorf("the upstream got %q", body)
	}
	if early {
		t.Error("the head (or the first byte) went before the second read: head and body in separate writes")
	}
}

// Readable says, without waiting, whether a read would find bytes: not
// while the upstream sent nothing, yes once it did (in the reader's buffer
// or still on the socket), and no again once they are read.
func TestConnReadable(t *testing.T) {
	send := make(chan struct{})
	addr := listen(t, func(c net.Conn) {
		<-send
		_, _ = c.Write([]byte("abc"))
		time.Sleep(time.Second)
	})
	u, err := New(settings(addr))
	if err != nil {
		t.Fatal(err)
	}
	c, err := u.Endpoints()[0].Acquire(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	defer u.Endpoints()[0].Release(c, false, time.Now())
	c.ReadTimeout = 5 * time.Second
	if c.Readable() {
		t.Fatal("readable before the upstream sent anything")
	}
	close(send)
	deadline := time.Now().Add(2 * time.Second)
	for !c.Readable() {
		if time.Now().After(deadline) {
			t.Fatal("not readable 2 s after the upstream sent 3 bytes")
		}
		time.Sleep(time.Millisecond)
	}
	b := make([]byte, 1)
	if _, err := c.R.Read(b); err != nil {
		t.Fatal(err)
	}
	if !c.Readable() { // two bytes left in the reader's buffer
		t.Error("not readable with bytes in the reader's buffer")
	}
	if _, err := io.ReadFull(c.R, make([]byte, 2)); err != nil {
		t.Fatal(err)
	}
	if c.Readable() {
		t.Error("readable after everything sent was read")
	}
}

// Under TLS too, Alive tells a quiet pooled connection from one the
// upstream wrote to or closed while idle: bytes still in the socket
// (peeked), and a record the TLS layer already read in (a response that
// came right behind the last one). Without it, a stray response over TLS
// was taken as the next request's answer.
func TestAliveSeesStrayBytesUnderTLS(t *testing.T) {
	srv := httptest.NewUnstartedServer(nil)
	srv.StartTLS()
	defer srv.Close()
	cert := srv.TLS.Certificates[0]
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]})
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	mode := make(chan string, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn, m string) {
				defer c.Close()
				_ = c.(*tls.Conn).Handshake()
				switch m {
				case "stray":
					io.WriteString(c, "hello")
				case "two records": // two writes: two records, read in by one socket read
					io.WriteString(c, "a")
					io.WriteString(c, "b")
				case "close":
					return
				}
				time.Sleep(time.Second)
			}(c, <-mode)
		}
	}()
	s := settings("https://" + ln.Addr().String())
	s.CAPEM, s.ServerName = string(ca), "example.com"
	u, err := New(s)
	if err != nil {
		t.Fatal(err)
	}
	ep := u.Endpoints()[0]
	for _, m := range []string{"quiet", "stray", "two records", "close"} {
		mode <- m
		c, err := ep.Acquire(time.Now())
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond) // the upstream has written or closed
		if m == "two records" {
			// The last response's read took the first record and, with it,
			// the second into the TLS layer's buffer: the socket is empty.
			var b [1]byte
			if _, err := c.Read(b[:]); err != nil {
				t.Fatal(err)
			}
		}
		if got, want := c.Alive(), m == "quiet"; got != want {
			t.Errorf("%s connection: Alive %v, want %v", m, got, want)
		}
		ep.Release(c, false, time.Now())
	}
}
