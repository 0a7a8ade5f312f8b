package test

import (
	"bufio"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// startWSGI runs test/testdata/wsgi_echo.py (Python's wsgiref) on a free
// loopback port: a real CGI-style backend that reads header fields as
// HTTP_* variables, '-' and '_' alike, and echoes them as JSON.
func startWSGI(t *testing.T) string {
	t.Helper()
	cmd := exec.Command("python3", "testdata/wsgi_echo.py")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting python3 (make deps-test installs it): %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("wsgi backend did not start: %v", err)
	}
	return "http://127.0.0.1:" + strings.TrimSpace(line)
}

// environ sends raw (a request head; "\r\n" line ends are added) to the
// sidecar and returns the status and, for a 200, the WSGI environ the
// backend saw.
func environ(t *testing.T, addr, head string) (int, map[string]string, string) {
	t.Helper()
	req := strings.ReplaceAll(strings.TrimSpace(head), "\n", "\r\n") + "\r\nConnection: close\r\n\r\n"
	resp := rawRequest(t, addr, req, 5*time.Second)
	r, err := http.ReadResponse(bufio.NewReader(strings.NewReader(resp)), nil)
	if err != nil {
		t.Fatalf("no response to %q: %v (%q)", head, err, resp)
	}
	body, _ := io.ReadAll(r.Body)
	env := map[string]string{}
	if r.StatusCode == 200 {
		if err := json.Unmarshal(body, &env); err != nil {
			t.Fatalf("backend answer %q: %v", body, err)
		}
	}
	return r.StatusCode, env, string(body)
}

// The upstream never sees an identity or tier the sidecar did not write:
// a client cannot remove them by naming them in Connection, add copies in
// another spelling that a CGI-style backend reads as the same variable, or
// repeat them; client-address fields from untrusted peers are removed.
func TestIdentityCannotBeStrippedOrSpoofed(t *testing.T) {
	wsgi := startWSGI(t)
	dir := t.TempDir()
	writeKeys(t, dir)
	cfg := strings.Replace(tiersConfig, "[tiers.anonymous]\nlimit = 3", "[tiers.anonymous]\nlimit = 100", 1)
	sc := startSidecarIn(t, dir, cfg+routeTo(wsgi, ""))
	anonymous := map[string]string{"HTTP_X_SIDECAR_CLIENT": "ip:127.0.0.1", "HTTP_X_SIDECAR_TIER": "anonymous",
		"HTTP_X_FORWARDED_FOR": "127.0.0.1", "HTTP_X_FORWARDED_PROTO": "http"}
	cases := []struct {
		name, head string
		want       map[string]string
		absent     []string
	}{
		{"Connection names the identity", "GET / HTTP/1.1\nHost: app\nConnection: X-Sidecar-Client, X-Sidecar-Tier, X-Forwarded-For", anonymous, nil},
		{"underscores for dashes", "GET / HTTP/1.1\nHost: app\nX_Sidecar_Tier: premium\nX_Sidecar_Client: key:acme\nX_Forwarded_For: 6.6.6.6", anonymous, nil},
		{"repeated and mixed case", "GET / HTTP/1.1\nHost: app\nX-Sidecar-Tier: premium\nx-sidecar-tier: premium\nX-SIDECAR-CLIENT: key:acme", anonymous, nil},
		{"both at once", "GET / HTTP/1.1\nHost: app\nConnection: x-sidecar-tier\nX-Sidecar-Tier: premium\nX_SIDECAR_TIER: premium", anonymous, nil},
		{"client-address fields from an untrusted peer",
			"GET / HTTP/1.1\nHost: app\nX-Real-IP: 6.6.6.6\nTrue-Client-IP: 6.6.6.6\nForwarded: for=6.6.6.6\nX-Forwarded-Port: 443\n" +
				"X-Forwarded-Prefix: /admin\nX-Original-URL: /admin\nX-Rewrite-URL: /admin\nCF-Connecting-IP: 6.6.6.6\nX-Client-IP: 6.6.6.6\n" +
				"X-Cluster-Client-IP: 6.6.6.6\nX_Real_IP: 6.6.6.6\nX-Forwarded-Host: evil\nX-Forwarded-Proto: https",
			map[string]string{"HTTP_X_FORWARDED_HOST": "app", "HTTP_X_FORWARDED_PROTO": "http"},
			[]string{"HTTP_X_REAL_IP", "HTTP_TRUE_CLIENT_IP", "HTTP_FORWARDED", "HTTP_X_FORWARDED_PORT", "HTTP_X_FORWARDED_PREFIX",
				"HTTP_X_ORIGINAL_URL", "HTTP_X_REWRITE_URL", "HTTP_CF_CONNECTING_IP", "HTTP_X_CLIENT_IP", "HTTP_X_CLUSTER_CLIENT_IP"}},
		{"a verified key", "GET / HTTP/1.1\nHost: app\nX-API-Key: acme-secret-key\nX_Sidecar_Tier: anonymous\nConnection: X-Sidecar-Tier",
			map[string]string{"HTTP_X_SIDECAR_CLIENT": "key:acme", "HTTP_X_SIDECAR_TIER": "premium"}, nil},
		{"request id in another spelling", "GET / HTTP/1.1\nHost: app\nX-Request-Id: abc\nX_Request_Id: forged",
			map[string]string{"HTTP_X_REQUEST_ID": "abc"}, nil},
	}
	for _, c := range cases {
		status, env, body := environ(t, sc.Addr, c.head)
		if status != 200 {
			t.Errorf("%s: %d %s", c.name, status, body)
			continue
		}
		for k, v := range c.want {
			if env[k] != v {
				t.Errorf("%s: the backend saw %s=%q, want %q", c.name, k, env[k], v)
			}
		}
		for _, k := range c.absent {
			if v, ok := env[k]; ok {
				t.Errorf("%s: the backend saw %s=%q", c.name, k, v)
			}
		}
	}

	// From a trusted proxy the client-address fields are believed, and a
	// configured list replaces the default one.
	trusted := startSidecarIn(t, dir, "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n"+cfg+routeTo(wsgi, ""))
	_, env, _ := environ(t, trusted.Addr, "GET / HTTP/1.1\nHost: app\nX-Real-IP: 198.51.100.9\nX-Forwarded-For: 198.51.100.9\nX-Forwarded-Proto: https")
	if env["HTTP_X_REAL_IP"] != "198.51.100.9" || env["HTTP_X_FORWARDED_FOR"] != "198.51.100.9, 127.0.0.1" ||
		env["HTTP_X_SIDECAR_CLIENT"] != "ip:198.51.100.9" || env["HTTP_X_FORWARDED_PROTO"] != "https" {
		t.Errorf("behind a trusted proxy the backend saw %v", env)
	}
	custom := startSidecarIn(t, dir, "[server]\ntrusted_only_headers = [\"X-Custom-Client\"]\n"+cfg+routeTo(wsgi, ""))
	_, env, _ = environ(t, custom.Addr, "GET / HTTP/1.1\nHost: app\nX-Custom-Client: 6.6.6.6\nX_Custom_Client: 6.6.6.6\nX-Real-IP: 6.6.6.6")
	if _, ok := env["HTTP_X_CUSTOM_CLIENT"]; ok || env["HTTP_X_REAL_IP"] != "6.6.6.6" {
		t.Errorf("with trusted_only_headers = [\"X-Custom-Client\"] the backend saw %v", env)
	}
}

