package policy

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

const fuzzSecret = "fuzz-secret-0123456789abcdef0123"

// fuzzToken is a valid HS256 token for the fuzz config, as a seed.
func fuzzToken(f *testing.F, claims jwt.MapClaims) []byte {
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(fuzzSecret))
	if err != nil {
		f.Fatal(err)
	}
	return []byte("Bearer " + tok)
}

// bearerRE: the auth-scheme is "Bearer" (not a longer token that starts so).
var bearerRE = regexp.MustCompile("^(?i)bearer([^!#$%&'*+.^_`|~0-9a-z-]|$)")

// FuzzIdentify feeds made-up API keys, Authorization headers (JWTs) and
// X-Forwarded-For chains to identity resolution with API keys and HS256
// tokens configured. It must never panic, and whatever it accepts must be
// explainable: the one known key, a token signed with the secret, or the
// address — an untrusted peer always by its own address. Seeds are in
// testdata/fuzz/FuzzIdentify and below.
func FuzzIdentify(f *testing.F) {
	f.Setenv("SIDECAR_FUZZ_SECRET", fuzzSecret)
	dir := f.TempDir()
	keys := filepath.Join(dir, "keys.toml")
	if err := os.WriteFile(keys, []byte("[[keys]]\nsha256 = \""+HashKey("known-key")+"\"\ntier = \"premium\"\nclient = \"acme\"\n"), 0o600); err != nil {
		f.Fatal(err)
	}
	snap, err := Parse("fuzz", []byte(`
[server]
trusted_proxies = ["10.0.0.0/8", "127.0.0.1/32"]
[identity]
api_keys_file = "`+keys+`"
[identity.jwt]
algorithm = "HS256"
secret_env = "SIDECAR_FUZZ_SECRET"
[tiers.premium]
limit = 10
window = "1m"
[tiers.anonymous]
limit = 10
window = "1m"
[tiers.authenticated]
unlimited = true
[upstreams.a]
url = "http://127.0.0.1:1"
[[routes]]
upstream = "a"
`))
	if err != nil {
		f.Fatal(err)
	}
	exp := time.Now().Add(24 * time.Hour).Unix()
	f.Add([]byte("known-key"), []byte(""), []byte("1.2.3.4, 10.0.0.1"), "10.0.0.1")
	f.Add([]byte(""), fuzzToken(f, jwt.MapClaims{"sub": "alice", "tier": "premium", "exp": exp}), []byte(""), "127.0.0.1")
	f.Add([]byte(""), fuzzToken(f, jwt.MapClaims{"sub": "bob", "exp": 1}), []byte(""), "127.0.0.1")
	f.Add([]byte(""), []byte("Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."), []byte(""), "127.0.0.1")
	// apiKey and auth hold one field line per '\n'-separated part, so that
	// repeated credentials are fuzzed too.
	f.Fuzz(func(t *testing.T, apiKey, auth, xff []byte, peerText string) {
		peer, err := netip.ParseAddr(peerText)
		if err != nil {
			return
		}
		lines := func(b []byte) [][]byte {
			if len(b) == 0 {
				return nil
			}
			return bytes.Split(b, []byte{'\n'})
		}
		creds := &Credentials{APIKeys: lines(apiKey), Authorization: lines(auth), ForwardedFor: [][]byte{xff}, Peer: peer}
		c, err := snap.Identify(creds)
		if err != nil {
			if !snap.Verifies(creds) {
				t.Fatalf("identification failed (%v) for a request Verifies calls plain: %q %q", err, apiKey, auth)
			}
			return
		}
		bearers := 0
		for _, a := range creds.Authorization {
			if bearerRE.Match(a) {
				bearers++
			}
		}
		switch {
		case strings.HasPrefix(c.ID, "key:"):
			if string(apiKey) != "known-key" || c.ID != "key:acme" || c.Tier != "premium" || bearers != 0 {
				t.Fatalf("API key %q (Authorization %q) accepted as %+v", apiKey, auth, c)
			}
		case strings.HasPrefix(c.ID, "jwt:"):
			if len(apiKey) != 0 || len(creds.Authorization) != 1 || bearers != 1 || !strings.Contains(string(auth), ".") {
				t.Fatalf("token %q (API key %q) accepted as %+v", auth, apiKey, c)
			}
			if c.Tier != "premium" && c.Tier != "authenticated" {
				t.Fatalf("token gave an unknown tier: %+v", c)
			}
		case strings.HasPrefix(c.ID, "ip:"):
			if len(apiKey) != 0 || c.Tier != "anonymous" || bearers != 0 || len(creds.Authorization) > 1 {
				t.Fatalf("API key %q or token %q fell back to the address: %+v", apiKey, auth, c)
			}
			if !snap.Server.Trusted(peer.Unmap()) && c.ID != "ip:"+peer.Unmap().String() && !peer.Unmap().Is6() {
				t.Fatalf("untrusted peer %s identified as %s", peer, c.ID)
			}
		default:
			t.Fatalf("identity of an unknown kind: %+v", c)
		}
	})
}
