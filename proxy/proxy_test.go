package proxy

import (
	"bufio"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/policy"
	"github.com/sidecar-proxy/sidecar/upstream"
)

// startProxy runs a Proxy on a loopback listener in front of backend.
func startProxy(t *testing.T, backend http.HandlerFunc, extra string) (addr string, p *Proxy, set *metrics.Set) {
	t.Helper()
	bln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	bsrv := &http.Server{Handler: backend}
	go bsrv.Serve(bln)
	t.Cleanup(func() { bsrv.Close() })
	snap, err := policy.Parse("test", []byte(`
[upstreams.app]
url = "http://`+bln.Addr().String()+`"
`+extra+`
[[routes]]
name = "app"
upstream = "app"
`))
	if err != nil {
		t.Fatal(err)
	}
	set = metrics.NewSet()
	p, err = New(snap, Settings{Metrics: set})
	if err != nil {
		t.Fatal(err)
	}
	srv := p.NewServer(&snap.Server)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown(); p.Close() })
	return ln.Addr().String(), p, set
}

func TestPanicIsRecoveredCountedAndServingContinues(t *testing.T) {
	logs := &lockedBuffer{}
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.NewTextHandler(logs, nil)))
	addr, _, set := startProxy(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "fine") }, "")
	testHookServe = func(ctx *fasthttp.RequestCtx) {
		if string(ctx.Path()) == "/panic" {
			panic("boom")
		}
	}
	defer func() { testHookServe = nil }()
	resp, err := http.Get("http://" + addr + "/panic")
	if err != nil {
		t.Fatal(err)
	}
	var body struct {
		Error     string `json:"error"`
		RequestID string `json:"request_id"`
	}
	json.NewDecoder(resp.Body).Decode(&body)
	resp.Body.Close()
	if resp.StatusCode != 500 || body.Error != "internal error" || strings.Contains(body.Error, "boom") {
		t.Errorf("panic answered %d %+v", resp.StatusCode, body)
	}
	if got := set.GetOrCreateCounter(`sidecar_panics_recovered_total`).Get(); got != 1 {
		t.Errorf("panics counted %d", got)
	}
	if l := logs.String(); !strings.Contains(l, "panic in request path recovered") || !strings.Contains(l, "goroutine ") ||
		!strings.Contains(l, "(*Proxy).Handler") {
		t.Errorf("the recovered panic was logged without its stack: %s", l)
	}
	resp, err = http.Get("http://" + addr + "/after")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "fine" {
		t.Errorf("after a panic: %q", b)
	}
}