// Every line of a credential is looked at: a repeated, mixed or malformed
// credential is refused (400 or 401) with nothing forwarded, never demoted
// to anonymous with the bad credential passed on; another scheme alone
// reaches the backend untouched.
func TestCredentialsVerifiedOrRefused(t *testing.T) {
	wsgi := startWSGI(t)
	dir := t.TempDir()
	writeKeys(t, dir)
	secret := "0123456789abcdef0123456789abcdef-test-secret"
	cfg := tiersConfig + `
[identity.jwt]
algorithm = "HS256"
secret_env = "SIDECAR_TEST_JWT"
[tiers.authenticated]
limit = 100
window = "10s"
` + routeTo(wsgi, "")
	cfg = strings.Replace(cfg, "[tiers.anonymous]\nlimit = 3", "[tiers.anonymous]\nlimit = 100", 1)
	sc := startSidecarIn(t, dir, cfg, "SIDECAR_TEST_JWT="+secret)
	token := func(claims jwt.MapClaims) string {
		tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	valid := token(jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(time.Hour).Unix()})
	expired := token(jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(-time.Hour).Unix()})
	const basic = "Basic YWxhZGRpbjpvcGVuc2VzYW1l"
	cases := []struct {
		name, fields string
		status       int
		msg          string
	}{
		{"empty key, then a revoked one", "X-API-Key:\nX-API-Key: revoked-key", 400, "ambiguous credentials"},
		{"the good key twice", "X-API-Key: acme-secret-key\nX-API-Key: acme-secret-key", 400, "ambiguous credentials"},
		{"a key spelled with underscores, revoked", "X_API_Key: revoked-key", 401, "unknown or revoked API key"},
		{"a good key and another in underscores", "X-API-Key: acme-secret-key\nX_Api_Key: wrong", 400, "ambiguous credentials"},
		{"an empty key", "X-API-Key:", 401, "unknown or revoked API key"},
		{"Basic, then a forged bearer", "Authorization: " + basic + "\nAuthorization: Bearer forged.token.here", 400, "ambiguous credentials"},
		{"two bearers", "Authorization: Bearer " + valid + "\nAuthorization: Bearer " + valid, 400, "ambiguous credentials"},
		{"bearer with a tab", "Authorization: Bearer\t" + expired, 401, "invalid bearer token"},
		{"bearer with a tab, valid token", "Authorization: Bearer\t" + valid, 401, "invalid bearer token"},
		{"bearer without a token", "Authorization: Bearer", 401, "invalid bearer token"},
		{"bearer, lower case, expired", "Authorization: bearer " + expired, 401, "invalid bearer token"},
		{"a key and a token", "X-API-Key: acme-secret-key\nAuthorization: Bearer " + valid, 400, "ambiguous credentials"},
		{"trailing garbage after the token", "Authorization: Bearer " + valid + " extra", 401, "invalid bearer token"},
	}
	for _, c := range cases {
		before, _ := startCount(sc)
		status, _, body := environ(t, sc.Addr, "GET / HTTP/1.1\nHost: app\n"+c.fields)
		if status != c.status || !strings.Contains(body, `"error":"`+c.msg) {
			t.Errorf("%s: %d %s, want %d %q", c.name, status, body, c.status, c.msg)
		}
		if after, _ := startCount(sc); after != before {
			t.Errorf("%s: the request reached the backend", c.name)
		}
	}
	ok := []struct {
		name, fields string
		want         map[string]string
	}{
		{"Basic alone", "Authorization: " + basic, map[string]string{"HTTP_AUTHORIZATION": basic, "HTTP_X_SIDECAR_TIER": "anonymous"}},
		{"Digest alone", `Authorization: Digest username="a", realm="r"`, map[string]string{"HTTP_AUTHORIZATION": `Digest username="a", realm="r"`}},
		{"a valid token", "Authorization: Bearer  " + valid, map[string]string{"HTTP_X_SIDECAR_CLIENT": "jwt:alice", "HTTP_X_SIDECAR_TIER": "authenticated"}},
		{"a valid key", "X-API-Key: acme-secret-key", map[string]string{"HTTP_X_SIDECAR_CLIENT": "key:acme", "HTTP_X_API_KEY": "acme-secret-key"}},
	}
	for _, c := range ok {
		status, env, body := environ(t, sc.Addr, "GET / HTTP/1.1\nHost: app\n"+c.fields)
		if status != 200 {
			t.Errorf("%s: %d %s", c.name, status, body)
			continue
		}
		for k, v := range c.want {
			if env[k] != v {
				t.Errorf("%s: the backend saw %s=%q, want %q", c.name, k, env[k], v)
			}
		}
	}
	if v := sc.metric(`sidecar_identity_problems_total{reason="ambiguous"}`); v != 6 {
		t.Errorf("ambiguous credentials counted %v, want 6", v)
	}
}

