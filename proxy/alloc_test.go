//go:build !race

package proxy

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/policy"
)

// The per-request admission and header work must not allocate once warm:
// it runs for every request on the proxy's one hot path. This drives the
// real path (begin, limit, prepareRequest) with a memory-store limit; the
// limiter key is the one allocation (the memory store keeps it as a map
// key).
func TestHotPathDoesNotAllocate(t *testing.T) {
	snap, err := policy.Parse("t", []byte(`
[server]
trusted_proxies = ["10.0.0.0/8"]
[tiers.anonymous]
limit = 1000000000
window = "1m"
[upstreams.app]
url = "http://127.0.0.1:1"
[[routes]]
host = "*.example.com"
path_prefix = "/api/"
upstream = "app"
[[routes]]
name = "app"
upstream = "app"
`))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(snap, Settings{Metrics: metrics.NewSet(), AccessLog: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	const raw = "GET /api/v1/items?x=1 HTTP/1.1\r\nHost: a.example.com\r\nConnection: keep-alive\r\nUser-Agent: t\r\n" +
		"X-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\nX-Sidecar-Tier: premium\r\n\r\n"
	var ctx fasthttp.RequestCtx
	ctx.Init(&fasthttp.Request{}, &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 5555}, nil)
	rawBytes := []byte(raw)
	src := bytes.NewReader(rawBytes)
	br := bufio.NewReader(src)
	allocs := testing.AllocsPerRun(1000, func() {
		ctx.Request.Header.Reset()
		src.Reset(rawBytes)
		br.Reset(src)
		if err := ctx.Request.Header.Read(br); err != nil {
			t.Fatal(err)
		}
		h := &ctx.Request.Header
		x := exchangePool.Get().(*exchange)
		x.p, x.r.ctx = p, &ctx
		x.begin()
		if x.r.rt == nil || !checkRawHeaders(h) {
			t.Fatal("no match")
		}
		if _, ok := x.r.st.upgrade(h); !ok || x.limit(h) != nil {
			t.Fatal("refused")
		}
		x.prepareRequest(h, 0)
		if string(h.Peek("X-Sidecar-Client")) != "ip:1.2.3.4" || string(h.Peek("X-Sidecar-Tier")) != "anonymous" {
			t.Fatalf("identity %q %q", h.Peek("X-Sidecar-Client"), h.Peek("X-Sidecar-Tier"))
		}
		x.r.rt.m.request(x.method, 200, x.r.tier).Inc()
		x.release()
	})
	if allocs > 1 {
		t.Errorf("request path allocates %.1f times per request, want at most 1 (the limiter key)", allocs)
	}
}

// The access log's writer fingerprints every line's client: one HMAC kept
// while the key stays, one allocation (the string) per line, and the same
// answer as a fresh HMAC.
func TestAccessLogFingerprint(t *testing.T) {
	key := []byte("key one")
	a := &accessLog{secret: func() []byte { return key }}
	got := a.fingerprint("ip:192.0.2.1")
	m := hmac.New(sha256.New, key)
	m.Write([]byte("ip:192.0.2.1"))
	if want := hex.EncodeToString(m.Sum(nil)[:8]); got != want {
		t.Fatalf("fingerprint %q, want %q", got, want)
	}
	if allocs := testing.AllocsPerRun(1000, func() { a.fingerprint("ip:192.0.2.1") }); allocs > 1 {
		t.Errorf("%v allocations per fingerprint, want ≤ 1", allocs)
	}
	key = []byte("key two") // a reload changed the secret
	if a.fingerprint("ip:192.0.2.1") == got {
		t.Error("the fingerprint did not change with the key")
	}
}

// Writing an access-log line into a batch with room allocates nothing.
func TestAccessLogWriteDoesNotAllocate(t *testing.T) {
	key := []byte("k")
	a := &accessLog{secret: func() []byte { return key }}
	e := accessEntry{requestID: "abc-1", route: "app", method: "GET", status: 200, tier: "anonymous",
		client: "ip:192.0.2.1", limit: "allowed", breaker: "closed", endpoint: "127.0.0.1:1"}
	now := e.at
	a.write(e, now)
	if allocs := testing.AllocsPerRun(1000, func() { a.batch.Reset(); a.write(e, now) }); allocs != 0 {
		t.Errorf("%v allocations per access-log line", allocs)
	}
}

// Taking and giving back an overload slot allocates nothing, with
// protection off and on.
func TestOverloadSlotAllocatesNothing(t *testing.T) {
	for _, on := range []string{"", "[upstreams.app.overload]\n"} {
		snap, err := policy.Parse("t", []byte("[tiers.anonymous]\nlimit = 1000000000\nwindow = \"1m\"\n[upstreams.app]\nurl = \"http://127.0.0.1:1\"\n"+on+"[[routes]]\nupstream = \"app\"\n"))
		if err != nil {
			t.Fatal(err)
		}
		p, err := New(snap, Settings{Metrics: metrics.NewSet(), AccessLog: io.Discard})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		var ctx fasthttp.RequestCtx
		ctx.Init2(nopConn{}, nil, false)
		ctx.Request.Header.SetRequestURI("/x")
		ctx.Request.Header.SetHost("x")
		x := new(exchange)
		x.p, x.r.ctx = p, &ctx
		x.begin()
		x.r.up = x.r.rt.up
		allocs := testing.AllocsPerRun(1000, func() {
			x.r.upLatency = time.Millisecond
			if err := x.enterOverload(); err != nil {
				t.Fatal(err)
			}
			x.leaveOverload(time.Now())
		})
		t.Logf("overload %q: %v allocs", on, allocs)
		if allocs != 0 {
			t.Errorf("allocs %v", allocs)
		}
	}
}
