package test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestForwardingHeaders(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "X-Up-Hop, keep-alive")
		w.Header().Set("X-Up-Hop", "secret")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("Proxy-Authenticate", "Basic")
		w.Header().Set("X-Up-Visible", "yes")
		io.WriteString(w, "ok")
	})
	sc := startSidecar(t, routeTo(be.url(), ""))

	req := "GET /a%2Fb/../c//d?x=1&y=%20z&&q HTTP/1.1\r\n" +
		"Host: example.test:8443\r\n" +
		"Connection: X-Hop, keep-alive\r\n" +
		"X-Hop: drop me\r\n" +
		"Keep-Alive: timeout=9\r\n" +
		"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n" +
		"Te: trailers\r\n" +
		"X-Forwarded-For: 6.6.6.6\r\n" +
		"X-Forwarded-Proto: https\r\n" +
		"X-Forwarded-Host: evil.test\r\n" +
		"Forwarded: for=6.6.6.6\r\n" +
		"X-Keep: kept\r\n" +
		"\r\n"
	c, err := net.Dial("tcp", sc.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, req)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	last := be.lastRequest()
	got, gotHost, gotURI, gotProto := last.Header, last.Host, last.RequestURI, last.Proto

	if gotURI != "/a%2Fb/../c//d?x=1&y=%20z&&q" {
		t.Errorf("request-target changed: %q", gotURI)
	}
	if gotHost != "example.test:8443" {
		t.Errorf("Host not preserved: %q", gotHost)
	}
	if gotProto != "HTTP/1.1" {
		t.Errorf("upstream protocol %q", gotProto)
	}
	for _, h := range []string{"X-Hop", "Keep-Alive", "Proxy-Authorization", "Te", "Connection", "Forwarded"} {
		if v := got.Get(h); v != "" {
			t.Errorf("hop-by-hop or untrusted %s forwarded: %q", h, v)
		}
	}
	if got.Get("X-Keep") != "kept" {
		t.Errorf("end-to-end header lost")
	}
	if xff := got.Get("X-Forwarded-For"); xff != "127.0.0.1" {
		t.Errorf("X-Forwarded-For from an untrusted peer = %q, want it started afresh as 127.0.0.1", xff)
	}
	if v := got.Get("X-Forwarded-Proto"); v != "http" {
		t.Errorf("X-Forwarded-Proto = %q, want http", v)
	}
	if v := got.Get("X-Forwarded-Host"); v != "example.test:8443" {
		t.Errorf("X-Forwarded-Host = %q", v)
	}
	id := got.Get("X-Request-Id")
	if id == "" || resp.Header.Get("X-Request-Id") != id {
		t.Errorf("request id upstream %q, downstream %q: want one generated and passed both ways", id, resp.Header.Get("X-Request-Id"))
	}
	for _, h := range []string{"X-Up-Hop", "Keep-Alive", "Proxy-Authenticate"} {
		if v := resp.Header.Get(h); v != "" {
			t.Errorf("hop-by-hop response header %s relayed: %q", h, v)
		}
	}
	if resp.Header.Get("X-Up-Visible") != "yes" {
		t.Errorf("end-to-end response header lost")
	}
	if resp.Close {
		t.Errorf("upstream's Connection header closed the client connection")
	}
}

func TestTrustedProxyAppendsForwardedFor(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n"+routeTo(be.url(), ""))
	req, _ := http.NewRequest("GET", sc.url("/"), nil)
	req.Header.Set("X-Forwarded-For", "203.0.113.7, 10.0.0.1")
	req.Header.Set("X-Forwarded-Proto", "https")
	req.Header.Set("X-Forwarded-Host", "public.test")
	req.Header.Set("X-Request-Id", "client-chosen-42")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	got := be.lastRequest().Header
	if v := got.Get("X-Forwarded-For"); v != "203.0.113.7, 10.0.0.1, 127.0.0.1" {
		t.Errorf("X-Forwarded-For = %q", v)
	}
	if got.Get("X-Forwarded-Proto") != "https" || got.Get("X-Forwarded-Host") != "public.test" {
		t.Errorf("trusted X-Forwarded-Proto/Host not kept: %q %q", got.Get("X-Forwarded-Proto"), got.Get("X-Forwarded-Host"))
	}
	if got.Get("X-Request-Id") != "client-chosen-42" || resp.Header.Get("X-Request-Id") != "client-chosen-42" {
		t.Errorf("client request id not passed both ways")
	}
}