// startCount is the number of requests the sidecar's upstream has seen,
// from its metrics (the WSGI backend counts nothing itself).
func startCount(sc *sidecar) (float64, error) {
	return sc.metricSum(`sidecar_upstream_duration_seconds_count{upstream="app"}`), nil
}

// writePublicKey writes an RSA public key as PEM.
func writePublicKey(t *testing.T, path string, pub *rsa.PublicKey) {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// metricSum returns the value of a series, or 0 when it is absent.
func (s *sidecar) metricSum(series string) float64 {
	if v := s.metric(series); v > 0 {
		return v
	}
	return 0
}

// An absolute-form target names the authority: it is routed, limited and
// forwarded (Host, X-Forwarded-Host) by it, whatever Host says.
func TestAbsoluteFormUsesOneAuthority(t *testing.T) {
	public := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "public host=%s xfh=%s uri=%s", r.Host, r.Header.Get("X-Forwarded-Host"), r.RequestURI)
	})
	admin := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "admin") })
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.public]
url = %q
[upstreams.admin]
url = %q
[[routes]]
host = "public.local"
upstream = "public"
[[routes]]
host = "admin.local"
upstream = "admin"
`, public.url(), admin.url()))
	send := func(req string) (int, string) { return rawStatus(t, sc.Addr, req) }
	if status, body := send("GET http://public.local/x?y=1 HTTP/1.1\nHost: admin.local\nConnection: close\n\n"); status != 200 ||
		body != "public host=public.local xfh=public.local uri=/x?y=1" {
		t.Errorf("absolute-form with another Host: %d %q", status, body)
	}
	if status, body := send("GET HTTP://PUBLIC.LOCAL HTTP/1.1\nHost: admin.local\nConnection: close\n\n"); status != 200 ||
		body != "public host=PUBLIC.LOCAL xfh=PUBLIC.LOCAL uri=/" {
		t.Errorf("absolute-form without a path: %d %q", status, body)
	}
	if status, body := send("GET / HTTP/1.1\nHost: public.local.\nConnection: close\n\n"); status != 200 || !strings.HasPrefix(body, "public") {
		t.Errorf("Host with a trailing dot: %d %q", status, body)
	}
	for _, req := range []string{
		"GET http://user:pw@public.local/ HTTP/1.1\nHost: public.local\nConnection: close\n\n",
		"GET http:///x HTTP/1.1\nHost: public.local\nConnection: close\n\n",
		"GET / HTTP/1.1\nHost: public.local\nHost: admin.local\nConnection: close\n\n",
	} {
		if status, body := send(req); status != 400 {
			t.Errorf("%q: %d %q, want 400", req, status, body)
		}
	}
	if n, _ := admin.counts(); n != 0 {
		t.Errorf("the admin upstream got %d requests", n)
	}
}

// Once any tier exists, every tier a client can land in needs a table;
// -validate names the one missing.
func TestEveryReachableTierHasATable(t *testing.T) {
	dir := t.TempDir()
	writeKeys(t, dir)
	for _, c := range []struct{ cfg, want string }{
		{"[tiers.premium]\nlimit = 1\nwindow = \"1m\"\n", `identity.anonymous_tier: tier "anonymous" (clients known by their address) has no [tiers.anonymous] table`},
		{"[identity.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"SIDECAR_TEST_JWT\"\n[tiers.anonymous]\nlimit = 1\nwindow = \"1m\"\n",
			`identity.authenticated_tier: tier "authenticated"`},
		{"[identity]\nclient_cert_tier = \"partner\"\n[tiers.anonymous]\nunlimited = true\n", `identity.client_cert_tier: tier "partner"`},
		{"[identity]\napi_keys_file = \"keys.toml\"\n[tiers.anonymous]\nunlimited = true\n", `keys[0].tier: unknown tier "premium"`},
		{"[tiers.anonymous]\nunlimited = true\nlimit = 5\n", `tiers.anonymous.unlimited: an unlimited tier takes no limit`},
	} {
		path := filepath.Join(dir, "sidecar.toml")
		if err := os.WriteFile(path, []byte(c.cfg+routeTo("http://127.0.0.1:1", "")), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(sidecarBin, "-validate", "-config", path)
		cmd.Env = append(os.Environ(), "SIDECAR_TEST_JWT=0123456789abcdef0123456789abcdef-test-secret")
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("-validate of\n%s\nsaid %v:\n%s\nwant %q", c.cfg, err, out, c.want)
		}
	}
}

// A token whose tier claim names no table gets the authenticated tier, is
// counted and logged (once a minute), and never goes unlimited; with
// unknown_tier = "reject" it is a 401. Tokens need exp unless told
// otherwise; an unknown crit header and an oversized token are refused.
func TestTokenTiersAndClaims(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", r.Header.Get("X-Sidecar-Client"), r.Header.Get("X-Sidecar-Tier"))
	})
	secret := "0123456789abcdef0123456789abcdef-test-secret"
	cfg := func(jwtExtra string) string {
		return `
