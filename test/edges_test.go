package test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A Content-Length body reaches the client as it arrives: the upstream
// sends piece 2 only once the client has piece 1 (cause and effect, not a
// timing), so a sidecar that held small bodies back would deadlock here.
func TestContentLengthBodyStreamsAsItArrives(t *testing.T) {
	got := make(chan int, 16)
	upstream := rawBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		if _, err := readRequestHead(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
		for i := range 10 {
			fmt.Fprintf(c, "piece%04d\n", i)
			select {
			case n := <-got:
				if n < (i+1)*10 {
					return
				}
			case <-time.After(5 * time.Second):
				return // the client never got it: the sidecar held it back
			}
		}
	})
	sc := startSidecar(t, routeTo(upstream, ""))
	resp, err := http.Get(sc.url("/"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	start := time.Now()
	total := 0
	buf := make([]byte, 100)
	for total < 100 {
		n, err := resp.Body.Read(buf)
		total += n
		if n > 0 {
			got <- total
		}
		if err != nil {
			break
		}
	}
	if total != 100 {
		t.Fatalf("got %d of 100 bytes: pieces were held back until later ones came", total)
	}
	t.Logf("10 pieces, each sent after the previous one reached the client: %v in all", time.Since(start).Round(time.Millisecond))
}

// Bytes a broken upstream sends after a bodiless response (a body after a
// HEAD answer) never reach the next request on that pooled connection.
func TestStrayBytesAfterBodilessResponseCloseTheConnection(t *testing.T) {
	var conns atomic.Int32
	upstream := rawBackend(t, func(c net.Conn) {
		conns.Add(1)
		br := bufio.NewReader(c)
		for {
			head, err := readRequestHead(br)
			if err != nil {
				return
			}
			if strings.HasPrefix(head, "HEAD") {
				// Wrongly sends the body after the HEAD answer, in a second write.
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
				time.Sleep(20 * time.Millisecond)
				io.WriteString(c, "hello")
				continue
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	sc := startSidecar(t, routeTo(upstream, ""))
	for i := range 3 {
		req, _ := http.NewRequest("HEAD", sc.url("/"), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("HEAD %d: %v %v", i, resp, err)
		}
		resp.Body.Close()
		time.Sleep(50 * time.Millisecond) // the stray body has arrived
		resp, body := get(t, sc.url("/"), nil)
		if resp.StatusCode != 200 || body != "ok" {
			t.Errorf("GET after HEAD %d: %d %q", i, resp.StatusCode, body)
		}
	}
}

// An HTTP/1.0 upstream answer without a length reaches an HTTP/1.1 client
// as HTTP/1.1, chunked; an HTTP/1.0 client gets HTTP/1.0, ended by close.
func TestUpstreamVersionDoesNotLeak(t *testing.T) {
	upstream := rawBackend(t, func(c net.Conn) {
		if _, err := readRequestHead(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
	})
	sc := startSidecar(t, routeTo(upstream, ""))
	out := rawRequest(t, sc.Addr, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5*time.Second)
	if !strings.HasPrefix(out, "HTTP/1.1 200 OK\r\n") || !strings.Contains(out, "Transfer-Encoding: chunked") || !strings.HasSuffix(out, "b\r\nuntil close\r\n0\r\n\r\n") {
		t.Errorf("HTTP/1.1 client got %q", out)
	}
	out = rawRequest(t, sc.Addr, "GET / HTTP/1.0\r\nHost: x\r\n\r\n", 5*time.Second)
	if !strings.HasPrefix(out, "HTTP/1.0 200 OK\r\n") || strings.Contains(out, "chunked") || !strings.HasSuffix(out, "\r\n\r\nuntil close") {
		t.Errorf("HTTP/1.0 client got %q", out)
	}
}

// slowUpload sends a Content-Length body of size bytes at 500 B/s (50
// bytes every 100 ms) to a sidecar with server settings serverCfg in front
// of a backend that counts what it got, and checks that all of it arrived.
func slowUpload(t *testing.T, serverCfg string, size int) {
	t.Helper()
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%d", n)
	})
	sc := startSidecar(t, "[server]\n"+serverCfg+routeTo(be.url(), ""))
	c, err := net.Dial("tcp", sc.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n", size)
	for i := 0; i < size/50; i++ {
		if _, err := c.Write([]byte(strings.Repeat("x", 50))); err != nil {
			t.Fatalf("upload cut after %d bytes: %v", i*50, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	out, _ := io.ReadAll(c)
	if !strings.HasPrefix(string(out), "HTTP/1.1 200") || !strings.HasSuffix(string(out), strconv.Itoa(size)) {
		t.Errorf("slow upload of %d bytes answered %q", size, out)
	}
}

// Only the request head is under header_timeout: a body that keeps moving
// at 500 B/s for three times the head's timeout is not cut.
func TestSlowMovingUploadIsNotCut(t *testing.T) {
	slowUpload(t, "header_timeout = \"1s\"\n", 1500) // 3 s at 500 B/s
}

// Nothing adds a Content-Type that neither side sent.
func TestNoContentTypeAdded(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header()["Content-Type"] = nil // net/http would sniff one
		fmt.Fprintf(w, "[%s]", r.Header.Get("Content-Type"))
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	out := rawRequest(t, sc.Addr, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc", 5*time.Second)
	if !strings.HasSuffix(out, "[]") || strings.Contains(strings.ToLower(out), "content-type") {
		t.Errorf("a request and response without Content-Type: %q", out)
	}
}

// Bytes a broken upstream sends after a complete response, later, on the
// same connection (a second, unasked response) never become the next
// client's response: every pooled connection is looked at before reuse.
func TestLaterStrayBytesNeverReachTheNextClient(t *testing.T) {
	upstream := rawBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			head, err := readRequestHead(br)
			if err != nil {
				return
			}
			path := strings.Fields(head)[1]
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(path), path)
			if path == "/poison" {
				time.Sleep(50 * time.Millisecond)
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON")
			}
		}
	})
	sc := startSidecar(t, routeTo(upstream, "[upstreams.app.breaker]\nenabled = false"))
	if _, body := get(t, sc.url("/poison"), nil); body != "/poison" {
		t.Fatalf("first request: %q", body)
	}
	time.Sleep(150 * time.Millisecond) // the unasked response is on the pooled connection
	for _, p := range []string{"/victim", "/third"} {
		if resp, body := get(t, sc.url(p), nil); resp.StatusCode != 200 || body != p {
			t.Errorf("GET %s answered %d %q: another request's response", p, resp.StatusCode, body)
		}
	}
}

// An HTTP/1.0 client's body ends when the connection closes, so a body the
// upstream cut ends with a reset, never with a FIN that says "complete";
// over TLS, never with a close_notify either, which says the same (tls.Conn's
// Close sends one).
func TestCutBodyToHTTP10ClientIsAReset(t *testing.T) {
	upstream := rawBackend(t, func(c net.Conn) {
		if _, err := readRequestHead(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nabc")
		c.(*net.TCPConn).SetLinger(0)
	})
	pk := newPKI(t)
	pk.issue("server", "localhost", 10, false)
	for _, tc := range []struct {
		name, server string
		dial         func(addr string) (net.Conn, error)
	}{
		{"plaintext", "", func(a string) (net.Conn, error) { return net.Dial("tcp", a) }},
		{"TLS", fmt.Sprintf("[server.tls]\ncert_file = %q\nkey_file = %q\n", filepath.Join(pk.dir, "server.pem"), filepath.Join(pk.dir, "server.key")),
			func(a string) (net.Conn, error) {
				return tls.Dial("tcp", a, &tls.Config{RootCAs: pk.pool, ServerName: "localhost"})
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sc := startSidecar(t, tc.server+routeTo(upstream, "[upstreams.app.breaker]\nenabled = false"))
			c, err := tc.dial(sc.Addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			io.WriteString(c, "GET / HTTP/1.0\r\nHost: x\r\n\r\n")
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			out, err := io.ReadAll(c)
			if err == nil {
				t.Errorf("the cut body ended like a complete one, after %q", out)
			}
		})
	}
}

// An upstream's early answer to a large upload reaches the client whole:
// the upstream answers 413 with a 200 KB body without reading the upload,
// the client reads the answer only after a pause, still uploading. Closing
// with the upload unread made the kernel reset the connection, and the
// reset dropped the answer's unread end at the client (found by a hostile
// review); the sidecar now closes lingering (RFC 9112 §9.6).
func TestEarlyAnswerToALargeUploadArrivesWhole(t *testing.T) {
	const size = 200 << 10
	answer := strings.Repeat("n", size)
	upstream := rawBackend(t, func(c net.Conn) {
		if _, err := readRequestHead(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, fmt.Sprintf("HTTP/1.1 413 Payload Too Large\r\nContent-Length: %d\r\n\r\n%s", size, answer))
		time.Sleep(3 * time.Second) // never reads the upload
	})
	sc := startSidecar(t, "[server]\nmax_body_bytes = 0\n"+routeTo(upstream, ""))
	c, err := net.Dial("tcp", sc.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	const upload = 8 << 20
	go func() {
		io.WriteString(c, fmt.Sprintf("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", upload))
		chunk := make([]byte, 64<<10)
		for sent := 0; sent < upload; sent += len(chunk) {
			if _, err := c.Write(chunk); err != nil {
				return // the sidecar stopped reading: fine, it answered
			}
		}
	}()
	time.Sleep(500 * time.Millisecond) // the answer is written and the connection closed by now
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != 413 || len(body) != size || err != nil {
		t.Fatalf("answer %d with %d of %d body bytes, %v", resp.StatusCode, len(body), size, err)
	}
}

// An upstream that answers a request with a body with an error without
// reading the body, and then takes the body for a request of its own,
// answers that one later than the probe before reuse can see: its answer
// must not become the next client's (a hostile review smuggled a GET in a
// POST's body and got its answer to another client). The connection is
// not reused after an error answer to a request with a body.
func TestErrorAnswerToABodyEndsTheUpstreamConnection(t *testing.T) {
	upstream := rawBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			head, err := readRequestHead(br)
			if err != nil {
				return
			}
			switch {
			case strings.HasPrefix(head, "POST"):
				// Unread: the body is this loop's next request.
				io.WriteString(c, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
			case strings.HasPrefix(head, "GET /smuggled"):
				time.Sleep(300 * time.Millisecond) // after the probe before reuse
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
			default:
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nvictim")
			}
		}
	})
	sc := startSidecar(t, routeTo(upstream, ""))
	smuggled := "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
	out := rawRequest(t, sc.Addr, fmt.Sprintf("POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(smuggled), smuggled), 5*time.Second)
	if !strings.HasPrefix(out, "HTTP/1.1 401") {
		t.Fatalf("POST answered %q", out)
	}
	if resp, body := get(t, sc.url("/victim"), nil); resp.StatusCode != 200 || body != "victim" {
		t.Errorf("the next client got %d %q: another request's answer", resp.StatusCode, body)
	}
}

// A small Content-Length upload that keeps moving, slower than the whole
// body could arrive within idle_timeout, is not cut: only fasthttp's
// one-byte read-ahead is under a single deadline.
func TestSlowSmallUploadLongerThanIdleTimeout(t *testing.T) {
	// 2.5 s at 500 B/s: 2.5 idle timeouts, one body
	slowUpload(t, "header_timeout = \"500ms\"\nidle_timeout = \"1s\"\n", 1250)
}

// A large upload whose first segment is one byte, then a pause: the
// upstream gets the head at once and its early answer reaches the client.
// (A held first read, fine for a small body sent before the response is
// read, kept the head back here until the client sent more: a 504.)
func TestEarlyAnswerAfterAOneByteStart(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		http.Error(w, "no", http.StatusUnauthorized)
	})
	sc := startSidecar(t, "[server]\nmax_body_bytes = 0\n"+routeTo(be.url(), ""))
	c, err := net.Dial("tcp", sc.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n")
	time.Sleep(50 * time.Millisecond)
	io.WriteString(c, "x")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no early answer: %v", err)
	}
	if resp.StatusCode != 401 {
		t.Fatalf("early answer %d, want the upstream's 401", resp.StatusCode)
	}
}

// What a hostile client can set so that the sidecar and the backend read
// one request differently, each refused with 400 before anything reaches
// the backend (found by a hostile review against the built binary):
//   - a '#' in an origin-form target: the sidecar routed on the path before
//     it, Go's FileServer cleaned the whole and served a file outside the
//     only route;
//   - Transfer-Encoding: identity: read as no body, the bytes after the
//     head became a second request (RFC 9112 §6.3: a final coding other
//     than chunked is a 400);
//   - a Host with userinfo: routed as a.test, read by a URL parser as
//     evil.com (RFC 9110 §7.2: uri-host [":" port]).
//
// And a field named in a second Connection line is hop-by-hop like one
// named in the first (RFC 9110 §5.3, §7.6.1).
func TestRequestsReadTwoWaysAreRefused(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "public"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{"public/ok.txt": "ok\n", "secret.txt": "TOP SECRET\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var paths []string
	var mu sync.Mutex
	files := http.FileServer(http.Dir(dir))
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		paths = append(paths, r.RequestURI)
		mu.Unlock()
		if r.URL.Path == "/hop" {
			fmt.Fprintf(w, "X-Hop-Only=%q", r.Header.Get("X-Hop-Only"))
			return
		}
		files.ServeHTTP(w, r)
	})
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.files]
url = %q
[[routes]]
host = "a.test"
path_prefix = "/public/"
upstream = "files"
[[routes]]
host = "a.test"
path_prefix = "/hop"
upstream = "files"
[[routes]]
host = "c.test"
upstream = "files"
`, be.url()))
	send := func(req string) (int, string) { return rawStatus(t, sc.Addr, req) }
	if status, body := send("GET /public/ok.txt HTTP/1.1\nHost: a.test\nConnection: close\n\n"); status != 200 || body != "ok\n" {
		t.Fatalf("the route itself: %d %q", status, body)
	}
	for _, req := range []string{
		"GET /public/x#/../../secret.txt HTTP/1.1\nHost: a.test\nConnection: close\n\n",
		"POST /public/ok.txt HTTP/1.1\nHost: a.test\nTransfer-Encoding: identity\n\nGET /public/smuggled HTTP/1.1\nHost: a.test\n\n",
		"POST /public/ok.txt HTTP/1.1\nHost: a.test\nTransfer-Encoding: identity\nContent-Length: 4\n\nabcd",
		"GET /public/ok.txt HTTP/1.1\nHost: a.test:80@evil.com\nConnection: close\n\n",
		"GET /public/ok.txt HTTP/1.1\nHost: a.test:@evil.com\nConnection: close\n\n",
		"GET /public/ok.txt HTTP/1.1\nHost: c.test:80@evil.com\nConnection: close\n\n",
	} {
		// The sidecar's own 400 (Go's backend refuses such a Host too).
		if status, body := send(req); status != 400 || !strings.Contains(body, "malformed request") {
			t.Errorf("%q: %d %q, want the sidecar's 400", req, status, body)
		}
	}
	if status, body := send("GET /hop HTTP/1.1\nHost: a.test\nConnection: keep-alive\nConnection: X-Hop-Only\nX-Hop-Only: must-not-pass\nConnection: close\n\n"); status != 200 || body != `X-Hop-Only=""` {
		t.Errorf("a field named in the second Connection line: %d %q", status, body)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"/public/ok.txt", "/hop"}; !slices.Equal(paths, want) {
		t.Errorf("the backend got %q, want %q", paths, want)
	}
}

// A request body that stops coming is a 408, not a malformed body: a
// small one (sent before the response is read) after idle_timeout, a
// large one (pumped while the upstream waits) after response_timeout,
// which the upload's progress would have extended.
func TestStalledUploadIs408(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.Copy(io.Discard, r.Body) })
	sc := startSidecar(t, "[server]\nidle_timeout = \"1s\"\n"+routeTo(be.url(), "response_timeout = \"500ms\"\n"))
	for _, cl := range []int{100, 1 << 20} {
		c, err := net.Dial("tcp", sc.Addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n0123456789", cl)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		c.Close()
		if err != nil {
			t.Fatalf("Content-Length %d, 10 bytes sent, then nothing: %v", cl, err)
		}
		if resp.StatusCode != 408 {
			t.Errorf("Content-Length %d, 10 bytes sent, then nothing: %d, want 408", cl, resp.StatusCode)
		}
	}
}

// CONNECT is refused with 501 and never reaches the backend, over HTTP/1.1
// and HTTP/2. Forwarded, a backend that tunnels (a forward proxy behind
// the route) answered 200 and kept the pooled connection as a tunnel:
// later clients' requests went into it (RFC 9110 §9.3.6).
func TestConnectIsNotForwarded(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", r.Method, r.RequestURI)
	})
	sc := startSidecar(t, "[server]\nh2c = true\n"+routeTo(be.url(), ""))
	status, body := rawStatus(t, sc.Addr, "CONNECT internal.example:80 HTTP/1.1\nHost: internal.example:80\n\n")
	if status != 501 {
		t.Errorf("CONNECT over HTTP/1.1: %d %q, want 501", status, body)
	}
	req, _ := http.NewRequest(http.MethodConnect, "http://"+sc.Addr, nil)
	req.Host = "internal.example:80"
	if resp, err := h2cClient().Do(req); err != nil {
		t.Errorf("CONNECT over h2c: %v", err)
	} else {
		resp.Body.Close()
		if resp.StatusCode != 501 {
			t.Errorf("CONNECT over h2c: %d, want 501", resp.StatusCode)
		}
	}
	if status, body := rawStatus(t, sc.Addr, "GET /after HTTP/1.1\nHost: a\nConnection: close\n\n"); status != 200 || body != "GET /after" {
		t.Errorf("a GET after: %d %q", status, body)
	}
	if n, _ := be.counts(); n != 1 {
		t.Errorf("the backend got %d requests, want only the GET", n)
	}
}
