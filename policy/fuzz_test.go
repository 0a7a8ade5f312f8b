package policy

import (
	"net/netip"
	"strings"
	"testing"
)

// FuzzIdentify feeds made-up API keys, Authorization headers and
// X-Forwarded-For chains to identity resolution: it must never panic, and
// an untrusted peer is always identified by its own address.
func FuzzIdentify(f *testing.F) {
	f.Add([]byte("key"), []byte("Bearer a.b.c"), []byte("1.2.3.4, 10.0.0.1"), "10.0.0.1")
	f.Add([]byte(""), []byte("bearer "), []byte("::1, zz, 2001:db8::1"), "127.0.0.1")
	f.Add([]byte("\x00"), []byte("Basic Zm9v"), []byte(",,, ,"), "2001:db8::2")
	snap, err := Parse("fuzz", []byte(`
[server]
trusted_proxies = ["10.0.0.0/8", "127.0.0.1/32"]
[upstreams.a]
url = "http://127.0.0.1:1"
[[routes]]
upstream = "a"
`))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, apiKey, auth, xff []byte, peerText string) {
		peer, err := netip.ParseAddr(peerText)
		if err != nil {
			return
		}
		c, err := snap.Identify(apiKey, auth, [][]byte{xff}, peer)
		if err != nil {
			return
		}
		if !strings.HasPrefix(c.ID, "ip:") || c.Tier != "anonymous" {
			t.Fatalf("no keys or tokens configured, yet identified as %+v", c)
		}
		if !snap.Server.Trusted(peer.Unmap()) && c.ID != "ip:"+peer.Unmap().String() && !peer.Unmap().Is6() {
			t.Fatalf("untrusted peer %s identified as %s", peer, c.ID)
		}
	})
}