[identity.jwt]
algorithm = "HS256"
secret_env = "SIDECAR_TEST_JWT"
` + jwtExtra + `
[tiers.anonymous]
limit = 100
window = "1m"
[tiers.authenticated]
limit = 2
window = "1m"
[tiers.premium]
limit = 100
window = "1m"
[tiers.internal]
unlimited = true
` + routeTo(be.url(), "")
	}
	sc := startSidecarIn(t, t.TempDir(), cfg(""), "SIDECAR_TEST_JWT="+secret)
	exp := time.Now().Add(time.Hour).Unix()
	sign := func(claims jwt.MapClaims, header map[string]any) string {
		tok := jwt.NewWithClaims(jwt.SigningMethodHS256, claims)
		for k, v := range header {
			tok.Header[k] = v
		}
		s, err := tok.SignedString([]byte(secret))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	bearer := func(tok string) map[string]string { return map[string]string{"Authorization": "Bearer " + tok} }
	for i, tier := range []string{"nosuchtier", "Premium"} {
		resp, body := get(t, sc.url("/"), bearer(sign(jwt.MapClaims{"sub": "u" + strconv.Itoa(i), "tier": tier, "exp": exp}, nil)))
		if resp.StatusCode != 200 || body != fmt.Sprintf("jwt:u%d authenticated", i) ||
			resp.Header.Get("RateLimit-Policy") != `"authenticated";q=2;w=60` {
			t.Errorf("tier claim %q: %d %q %q", tier, resp.StatusCode, body, resp.Header.Get("RateLimit-Policy"))
		}
	}
	// The authenticated tier's limit holds for such tokens: not unlimited.
	unknown := sign(jwt.MapClaims{"sub": "mallory", "tier": "nosuchtier", "exp": exp}, nil)
	for i := range 3 {
		resp, _ := get(t, sc.url("/"), bearer(unknown))
		if want := map[bool]int{true: 200, false: 429}[i < 2]; resp.StatusCode != want {
			t.Errorf("unknown tier claim, request %d: %d, want %d", i, resp.StatusCode, want)
		}
	}
	if v := sc.metric(`sidecar_identity_problems_total{reason="unknown_tier"}`); v != 5 {
		t.Errorf("unknown tier claims counted %v, want 5", v)
	}
	if n := strings.Count(sc.logs.String(), "tier claim names no [tiers] table"); n != 1 {
		t.Errorf("unknown tier claim logged %d times, want once a minute", n)
	}
	resp, _ := get(t, sc.url("/"), bearer(sign(jwt.MapClaims{"sub": "svc", "tier": "internal", "exp": exp}, nil)))
	if resp.StatusCode != 200 || resp.Header.Get("RateLimit-Policy") != "" {
		t.Errorf("unlimited tier: %d, RateLimit-Policy %q", resp.StatusCode, resp.Header.Get("RateLimit-Policy"))
	}

	big := sign(jwt.MapClaims{"sub": "big", "exp": exp, "pad": strings.Repeat("x", 9000)}, nil)
	for name, tok := range map[string]string{
		"no exp":       sign(jwt.MapClaims{"sub": "noexp"}, nil),
		"crit":         sign(jwt.MapClaims{"sub": "crit", "exp": exp}, map[string]any{"crit": []string{"exp"}}),
		"over 8 KiB":   big,
		"sub with LF":  sign(jwt.MapClaims{"sub": "a\nX-Sidecar-Tier: premium", "exp": exp}, nil),
		"sub not text": sign(jwt.MapClaims{"sub": 42, "exp": exp}, nil),
	} {
		if resp, body := get(t, sc.url("/"), bearer(tok)); resp.StatusCode != 401 || !strings.Contains(body, "invalid bearer token") {
			t.Errorf("%s: %d %q, want 401", name, resp.StatusCode, body)
		}
	}

	strict := startSidecarIn(t, t.TempDir(), cfg("unknown_tier = \"reject\"\nrequire_exp = false\n"), "SIDECAR_TEST_JWT="+secret)
	if resp, _ := get(t, strict.url("/"), bearer(unknown)); resp.StatusCode != 401 {
		t.Errorf("unknown_tier = \"reject\": %d, want 401", resp.StatusCode)
	}
	if resp, body := get(t, strict.url("/"), bearer(sign(jwt.MapClaims{"sub": "noexp", "tier": "premium"}, nil))); resp.StatusCode != 200 || body != "jwt:noexp premium" {
		t.Errorf("require_exp = false, token without exp: %d %q", resp.StatusCode, body)
	}
}

// An address that keeps failing identification is limited under the
// anonymous tier: past its limit, keys and tokens from it get 429 at once,
// without a key lookup or signature check (the bad-token count stops).
func TestFailedIdentificationIsLimited(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Header.Get("X-Sidecar-Client")) })
	dir := t.TempDir()
	writeKeys(t, dir)
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	writePublicKey(t, filepath.Join(dir, "jwt.pem"), &key.PublicKey)
	sc := startSidecarIn(t, dir, tiersConfig+`
