package test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

// errorBody decodes the sidecar's JSON error and checks its shape.
func errorBody(t *testing.T, resp *http.Response) string {
	t.Helper()
	var body struct {
		Error     string `json:"error"`
		RequestID string `json:"request_id"`
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err := json.Unmarshal(raw, &body); err != nil {
		t.Fatalf("error body is not JSON: %q", raw)
	}
	if body.RequestID == "" || body.RequestID != resp.Header.Get("X-Request-Id") {
		t.Errorf("error body request_id %q, header %q", body.RequestID, resp.Header.Get("X-Request-Id"))
	}
	for _, leak := range []string{"127.0.0.1", "dial", "refused", "timeout", "EOF", "fasthttp", "proxy:"} {
		if strings.Contains(string(raw), leak) {
			t.Errorf("error body leaks internals (%q): %s", leak, raw)
		}
	}
	return body.Error
}

func TestUpstreamRefusedIs502(t *testing.T) {
	closed := freeAddr(t)
	sc := startSidecar(t, routeTo("http://"+closed, `connect_timeout = "1s"`))
	start := time.Now()
	resp, err := http.Get(sc.url("/"))
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if resp.StatusCode != 502 {
		t.Errorf("status %d, want 502", resp.StatusCode)
	}
	errorBody(t, resp)
	if took > time.Second {
		t.Errorf("refused connection took %v, more than the connect timeout", took)
	}
	t.Logf("refused upstream answered in %v", took)
	if v := sc.metric(`sidecar_upstream_errors_total{upstream="app",kind="refused"}`); v != 1 {
		t.Errorf("refused errors counted %v", v)
	}
}

// blackhole returns a loopback address whose accept queue is full, so a
// new connection attempt hangs in SYN-SENT until the dialer gives up.
func blackhole(t *testing.T) string {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	// Fill the queue: with backlog 0 the kernel queues one connection.
	for i := 0; i < 4; i++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
	}
	return addr
}

func TestUpstreamConnectTimeoutIs504(t *testing.T) {
	sc := startSidecar(t, routeTo("http://"+blackhole(t), `connect_timeout = "300ms"`))
	start := time.Now()
	resp, err := http.Get(sc.url("/"))
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if resp.StatusCode != 504 {
		t.Errorf("status %d, want 504", resp.StatusCode)
	}
	errorBody(t, resp)
	t.Logf("connect timeout (300ms) answered in %v", took)
}

func TestNoResponseHeadersInTimeIs504(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(3 * time.Second):
		case <-r.Context().Done():
		}
	})
	sc := startSidecar(t, routeTo(be.url(), `response_timeout = "300ms"`))
	start := time.Now()
	resp, err := http.Get(sc.url("/"))
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 504 {
		t.Errorf("status %d, want 504", resp.StatusCode)
	}
	errorBody(t, resp)
	t.Logf("response timeout (300ms) answered in %v", time.Since(start))
}

func TestUpstreamResetMidBodyIsVisible(t *testing.T) {
	for _, framing := range []string{"Content-Length: 100000", "Transfer-Encoding: chunked"} {
		up := rawBackend(t, func(c net.Conn) {
			readRequestHead(bufio.NewReader(c))
			io.WriteString(c, "HTTP/1.1 200 OK\r\n"+framing+"\r\n\r\n")
			if strings.HasPrefix(framing, "Transfer") {
				io.WriteString(c, "400\r\n"+strings.Repeat("x", 0x400)+"\r\n")
			} else {
				io.WriteString(c, strings.Repeat("x", 1024))
			}
			time.Sleep(50 * time.Millisecond)
			c.(*net.TCPConn).SetLinger(0) // reset, not a clean close
		})
		sc := startSidecar(t, routeTo(up, ""))
		resp, err := http.Get(sc.url("/"))
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil {
			t.Errorf("%s: a reset mid-body looked complete to the client (%d bytes)", framing, len(b))
		}
		if len(b) != 1024 {
			t.Errorf("%s: client got %d bytes before the cut, want the 1024 sent", framing, len(b))
		}
	}
}

func TestBrokenUpstreamFramingIs502(t *testing.T) {
	cases := map[string]string{
		"conflicting content-length": "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!",
		"bad chunk size":             "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
		"non-HTTP bytes":             "SSH-2.0-OpenSSH_9.2\r\n\r\n",
		"bad status line":            "HTTP/1.1 abc OK\r\n\r\n",
	}
	for name, answer := range cases {
		t.Run(name, func(t *testing.T) {
			up := rawBackend(t, func(c net.Conn) {
				readRequestHead(bufio.NewReader(c))
				io.WriteString(c, answer)
			})
			sc := startSidecar(t, routeTo(up, ""))
			resp, err := http.Get(sc.url("/"))
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != 502 {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %d (%q), want 502", resp.StatusCode, b)
			}
			errorBody(t, resp)
		})
	}
}