func TestRewriteHost(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, routeTo(be.url(), "rewrite_host = true"))
	resp, err := http.Get(sc.url("/"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if host := be.lastRequest().Host; host != be.Addr {
		t.Errorf("Host = %q, want upstream's %q", host, be.Addr)
	}
}

func TestRoutingByHostPathMethod(t *testing.T) {
	api := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "api") })
	web := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "web") })
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.api]
url = %q
[upstreams.web]
url = %q
[[routes]]
name = "api-write"
host = "*.example.test"
path_prefix = "/api/"
methods = ["POST"]
upstream = "api"
[[routes]]
name = "web"
path_prefix = "/"
upstream = "web"
`, api.url(), web.url()))
	cases := []struct {
		method, host, path, want string
	}{
		{"POST", "a.example.test", "/api/x", "api"},
		{"GET", "a.example.test", "/api/x", "web"},
		{"POST", "example.test", "/api/x", "web"},
		{"POST", "a.example.test", "/apix", "web"},
	}
	for _, c := range cases {
		req, _ := http.NewRequest(c.method, sc.url(c.path), nil)
		req.Host = c.host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != c.want {
			t.Errorf("%s %s%s went to %q, want %q", c.method, c.host, c.path, b, c.want)
		}
	}
}

func TestNoRouteIs404JSON(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, fmt.Sprintf("[upstreams.app]\nurl = %q\n[[routes]]\npath_prefix = \"/only/\"\nupstream = \"app\"\n", be.url()))
	resp, err := http.Get(sc.url("/elsewhere"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Error     string `json:"error"`
		RequestID string `json:"request_id"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 404 || body.Error == "" || body.RequestID != resp.Header.Get("X-Request-Id") || body.RequestID == "" {
		t.Errorf("got %d %+v", resp.StatusCode, body)
	}
	if resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("content type %q", resp.Header.Get("Content-Type"))
	}
	if n, _ := be.counts(); n != 0 {
		t.Errorf("backend got %d requests", n)
	}
}