[identity.jwt]
algorithm = "RS256"
public_key_file = "jwt.pem"
[tiers.authenticated]
limit = 100
window = "10s"
`+routeTo(be.url(), ""))
	forged, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "x", "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte("not-the-key-not-the-key-not-the-key"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if resp, _ := get(t, sc.url("/"), map[string]string{"Authorization": "Bearer " + forged}); resp.StatusCode != 401 {
			t.Fatalf("bad token %d: %d, want 401", i, resp.StatusCode)
		}
	}
	badTokens := sc.metric(`sidecar_identity_problems_total{reason="bad_token"}`)
	for i := range 5 {
		hdr := map[string]string{"Authorization": "Bearer " + forged}
		if i%2 == 1 {
			hdr = map[string]string{"X-API-Key": "acme-secret-key"} // even a good key: the address is refused
		}
		resp, _ := get(t, sc.url("/"), hdr)
		if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" {
			t.Errorf("credential %d after 3 failures: %d (Retry-After %q), want 429", i, resp.StatusCode, resp.Header.Get("Retry-After"))
		}
	}
	if v := sc.metric(`sidecar_identity_problems_total{reason="bad_token"}`); v != badTokens || badTokens != 3 {
		t.Errorf("bad tokens verified: %v before the limit, %v after; want 3 and no more", badTokens, v)
	}
	if v := sc.metric(`sidecar_identity_problems_total{reason="failure_limit"}`); v != 5 {
		t.Errorf("failure-limit refusals counted %v, want 5", v)
	}
	// Requests without credentials are the anonymous tier's own business.
	if resp, body := get(t, sc.url("/"), nil); resp.StatusCode != 200 || body != "ip:127.0.0.1" {
		t.Errorf("anonymous request from the same address: %d %q", resp.StatusCode, body)
	}
}

// X-Forwarded-For entries as proxies write them, with ports and brackets,
// parse to the address; a garbage entry ends the trusted chain.
func TestForwardedForWithPorts(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Header.Get("X-Sidecar-Client")) })
	sc := startSidecar(t, "[server]\ntrusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]\n"+routeTo(be.url(), ""))
	for _, c := range []struct{ xff, want string }{
		{"1.1.1.1:5555", "ip:1.1.1.1"},
		{"[2001:db8::1]:443", "ip:2001:db8::/64"},
		{"[2001:db8::1]", "ip:2001:db8::/64"},
		{"198.51.100.1, 10.0.0.1:8080", "ip:198.51.100.1"},
		{"198.51.100.1, garbage", "ip:127.0.0.1"},
		{"198.51.100.1, 1.2.3.4:99999", "ip:127.0.0.1"},
		{"198.51.100.1, [2001:db8::1", "ip:127.0.0.1"},
	} {
		if _, body := get(t, sc.url("/"), map[string]string{"X-Forwarded-For": c.xff}); body != c.want {
			t.Errorf("X-Forwarded-For %q identified as %q, want %q", c.xff, body, c.want)
		}
	}
}

// A client id containing what used to be the key separator cannot share
// another client's per-route count.
func TestLimiterKeysCannotCollide(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	secret := "0123456789abcdef0123456789abcdef-test-secret"
	sc := startSidecarIn(t, t.TempDir(), fmt.Sprintf(`
