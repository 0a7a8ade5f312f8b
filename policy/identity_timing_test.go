package policy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// BenchmarkVerifyToken is the cost of identifying a request by a valid
// bearer token, per algorithm: what a client that sends tokens costs the
// sidecar's CPU, and what the failure limit spares once an address is
// over it (a refused request costs a map lookup instead).
func BenchmarkVerifyToken(b *testing.B) {
	dir := b.TempDir()
	writePEM := func(name string, pub any) string {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			b.Fatal(err)
		}
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
			b.Fatal(err)
		}
		return path
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	b.Setenv("SIDECAR_BENCH_SECRET", "0123456789abcdef0123456789abcdef-bench")
	claims := jwt.MapClaims{"sub": "alice", "tier": "premium", "exp": time.Now().Add(time.Hour).Unix()}
	for _, c := range []struct {
		alg, keyConf string
		method       jwt.SigningMethod
		signKey      any
	}{
		{"HS256", `secret_env = "SIDECAR_BENCH_SECRET"`, jwt.SigningMethodHS256, []byte("0123456789abcdef0123456789abcdef-bench")},
		{"RS256", `public_key_file = "` + writePEM("rsa.pem", &rsaKey.PublicKey) + `"`, jwt.SigningMethodRS256, rsaKey},
		{"ES256", `public_key_file = "` + writePEM("ec.pem", &ecKey.PublicKey) + `"`, jwt.SigningMethodES256, ecKey},
	} {
		b.Run(c.alg, func(b *testing.B) {
			snap, err := Parse("bench", []byte(`
[identity.jwt]
algorithm = "`+c.alg+`"
`+c.keyConf+`
[tiers.premium]
limit = 10
window = "1m"
[tiers.anonymous]
limit = 10
window = "1m"
[tiers.authenticated]
limit = 10
window = "1m"
`+minimal))
			if err != nil {
				b.Fatal(err)
			}
			tok, err := jwt.NewWithClaims(c.method, claims).SignedString(c.signKey)
			if err != nil {
				b.Fatal(err)
			}
			creds := &Credentials{Authorization: [][]byte{[]byte("Bearer " + tok)}, Peer: netip.MustParseAddr("127.0.0.1")}
			var dst []byte
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				var v Verdict
				dst, v, err = snap.AppendIdentity(dst[:0], creds)
				if err != nil || v.Tier != "premium" {
					b.Fatal(err, v)
				}
			}
		})
	}
}