func TestMalformedRequestsAre400AndForwardNothing(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, routeTo(be.url(), ""))
	cases := map[string]string{
		"content-length and transfer-encoding": "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"differing content-lengths":            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
		"repeated content-length":              "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
		"bad chunk size":                       "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
		"chunk size overflow":                  "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
		"space in header name":                 "GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
		"space before colon":                   "GET / HTTP/1.1\r\nHost: x\r\nName : x\r\n\r\n",
		"control byte in header name":          "GET / HTTP/1.1\r\nHost: x\r\nBad\x01Name: x\r\n\r\n",
		"unknown transfer-encoding":            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"two transfer-encodings":               "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"signed content-length":                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
		"two hosts":                            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
	}
	for name, req := range cases {
		t.Run(name, func(t *testing.T) {
			out := rawRequest(t, sc.Addr, req, 3*time.Second)
			if !strings.HasPrefix(out, "HTTP/1.1 400 ") {
				t.Errorf("got %q", firstLine(out))
			}
		})
	}
	if reqs, conns := be.counts(); reqs != 0 || conns != 0 {
		t.Errorf("malformed requests reached the backend: %d requests on %d connections", reqs, conns)
	}
}

func TestBodyOverLimitIs413(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	})
	sc := startSidecar(t, "[server]\nmax_body_bytes = 1000\n"+routeTo(be.url(), ""))
	// Declared too large: refused, nothing forwarded.
	out := rawRequest(t, sc.Addr, "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1001\r\n\r\n"+strings.Repeat("z", 1001), 3*time.Second)
	if !strings.HasPrefix(out, "HTTP/1.1 413 ") {
		t.Errorf("Content-Length over limit: %q", firstLine(out))
	}
	// A client that waits for 100 Continue is refused without sending.
	out = rawRequest(t, sc.Addr, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n", 3*time.Second)
	if !strings.HasPrefix(out, "HTTP/1.1 413 ") || !strings.Contains(out, "\r\nX-Request-Id: ") || strings.Contains(out, `"request_id":""`) {
		t.Errorf("Expect: 100-continue over limit: %q, want a 413 with its request id", out)
	}
	if reqs, conns := be.counts(); reqs != 0 || conns != 0 {
		t.Errorf("an over-limit Content-Length reached the backend")
	}
	// Chunked, over the limit in the first chunk and across several.
	one := fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", 1500, strings.Repeat("a", 1500))
	out = rawRequest(t, sc.Addr, "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"+one, 3*time.Second)
	if !strings.HasPrefix(out, "HTTP/1.1 413 ") {
		t.Errorf("chunked over limit in one chunk: %q", firstLine(out))
	}
	c, err := net.Dial("tcp", sc.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
	go func() {
		for i := 0; i < 20; i++ {
			if _, err := fmt.Fprintf(c, "64\r\n%s\r\n", strings.Repeat("b", 100)); err != nil {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 413 {
		t.Errorf("chunked over limit across chunks: %d", resp.StatusCode)
	}
}

func TestSlowlorisCutByHeaderTimeout(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, "[server]\nheader_timeout = \"1s\"\n"+routeTo(be.url(), ""))
	c, err := net.Dial("tcp", sc.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n")
	closed := make(chan time.Duration, 1)
	go func() {
		buf := make([]byte, 512)
		for {
			if _, err := c.Read(buf); err != nil {
				closed <- time.Since(start)
				return
			}
		}
	}()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case d := <-closed:
			if d > 2*time.Second {
				t.Errorf("slowloris connection lived %v with header_timeout 1s", d)
			}
			t.Logf("slowloris client cut after %v (header_timeout 1s)", d.Round(time.Millisecond))
			if reqs, _ := be.counts(); reqs != 0 {
				t.Errorf("backend got a request")
			}
			return
		case <-tick.C:
			if time.Since(start) > 5*time.Second {
				t.Fatal("slowloris client never cut off")
			}
			c.Write([]byte("X")) // one byte of a never-ending header
		}
	}
}

func TestConnectionCaps(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, "[server]\nmax_connections_per_ip = 2\n"+routeTo(be.url(), ""))
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < 2; i++ {
		c, err := net.Dial("tcp", sc.Addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != 200 {
			t.Fatalf("connection %d within the cap: %v", i+1, err)
		}
	}
	out := rawRequest(t, sc.Addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 3*time.Second)
	if strings.HasPrefix(out, "HTTP/1.1 200") {
		t.Errorf("a third connection from one IP was served with max_connections_per_ip = 2")
	}
	t.Logf("third connection answered %q", firstLine(out))
}