[identity.jwt]
algorithm = "HS256"
secret_env = "SIDECAR_TEST_JWT"
[tiers.anonymous]
limit = 2
window = "1m"
[tiers.authenticated]
limit = 2
window = "1m"
[upstreams.app]
url = %q
[[routes]]
name = "r"
path_prefix = "/a"
limit_per_route = true
upstream = "app"
[[routes]]
name = "other"
upstream = "app"
`, be.url()), "SIDECAR_TEST_JWT="+secret)
	tok := func(sub string) map[string]string {
		s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": sub, "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte(secret))
		if err != nil {
			t.Fatal(err)
		}
		return map[string]string{"Authorization": "Bearer " + s}
	}
	for range 2 {
		if resp, _ := get(t, sc.url("/a"), tok("x")); resp.StatusCode != 200 {
			t.Fatalf("client x on route r: %d", resp.StatusCode)
		}
	}
	// "authenticated|jwt:x|r" was both (x, route r) and (x|r, no route).
	if resp, _ := get(t, sc.url("/b"), tok("x|r")); resp.StatusCode != 200 {
		t.Errorf("client \"x|r\" on another route was limited by client x's count on route r: %d", resp.StatusCode)
	}
}

// Only allow-listed upgrades are tunnelled (h2c's is ignored); a tunnel is
// one request for limits, metrics and the access log, and is cut after the
// idle timeout.
func TestUpgradesAllowListedAndCounted(t *testing.T) {
	upstream := rawBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		head, err := readRequestHead(br)
		if err != nil {
			return
		}
		if !strings.Contains(strings.ToLower(head), "upgrade: websocket") {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
			return
		}
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		io.Copy(c, br) // echo until the sidecar closes
	})
	sc := startSidecar(t, "[server]\nidle_timeout = \"1s\"\n[access_log]\nenabled = true\n[tiers.anonymous]\nlimit = 2\nwindow = \"1m\"\n"+routeTo(upstream, ""))
	upgrade := func(proto string) (net.Conn, string) {
		c, err := net.Dial("tcp", sc.Addr)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", proto)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 4096)
		n, _ := c.Read(b)
		return c, string(b[:n])
	}
	if c, resp := upgrade("foo"); !strings.HasPrefix(resp, "HTTP/1.1 501") {
		t.Errorf("Upgrade: foo answered %q, want 501", resp)
	} else {
		c.Close()
	}
	if c, resp := upgrade("h2c"); !strings.HasPrefix(resp, "HTTP/1.1 200") || !strings.HasSuffix(resp, "plain") {
		t.Errorf("Upgrade: h2c answered %q, want the request served as HTTP/1.1", resp)
	} else {
		c.Close()
	}
	c, resp := upgrade("websocket")
	if !strings.HasPrefix(resp, "HTTP/1.1 101") {
		t.Fatalf("websocket upgrade answered %q", resp)
	}
	io.WriteString(c, "ping")
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
		t.Fatalf("tunnel echo %q %v", b, err)
	}
	// Idle for longer than idle_timeout: the sidecar cuts the tunnel.
	start := time.Now()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(b); err == nil {
		t.Error("an idle tunnel was not closed")
	}
	t.Logf("idle tunnel closed after %v (idle_timeout 1s)", time.Since(start).Round(10*time.Millisecond))
	c.Close()
	// The limit (2) counted the h2c request and the tunnel; the refused
	// upgrade was answered before it: the next one is 429.
	if _, resp := upgrade("websocket"); !strings.HasPrefix(resp, "HTTP/1.1 429") {
		t.Errorf("3rd admitted request (limit 2, the tunnel one of them) answered %q", resp)
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) && !strings.Contains(sc.logs.String(), `"status":101`) {
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(sc.logs.String(), `"status":101`) {
		t.Errorf("no access log line for the tunnel:\n%s", sc.logs.String())
	}
	if v := sc.metric(`sidecar_requests_total{route="app",method="GET",status_class="1xx",tier="anonymous"}`); v != 1 {
		t.Errorf("tunnel counted %v times in sidecar_requests_total", v)
	}
}

// -validate and start-up never print a password from an upstream URL.
func TestURLPasswordsAreMasked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sidecar.toml")
	for _, u := range []string{"http://admin:hunter2secret@127.0.0.1:1", "http://admin:hunter2secret@127.0.0.1:bad%zz"} {
		if err := os.WriteFile(path, []byte(routeTo(u, "")), 0o600); err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{{"-validate", "-config", path}, {"-config", path}} {
			out, err := exec.Command(sidecarBin, args...).CombinedOutput()
			if err == nil || strings.Contains(string(out), "hunter2secret") || !strings.Contains(string(out), "xxxxx@") {
				t.Errorf("sidecar %v with url %q (%v):\n%s", args, u, err, out)
			}
		}
	}
}

// A trailer section cannot smuggle fields into the head: a chunked body
// that ends at once with trailer fields is refused, and the trailers of a
// body with data are never forwarded.
func TestRequestTrailersCannotAddFields(t *testing.T) {
	wsgi := startWSGI(t)
	dir := t.TempDir()
	writeKeys(t, dir)
	cfg := strings.Replace(tiersConfig, "[tiers.anonymous]\nlimit = 3", "[tiers.anonymous]\nlimit = 100", 1)
	sc := startSidecarIn(t, dir, cfg+routeTo(wsgi, ""))
	const trailer = "X_Sidecar_Tier: premium\r\nX-Sidecar-Client: key:acme\r\nX_Real_IP: 6.6.6.6\r\nX-API-Key: forged\r\nUpgrade: websocket\r\n\r\n"
	before, _ := startCount(sc)
	resp := rawRequest(t, sc.Addr, "POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n"+trailer, 5*time.Second)
	if !strings.HasPrefix(resp, "HTTP/1.1 400") {
		t.Errorf("an empty chunked body with a trailer answered %q, want 400", resp)
	}
	if after, _ := startCount(sc); after != before {
		t.Errorf("the request reached the backend")
	}
	resp = rawRequest(t, sc.Addr, "POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n"+trailer, 5*time.Second)
	r, err := http.ReadResponse(bufio.NewReader(strings.NewReader(resp)), nil)
	if err != nil || r.StatusCode != 200 {
		t.Fatalf("a chunked body with data and a trailer: %v %q", err, resp)
	}
	var env map[string]string
	if err := json.NewDecoder(r.Body).Decode(&env); err != nil {
		t.Fatal(err)
	}
	if env["HTTP_X_SIDECAR_TIER"] != "anonymous" || env["HTTP_X_SIDECAR_CLIENT"] != "ip:127.0.0.1" || env["HTTP_X_REAL_IP"] != "" || env["HTTP_X_API_KEY"] != "" {
		t.Errorf("trailer fields reached the backend: %v", env)
	}
}

// Routes match the decoded, dot-resolved path while the target goes
// upstream as sent: a target whose raw form would match another route is
// refused, so that a request cannot be routed (and limited) by one path
// and served by another.
func TestAmbiguousPathsRefused(t *testing.T) {
	a := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "a "+r.RequestURI) })
	b := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "b "+r.RequestURI) })
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.a]
url = %q
[upstreams.b]
url = %q
[[routes]]
path_prefix = "/a/"
upstream = "a"
[[routes]]
path_prefix = "/b/"
upstream = "b"
`, a.url(), b.url()))
	for _, c := range []struct{ target, want string }{
		{"/a/..%2Fb/x", "400"},
		{"/b/../a/x", "400"},
		{"/a/%2e%2e/b/x", "400"},
		{"/a/./x", "a /a/./x"},
		{"/a/%7Ex?q=/b/", "a /a/%7Ex?q=/b/"},
		{"/a/x/../y", "a /a/x/../y"},
	} {
		if got := statusOrBody(t, sc.Addr, c.target); got != c.want {
			t.Errorf("GET %s: %q, want %q", c.target, got, c.want)
		}
	}
}

