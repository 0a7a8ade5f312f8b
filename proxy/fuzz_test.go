package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/policy"
)

// FuzzRequestHead runs made-up request heads through the real admission
// and rewrite path (begin, the header checks, the upgrade check, limit,
// prepareRequest) with API keys configured and an untrusted peer, and
// checks what would go upstream:
//
//   - no hop-by-hop field, and no field of server.trusted_only_headers;
//   - the identity fields once each, in no other spelling ('_' for '-'),
//     with the values the sidecar wrote: the tier is "premium" only for
//     the one known key sent alone, "anonymous" without a key;
//   - X-Forwarded-For is the peer alone;
//   - the Host the request was routed by.
func FuzzRequestHead(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nConnection: X-A, close\r\nX-A: 1\r\n\r\n"))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nConnection: X-Sidecar-Client, X-Sidecar-Tier\r\nX_Sidecar_Tier: premium\r\nx-sidecar-client: key:acme\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nX-API-Key:\r\nX-API-Key: known-key\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nX_API_Key: known-key\r\nX-Real-IP: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\n\r\n"))
	f.Add([]byte("GET http://other.local/x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-API-Key: known-key\r\n\r\n"))
	dir := f.TempDir()
	keys := filepath.Join(dir, "keys.toml")
	if err := os.WriteFile(keys, []byte("[[keys]]\nsha256 = \""+policy.HashKey("known-key")+"\"\ntier = \"premium\"\nclient = \"acme\"\n"), 0o600); err != nil {
		f.Fatal(err)
	}
	snap, err := policy.Parse("fuzz", []byte(`
[identity]
api_keys_file = "`+keys+`"
[tiers.premium]
limit = 1000000000
window = "1m"
[tiers.anonymous]
unlimited = true
[upstreams.app]
url = "http://127.0.0.1:1"
[[routes]]
upstream = "app"
`))
	if err != nil {
		f.Fatal(err)
	}
	p, err := New(snap, Settings{Metrics: metrics.NewSet(), AccessLog: io.Discard})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(p.Close)
	peer := &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 5555}
	written := newFieldSet("X-Sidecar-Client", "X-Sidecar-Tier", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-Id")
	trustedOnly := newFieldSet(policy.DefaultTrustedOnlyHeaders...)
	f.Fuzz(func(t *testing.T, raw []byte) {
		var ctx fasthttp.RequestCtx
		ctx.Init(&fasthttp.Request{}, peer, nil)
		h := &ctx.Request.Header
		if err := h.Read(bufio.NewReader(bytes.NewReader(raw))); err != nil {
			return
		}
		var keyLines [][]byte
		for k, v := range h.All() {
			if p.state.Load().apiKeyField.has(k) {
				keyLines = append(keyLines, append([]byte(nil), v...))
			}
		}
		x := exchangePool.Get().(*exchange)
		x.p, x.r.ctx = p, &ctx
		x.begin()
		var ok bool
		x.r.upgrade, ok = x.r.st.upgrade(h)
		if !checkRawHeaders(h) || !originForm(&ctx.Request) || x.r.rt == nil || !ok {
			x.release()
			return
		}
		if x.limit(h) != nil {
			x.release() // refused
			return
		}
		defer x.release()
		routedHost := string(h.Host())
		x.prepareRequest(h, h.ContentLength())

		wantTier := "anonymous"
		if len(keyLines) > 0 {
			if len(keyLines) != 1 || string(keyLines[0]) != "known-key" {
				t.Fatalf("API key lines %q were admitted as %s %s", keyLines, x.clientID, x.r.tier)
			}
			wantTier = "premium"
		}
		if x.r.tier != wantTier {
			t.Fatalf("tier %q, want %q", x.r.tier, wantTier)
		}
		seen := map[string]int{}
		for k, v := range h.All() {
			regenerated := (x.r.upgrade != nil && (hopHeaders[max(hopIndex(k), 0)] == "Connection" || hopHeaders[max(hopIndex(k), 0)] == "Upgrade")) ||
				(h.ContentLength() == -1 && string(k) == "Transfer-Encoding" && string(v) == "chunked") // the sidecar's own framing
			if hopIndex(k) >= 0 && !regenerated {
				t.Fatalf("hop-by-hop %s survived in %q", k, raw)
			}
			if trustedOnly.has(k) {
				t.Fatalf("%s from an untrusted peer reached the upstream: %q", k, raw)
			}
			if written.has(k) {
				seen[string(k)]++
				switch string(k) {
				case "X-Sidecar-Tier":
					if string(v) != wantTier {
						t.Fatalf("upstream sees tier %q, want %q", v, wantTier)
					}
				case "X-Sidecar-Client":
					if !bytes.Equal(v, x.clientID) {
						t.Fatalf("upstream sees client %q, want %q", v, x.clientID)
					}
				case "X-Forwarded-For":
					if string(v) != "192.0.2.7" {
						t.Fatalf("X-Forwarded-For %q from an untrusted peer", v)
					}
				default:
					if k[0] != 'X' || bytes.IndexByte(k, '_') >= 0 {
						t.Fatalf("field %q in another spelling reached the upstream", k)
					}
				}
			}
		}
		for _, k := range []string{"X-Sidecar-Client", "X-Sidecar-Tier", "X-Forwarded-For", "X-Forwarded-Proto", "X-Request-Id"} {
			if seen[k] != 1 {
				t.Fatalf("%s sent %d times for %q", k, seen[k], raw)
			}
		}
		if string(h.Host()) != routedHost {
			t.Fatalf("routed by host %q, forwarded with %q", routedHost, h.Host())
		}
	})
}