// A panic after admission gives back the slots it held: with one overload
// slot and a bulkhead of one, the next request is still served.
func TestPanicReleasesItsSlots(t *testing.T) {
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	addr, _, _ := startProxy(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "fine") }, `
[upstreams.app.overload]
min_limit = 1
max_limit = 1
initial_limit = 1
reserved = 0.0
queue_size = 0
[upstreams.app.breaker]
max_concurrent = 1
`)
	testHookAdmitted = func(ctx *fasthttp.RequestCtx) {
		if string(ctx.Path()) == "/panic" {
			panic("boom")
		}
	}
	defer func() { testHookAdmitted = nil }()
	for _, path := range []string{"/panic", "/panic", "/after"} {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := map[bool]int{true: 500, false: 200}[path == "/panic"]; resp.StatusCode != want {
			t.Fatalf("%s: %d %q (fallback %q), want %d", path, resp.StatusCode, b, resp.Header.Get("X-Sidecar-Fallback"), want)
		}
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestApplyKeepsPoolsOfUnchangedUpstreams(t *testing.T) {
	addr, p, _ := startProxy(t, func(w http.ResponseWriter, r *http.Request) {}, "")
	resp, err := http.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	before := p.state.Load().upstreams["app"]
	same := *p.Snapshot()
	if err := p.Apply(&same); err != nil {
		t.Fatal(err)
	}
	if p.state.Load().upstreams["app"] != before {
		t.Error("an unchanged upstream lost its pool on reload")
	}
	reparse := func(extra string) *policy.Snapshot {
		snap, err := policy.Parse("test", []byte("[upstreams.app]\nurl = \""+before.spec.Endpoints[0].URL+"\"\n"+extra+
			"[[routes]]\nname = \"app\"\nupstream = \"app\"\n"))
		if err != nil {
			t.Fatal(err)
		}
		return snap
	}
	if err := p.Apply(reparse("")); err != nil {
		t.Fatal(err)
	}
	if p.state.Load().upstreams["app"] != before {
		t.Error("an upstream parsed again from the same settings lost its pool on reload")
	}
	if err := p.Apply(reparse("response_timeout = \"1m\"\n")); err != nil {
		t.Fatal(err)
	}
	if p.state.Load().upstreams["app"] == before {
		t.Error("a changed upstream kept its old settings")
	}
}

func TestStripHopHeaders(t *testing.T) {
	var h fasthttp.RequestHeader
	for _, k := range hopHeaders {
		h.Set(k, "v")
	}
	h.Set("Connection", "X-A, x-b , keep-alive")
	h.Set("X-A", "1")
	h.Set("X-B", "2")
	h.Set("X-C", "3")
	snap, err := policy.Parse("t", []byte("[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nupstream = \"a\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	stripRequest(&h, newRequestFilter(snap), false, nil)
	for _, k := range append([]string{"X-A", "X-B"}, hopHeaders[:]...) {
		if v := h.Peek(k); len(v) > 0 {
			t.Errorf("%s survived: %q", k, v)
		}
	}
	if string(h.Peek("X-C")) != "3" {
		t.Error("end-to-end header removed")
	}
}

// Connection lines are one list (RFC 9110 §5.3): a field named in the
// second line is hop-by-hop too, in a request and in a response.
func TestStripHopEveryConnectionLine(t *testing.T) {
	snap, err := policy.Parse("t", []byte("[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nupstream = \"a\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	var h fasthttp.RequestHeader
	if err := h.Read(bufioReader("GET /c HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: X-Hop-Only, Keep-Alive\r\n" +
		"X-Hop-Only: 1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-End: 2\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	if string(upgradeType(&h)) != "websocket" {
		t.Errorf("upgrade named in the third Connection line: %q", upgradeType(&h))
	}
	stripRequest(&h, newRequestFilter(snap), false, nil)
	if v := h.Peek("X-Hop-Only"); len(v) > 0 {
		t.Errorf("a field named in the second Connection line survived: %q", v)
	}
	if string(h.Peek("X-End")) != "2" {
		t.Error("end-to-end header removed")
	}
	var rh fasthttp.ResponseHeader
	if err := rh.Read(bufioReader("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: X-Internal\r\nX-Internal: secret\r\nContent-Length: 2\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	stripResponseHop(&rh, nil)
	if v := rh.Peek("X-Internal"); len(v) > 0 {
		t.Errorf("a response field named in the second Connection line survived: %q", v)
	}
}

func TestValidHost(t *testing.T) {
	for v, want := range map[string]bool{
		"a.test": true, "a.test:8080": true, "A.Test.": true, "my_service:80": true, "127.0.0.1:1": true,
		"[::1]": true, "[::1]:80": true, "[fe80::1%25eth0]:80": true, "xn--bcher-kva.example": true, "a.test:": true,
		"a.test:80@evil.com": false, "a.test:@evil.com": false, "user@a.test": false, "a.test:8x": false,
		"a test": false, "a/b": false, "[::1": false, "[::1]x": false, "a.test:80:90": false, "a\"b": false,
	} {
		if got := validHost([]byte(v)); got != want {
			t.Errorf("validHost(%q) = %v, want %v", v, got, want)
		}
	}
}

func bufioReader(s string) *bufio.Reader { return bufio.NewReader(strings.NewReader(s)) }

func TestCheckRawHeaders(t *testing.T) {
	f := func(raw string, want bool) {
		t.Helper()
		var h fasthttp.RequestHeader
		if err := h.Read(bufioReader(raw)); err != nil {
			if want {
				t.Fatalf("%q: %v", raw, err)
			}
			return // fasthttp refused it already
		}
		if got := checkRawHeaders(&h); got != want {
			t.Errorf("checkRawHeaders(%q) = %v, want %v", raw, got, want)
		}
	}
	f("GET / HTTP/1.1\r\nHost: x\r\nX-Ok: 1\r\n\r\n", true)
	f("GET / HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n b\r\n\r\n", true)
	f("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n", true)
	f("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", true)
	f("GET / HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", false)
	f("GET / HTTP/1.1\r\nHost: x\r\nBad\x7fName: 1\r\n\r\n", false)
	f("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", false)
	f("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\ncontent-length: 3\r\n\r\n", false)
	// A coding other than chunked: fasthttp reads "identity" as no body
	// (RFC 9112 §6.3: 400).
	f("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n", false)
	f("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 4\r\n\r\n", false)
	f("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked \r\n\r\n", true)
	// Host is uri-host [":" port] (RFC 9112 §3.2: else a 400).
	f("GET / HTTP/1.1\r\nHost: a.test:80@evil.com\r\n\r\n", false)
	f("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", true)
}

func TestRequestIDs(t *testing.T) {
	g := newRequestIDs()
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		id := string(g.next(nil))
		if seen[id] || !validRequestID([]byte(id)) {
			t.Fatalf("id %q repeated or invalid", id)
		}
		seen[id] = true
	}
	for id, want := range map[string]bool{"abc-123": true, "": false, "has space": false, `q"uote`: false,
		strings.Repeat("a", 129): false, "\x01": false} {
		if validRequestID([]byte(id)) != want {
			t.Errorf("validRequestID(%q) != %v", id, want)
		}
	}
}

func TestRearm(t *testing.T) {
	t0 := time.Unix(1000, 0)
	if !rearm(t0, time.Time{}, time.Second) {
		t.Error("a deadline never armed must be armed")
	}
	if rearm(t0.Add(100*time.Millisecond), t0, time.Second) {
		t.Error("re-armed before idle/8 passed")
	}
	if !rearm(t0.Add(200*time.Millisecond), t0, time.Second) {
		t.Error("not re-armed after idle/8")
	}
}

func TestErrorStatuses(t *testing.T) {
	for err, want := range map[error]int{
		ErrNoRoute: 404, ErrBadRequest: 400, ErrBodyTooLarge: 413, ErrUpstreamBusy: 503,
		ErrConnectRefused: 502, ErrConnectTimeout: 504, ErrResponseTimeout: 504, ErrUpstreamReset: 502,
		ErrUpstreamProto: 502, ErrClientBody: 400, ErrRateLimited: 429, ErrUpgradeRefused: 501, ErrConnectMethod: 501,
		policy.ErrUnknownKey: 401, policy.ErrBadToken: 401, policy.ErrAmbiguousCredentials: 400,
	} {
		if got := answerFor(err).status; got != want {
			t.Errorf("answerFor(%v).status = %d, want %d", err, got, want)
		}
	}
	if answerFor(upstream.ReadError(fasthttp.ErrTimeout)).kind != "timeout" || answerFor(upstream.ReadError(io.EOF)).kind != "reset" {
		t.Error("read errors misclassified")
	}
}

// The access log's hand-written JSON: every field present with its value,
// whatever bytes a string holds.
func TestAccessLogLineIsJSON(t *testing.T) {
	a := &accessLog{secret: func() []byte { return []byte("k") }}
	at := time.Date(2026, 11, 26, 1, 2, 3, 456789000, time.UTC)
	e := accessEntry{at: at, requestID: "id\"\\\n\x01é", route: "r<>&", method: "GET", protocol: "h2", status: 503, tier: "gold",
		client: "ip:192.0.2.1", limit: "denied", breaker: "open", fallback: "open", endpoint: "127.0.0.1:1",
		duration: 1234567 * time.Nanosecond, upstream: 250 * time.Microsecond, bytesIn: 7, bytesOut: 1 << 40}
	a.write(e, at)
	a.write(accessEntry{at: at, requestID: "bad\xff\xfeutf8", status: 200}, at)
	lines := strings.Split(strings.TrimSuffix(a.batch.String(), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines: %q", len(lines), a.batch.String())
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &m); err != nil {
		t.Fatalf("%v: %s", err, lines[0])
	}
	want := map[string]any{"level": "INFO", "msg": "request", "at": "2026-11-26T01:02:03.456789Z",
		"request_id": "id\"\\\n\x01é", "route": "r<>&", "method": "GET", "protocol": "h2", "status": 503.0, "tier": "gold",
		"client": a.fingerprint("ip:192.0.2.1"), "limit": "denied", "breaker": "open", "fallback": "open",
		"upstream": "127.0.0.1:1", "duration_ms": 1.234, "upstream_ms": 0.25, "bytes_in": 7.0, "bytes_out": float64(1 << 40)}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %#v, want %#v", k, m[k], v)
		}
	}
	if _, err := time.Parse(time.RFC3339Nano, m["time"].(string)); err != nil {
		t.Errorf("time: %v", err)
	}
	if len(m) != len(want)+1 {
		t.Errorf("%d fields, want %d: %s", len(m), len(want)+1, lines[0])
	}
	if err := json.Unmarshal([]byte(lines[1]), &m); err != nil || m["request_id"] != "bad\ufffd\ufffdutf8" || m["client"] != "" {
		t.Errorf("invalid UTF-8 line %s: %v %v", lines[1], err, m["request_id"])
	}
}

// A configured field name of any length is matched (one of 100 bytes made
// newFieldSet panic: validation allows any token, so a config with a long
// trusted_only_headers entry crashed the sidecar at start or reload).
func TestFieldSetLongNames(t *testing.T) {
	long := strings.Repeat("X-Long", 20)
	fs := newFieldSet("X-Short", long)
	if !fs.has([]byte(strings.ToLower(long))) || !fs.has([]byte("x_short")) {
		t.Error("a configured name is not found")
	}
	if fs.has([]byte(long+"X")) || fs.has([]byte("X-Shorter")) {
		t.Error("an unconfigured name is found")
	}
}

// An HTTP/1.0 request's Upgrade is ignored (RFC 9110 §7.8): no tunnel, and
// the field, hop-by-hop, is not forwarded.
func TestHTTP10UpgradeIsIgnored(t *testing.T) {
	var h fasthttp.RequestHeader
	if err := h.Read(bufioReader("GET /ws HTTP/1.0\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	if up := upgradeType(&h); up != nil {
		t.Errorf("HTTP/1.0 request: upgrade %q, want none", up)
	}
}