// Backslashes are path separators to WHATWG URL parsers (Node, browsers)
// and IIS, not to fasthttp on Linux: a target that picks another route
// when read that way is refused too.
func TestBackslashPathsRefused(t *testing.T) {
	sc := exemptHealthzBeforeAll(t)
	for _, c := range []struct{ target, want string }{
		{`/healthz/..\api/secret`, "400"},
		{`/healthz\..\api\secret`, "400"},
		{`/healthz/%2e%2e\api/x`, "400"},
		{`/healthz/..%5capi/x`, "400"},
		{`/healthz\x`, `a /healthz\x`},
		{`/api\x`, `b /api\x`},
	} {
		if got := statusOrBody(t, sc.Addr, c.target); got != c.want {
			t.Errorf("GET %s: %q, want %q", c.target, got, c.want)
		}
	}
}

// Tomcat, Jetty and Spring drop ";parameters" from each path segment
// before they resolve dot segments, so "/healthz/..;/api" is /api to them:
// a target that picks another route when read that way is refused. It
// went to the exempt route, unlimited, while the backend served /api.
func TestPathParameterPathsRefused(t *testing.T) {
	sc := exemptHealthzBeforeAll(t)
	for _, c := range []struct{ target, want string }{
		{"/healthz/..;/api/secret", "400"},
		{"/healthz/%2e%2e;/api/x", "400"},
		{"/healthz/.;/../api/x", "400"},
		{"/healthz/..%3b/api/x", "400"},
		{"/healthz/..;x=1/api/x", "400"},
		{"/healthz;v=1", "a /healthz;v=1"},
		{"/api;jsessionid=42/x", "b /api;jsessionid=42/x"},
	} {
		if got := statusOrBody(t, sc.Addr, c.target); got != c.want {
			t.Errorf("GET %s: %q, want %q", c.target, got, c.want)
		}
	}
}