func TestEveryMethodAndBodilessResponses(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		switch r.URL.Path {
		case "/204":
			w.WriteHeader(204)
		case "/304":
			w.Header().Set("ETag", `"v1"`)
			w.WriteHeader(304)
		default:
			w.Header().Set("Content-Length", fmt.Sprint(len(b)+len(r.Method)+1))
			fmt.Fprintf(w, "%s:%s", r.Method, b)
		}
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	client := &http.Client{}
	for _, m := range []string{"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "TRACE"} {
		var body io.Reader
		if m != "GET" && m != "TRACE" {
			body = strings.NewReader("payload")
		}
		req, _ := http.NewRequest(m, sc.url("/m"), body)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", m, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		want := m + ":"
		if body != nil {
			want += "payload"
		}
		if resp.StatusCode != 200 || string(b) != want {
			t.Errorf("%s: %d %q, want %q", m, resp.StatusCode, b, want)
		}
	}
	// HEAD keeps the Content-Length and sends no body; 204 and 304 have none.
	for _, c := range []struct {
		req  string
		want int
	}{
		{"HEAD /m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200},
		{"GET /204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 204},
		{"GET /304 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 304},
	} {
		out := rawRequest(t, sc.Addr, c.req, 5*time.Second)
		head, body, _ := strings.Cut(out, "\r\n\r\n")
		if !strings.HasPrefix(head, fmt.Sprintf("HTTP/1.1 %d", c.want)) || body != "" {
			t.Errorf("%q -> %q", c.req, out)
		}
		if c.want == 200 && !strings.Contains(head, "Content-Length: 5") {
			t.Errorf("HEAD lost Content-Length: %q", head)
		}
		if strings.Contains(strings.ToLower(head), "transfer-encoding") {
			t.Errorf("bodiless response with Transfer-Encoding: %q", head)
		}
	}
}

func TestExpectContinue(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "got %d", len(b))
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	if b := postAfterContinue(t, sc.Addr, ""); b != "got 5" {
		t.Errorf("body %q", b)
	}
}

func TestKeepAliveAndPooledUpstreamConnections(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	sc := startSidecar(t, routeTo(be.url(), ""))
	var clientConns int
	dial := func(network, addr string) (net.Conn, error) {
		clientConns++
		return net.Dial(network, addr)
	}
	client := &http.Client{Transport: &http.Transport{Dial: dial, MaxIdleConnsPerHost: 1}}
	for i := 0; i < 50; i++ {
		resp, err := client.Get(sc.url("/"))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	reqs, conns := be.counts()
	if reqs != 50 || conns != 1 || clientConns != 1 {
		t.Errorf("50 sequential requests: backend saw %d requests on %d connections, client opened %d; want 50 on 1 and 1", reqs, conns, clientConns)
	}
}

func TestLoadBalancedEndpoints(t *testing.T) {
	a := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	b := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.app]
urls = [%q, %q]
[[routes]]
upstream = "app"
`, a.url(), b.url()))
	for i := 0; i < 20; i++ {
		resp, err := http.Get(sc.url("/"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	ra, _ := a.counts()
	rb, _ := b.counts()
	if ra != 10 || rb != 10 {
		t.Errorf("round-robin split 20 requests %d/%d", ra, rb)
	}
}

// Interim responses are relayed to HTTP/1.1 clients in order, before the
// final one (RFC 9110 §15.2), without hop-by-hop fields; an upstream's 100
// Continue is not (the sidecar answered Expect itself); HTTP/1.0 clients
// get none.
func TestInterimResponsesRelayedOrDropped(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		w.WriteHeader(http.StatusProcessing)
		w.WriteHeader(http.StatusEarlyHints)
		io.WriteString(w, "final")
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	out := rawRequest(t, sc.Addr, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5*time.Second)
	want := "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" +
		"HTTP/1.1 102 Processing\r\n\r\n" + "HTTP/1.1 103 Early Hints\r\n\r\n" + "HTTP/1.1 200 OK\r\n"
	if !strings.HasPrefix(out, want) || !strings.HasSuffix(out, "final") {
		t.Errorf("got %q, want it to start with %q", out, want)
	}
	if out := rawRequest(t, sc.Addr, "GET / HTTP/1.0\r\nHost: x\r\n\r\n", 5*time.Second); !strings.HasPrefix(out, "HTTP/1.0 200") && !strings.HasPrefix(out, "HTTP/1.1 200") {
		t.Errorf("HTTP/1.0 client got %q, want the final response only", out)
	}

	raw := rawBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		if _, err := readRequestHead(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\r\n"+
			"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	})
	sc2 := startSidecar(t, routeTo(raw, ""))
	out = rawRequest(t, sc2.Addr, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5*time.Second)
	if want := "HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n"; !strings.HasPrefix(out, want) || !strings.HasSuffix(out, "ok") {
		t.Errorf("upstream 100 then 103: got %q, want it to start with %q", out, want)
	}
}

func TestWebSocketUpgradePassesThrough(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" || !strings.Contains(strings.ToLower(r.Header.Get("Connection")), "upgrade") {
			http.Error(w, "not an upgrade", 400)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		// Echo line by line, upper-cased, until the client closes.
		for {
			line, err := brw.ReadString('\n')
			if err != nil {
				return
			}
			io.WriteString(c, strings.ToUpper(line))
		}
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	c, br := openWebSocket(t, sc.Addr)
	for _, msg := range []string{"hello\n", "second frame\n"} {
		io.WriteString(c, msg)
		got, err := br.ReadString('\n')
		if err != nil || got != strings.ToUpper(msg) {
			t.Fatalf("tunnel echo %q: %q %v", msg, got, err)
		}
	}
}

// With Expect: 100-continue the decision is made before the body is sent,
// and the client it identified is still the request's client afterwards:
// upstream, in the access log and in sidecar_active_clients.
func TestExpectContinueKeepsTheClient(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, r.Header.Get("X-Sidecar-Client")+" "+r.Header.Get("X-Sidecar-Tier"))
	})
	dir := t.TempDir()
	writeKeys(t, dir)
	sc := startSidecarIn(t, dir, "[access_log]\nenabled = true\nfingerprint_secret_env = \"SIDECAR_TEST_FP\"\n"+tiersConfig+routeTo(be.url(), ""),
		"SIDECAR_TEST_FP=0123456789abcdef0123456789abcdef")
	if b := postAfterContinue(t, sc.Addr, "X-API-Key: acme-secret-key\r\n"); b != "key:acme premium" {
		t.Errorf("upstream saw %q, want the verified client", b)
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) && !strings.Contains(sc.logs.String(), `"method":"POST"`) {
		time.Sleep(50 * time.Millisecond)
	}
	var line string
	for l := range strings.SplitSeq(sc.logs.String(), "\n") {
		if strings.Contains(l, `"method":"POST"`) {
			line = l
		}
	}
	if !strings.Contains(line, `"tier":"premium"`) || strings.Contains(line, `"client":""`) || !strings.Contains(line, `"client":"`) {
		t.Errorf("access log line lost the client: %s", line)
	}
	if v := sc.metric(`sidecar_active_clients{tier="premium",window="1m"}`); v != 1 {
		t.Errorf("sidecar_active_clients{tier=\"premium\"} = %v, want 1", v)
	}
}

// postAfterContinue sends a 5-byte POST with Expect: 100-continue (and the
// extra header lines), sends the body only after 100 Continue, and returns
// the final response's body.
func postAfterContinue(t *testing.T, addr, extra string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "POST /up HTTP/1.1\r\nHost: x\r\n"+extra+"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
	br := bufio.NewReader(c)
	if line, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(line, "HTTP/1.1 100") {
		t.Fatalf("want 100 Continue before the body, got %q %v", line, err)
	}
	br.ReadString('\n')
	io.WriteString(c, "hello")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// A tunnel half-closes: when the upstream ends its direction, the client
// reads EOF and can still send; what it sends reaches the upstream. Before,
// the half-close towards the client (a hijacked fasthttp connection, which
// hides its CloseWrite) fell back to a full Close.
func TestTunnelHalfCloseFromUpstream(t *testing.T) {
	got := make(chan string, 1)
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nbye\n")
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(brw)
		got <- string(b)
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	c, br := openWebSocket(t, sc.Addr)
	if rest, err := io.ReadAll(br); err != nil || string(rest) != "bye\n" {
		t.Fatalf("upstream's direction: %q %v, want bye and EOF", rest, err)
	}
	if _, err := io.WriteString(c, "late words\n"); err != nil {
		t.Fatalf("writing after the upstream's half-close: %v", err)
	}
	c.(*net.TCPConn).CloseWrite()
	select {
	case s := <-got:
		if s != "late words\n" {
			t.Errorf("the upstream got %q after its half-close, want the client's late words", s)
		}
	case <-time.After(6 * time.Second):
		t.Error("the upstream never saw the client's end")
	}
}

// openWebSocket sends a WebSocket upgrade to the sidecar at addr and
// returns the tunnel once its 101 is read (the connection is closed when
// the test ends).
func openWebSocket(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 101 || resp.Header.Get("Upgrade") != "websocket" {
		t.Fatalf("got %d %v", resp.StatusCode, resp.Header)
	}
	return c, br
}

// The upstream's 101 reaches the client without its hop-by-hop fields
// (those Connection names, Keep-Alive, Proxy-*, Trailer) and with the
// request id, as every other response does; a 101 to a protocol the
// client did not ask for is a 502 (RFC 9110 §7.8). The 101 head went out
// as the upstream wrote it.
func TestUpgradeResponseHeadIsFiltered(t *testing.T) {
	answer := make(chan string, 1)
	be := rawBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		if _, err := readRequestHead(br); err != nil {
			return
		}
		io.WriteString(c, <-answer)
		io.Copy(c, br) // echo, until the client closes
	})
	sc := startSidecar(t, routeTo(be, ""))
	answer <- "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Internal\r\nX-Internal: secret\r\n" +
		"Proxy-Authenticate: Basic realm=x\r\nTrailer: X-T\r\nKeep-Alive: 9\r\nX-Request-Id: forged\r\nX-End: kept\r\n\r\n"
	raw, err := net.Dial("tcp", sc.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(raw, "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(raw), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 101 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	for _, k := range []string{"X-Internal", "Proxy-Authenticate", "Trailer", "Keep-Alive"} {
		if v := resp.Header.Get(k); v != "" {
			t.Errorf("101 head: hop-by-hop %s: %q reached the client", k, v)
		}
	}
	if got := resp.Header.Values("Connection"); len(got) != 1 || !strings.EqualFold(got[0], "upgrade") {
		t.Errorf("101 head: Connection %q, want Upgrade", got)
	}
	if id := resp.Header.Get("X-Request-Id"); id == "" || id == "forged" {
		t.Errorf("101 head: X-Request-Id %q, want the sidecar's", id)
	}
	if resp.Header.Get("X-End") != "kept" {
		t.Error("101 head: an end-to-end field was dropped")
	}

	answer <- "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
	if status, _ := rawStatus(t, sc.Addr, "GET /ws HTTP/1.1\nHost: x\nConnection: Upgrade\nUpgrade: websocket\n\n"); status != 502 {
		t.Errorf("101 to a protocol the client did not ask for: %d, want 502", status)
	}
}