// exemptHealthzBeforeAll runs a sidecar with a rate-limit-exempt route
// for /healthz to backend "a" before a route for everything to backend
// "b"; each backend answers its letter and the target it got.
func exemptHealthzBeforeAll(t *testing.T) *sidecar {
	a := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "a "+r.RequestURI) })
	b := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "b "+r.RequestURI) })
	sc := startSidecar(t, fmt.Sprintf(`
[upstreams.a]
url = %q
[upstreams.b]
url = %q
[[routes]]
path_prefix = "/healthz"
rate_limit_exempt = true
upstream = "a"
[[routes]]
path_prefix = "/"
upstream = "b"
`, a.url(), b.url()))
	return sc
}

// statusOrBody sends GET target on a new connection and returns the body
// of a 200, or the status code as text.
func statusOrBody(t *testing.T, addr, target string) string {
	t.Helper()
	resp := rawRequest(t, addr, "GET "+target+" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5*time.Second)
	r, err := http.ReadResponse(bufio.NewReader(strings.NewReader(resp)), nil)
	if err != nil {
		t.Fatalf("%s: %v", target, err)
	}
	body, _ := io.ReadAll(r.Body)
	if r.StatusCode != 200 {
		return strconv.Itoa(r.StatusCode)
	}
	return string(body)
}

// An upgrade request's body bytes and the tunnel's bytes both count in
// sidecar_request_body_bytes_total.
func TestUpgradeWithBodyCountsAllBytes(t *testing.T) {
	upstream := rawBackend(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		if _, err := readRequestHead(br); err != nil {
			return
		}
		body := make([]byte, 5)
		if _, err := io.ReadFull(br, body); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		io.Copy(io.Discard, br)
	})
	sc := startSidecar(t, routeTo(upstream, ""))
	c, err := net.Dial("tcp", sc.Addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello")
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 200)
	if n, _ := c.Read(b); !strings.HasPrefix(string(b[:n]), "HTTP/1.1 101") {
		t.Fatalf("upgrade answered %q", b[:n])
	}
	io.WriteString(c, "abc")
	time.Sleep(100 * time.Millisecond)
	c.Close()
	deadline := time.Now().Add(3 * time.Second)
	for sc.metric(`sidecar_request_body_bytes_total{route="app"}`) < 8 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if v := sc.metric(`sidecar_request_body_bytes_total{route="app"}`); v != 8 {
		t.Errorf("body bytes counted %v, want 8 (5 of the body, 3 through the tunnel)", v)
	}
}
