package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
	"github.com/sidecar-proxy/sidecar/policy"
)

// get sends one GET with headers and returns the response (body read).
func get(t *testing.T, url string, hdr map[string]string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

func writeKeys(t *testing.T, dir string) {
	t.Helper()
	keys := fmt.Sprintf(`[[keys]]
sha256 = %q
tier = "premium"
client = "acme"

[[keys]]
sha256 = %q
tier = "premium"
client = "former"
revoked = true
`, policy.HashKey("acme-secret-key"), policy.HashKey("revoked-key"))
	if err := os.WriteFile(filepath.Join(dir, "keys.toml"), []byte(keys), 0o600); err != nil {
		t.Fatal(err)
	}
}

const tiersConfig = `
[identity]
api_keys_file = "keys.toml"

[tiers.anonymous]
limit = 3
window = "10s"

[tiers.premium]
limit = 10
window = "10s"
`

func TestTierLimitsAnd429(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", r.Header.Get("X-Sidecar-Client"), r.Header.Get("X-Sidecar-Tier"))
	})
	cfg := tiersConfig + routeTo(be.url(), "")
	dir := t.TempDir()
	writeKeys(t, dir)
	sc := startSidecarIn(t, dir, cfg)

	// Anonymous: 3 per 10 s, whatever tier header the client claims.
	for i := 0; i < 3; i++ {
		resp, body := get(t, sc.url("/"), map[string]string{"X-Sidecar-Tier": "premium", "X-Sidecar-Client": "root"})
		if resp.StatusCode != 200 || body != "ip:127.0.0.1 anonymous" {
			t.Fatalf("anonymous request %d: %d %q", i, resp.StatusCode, body)
		}
		if p := resp.Header.Get("RateLimit-Policy"); p != `"anonymous";q=3;w=10` {
			t.Errorf("RateLimit-Policy %q", p)
		}
		if r := resp.Header.Get("RateLimit"); !strings.HasPrefix(r, fmt.Sprintf(`"anonymous";r=%d;t=`, 2-i)) {
			t.Errorf("RateLimit %q", r)
		}
		if resp.Header.Get("X-RateLimit-Remaining") != strconv.Itoa(2-i) {
			t.Errorf("X-RateLimit-Remaining %q", resp.Header.Get("X-RateLimit-Remaining"))
		}
	}
	before, _ := be.counts()
	resp, _ := get(t, sc.url("/"), nil)
	if resp.StatusCode != 429 {
		t.Fatalf("4th anonymous request: %d", resp.StatusCode)
	}
	ra, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
	// The oldest 100 ms sub-window counts whole until it has fully left
	// the window: a wait of up to window + 100 ms, rounded up.
	if ra < 1 || ra > 11 || !strings.HasPrefix(resp.Header.Get("RateLimit"), `"anonymous";r=0;t=`) {
		t.Errorf("429 headers: Retry-After %q RateLimit %q", resp.Header.Get("Retry-After"), resp.Header.Get("RateLimit"))
	}
	if after, _ := be.counts(); after != before {
		t.Errorf("a denied request reached the backend")
	}

	// Premium by API key: its own 10.
	for i := 0; i < 10; i++ {
		resp, body := get(t, sc.url("/"), map[string]string{"X-API-Key": "acme-secret-key"})
		if resp.StatusCode != 200 || body != "key:acme premium" {
			t.Fatalf("premium request %d: %d %q", i, resp.StatusCode, body)
		}
	}
	if resp, _ := get(t, sc.url("/"), map[string]string{"X-API-Key": "acme-secret-key"}); resp.StatusCode != 429 {
		t.Errorf("11th premium request: %d", resp.StatusCode)
	}
	for _, key := range []string{"wrong-key", "revoked-key"} {
		if resp, _ := get(t, sc.url("/"), map[string]string{"X-API-Key": key}); resp.StatusCode != 401 {
			t.Errorf("key %q: %d, want 401", key, resp.StatusCode)
		}
	}
	if v := sc.metric(`sidecar_ratelimit_decisions_total{route="app",tier="anonymous",result="denied",source="memory"}`); v != 1 {
		t.Errorf("denials counted %v", v)
	}
}

// startSidecarIn is startSidecar with the config file in dir (for files
// the config names relative to itself).
func startSidecarIn(t *testing.T, dir, cfg string, env ...string) *sidecar {
	t.Helper()
	addrs := freeAddrs(t, 2)
	s := &sidecar{t: t, Addr: addrs[0], Admin: addrs[1], logs: &syncBuffer{}, waited: make(chan struct{})}
	s.Config = filepath.Join(dir, "sidecar.toml")
	s.writeConfig(cfg)
	return s.run(env)
}

func TestJWTIdentity(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", r.Header.Get("X-Sidecar-Client"), r.Header.Get("X-Sidecar-Tier"))
	})
	secret := "0123456789abcdef0123456789abcdef-test-secret"
	cfg := `
[identity.jwt]
algorithm = "HS256"
secret_env = "SIDECAR_TEST_JWT"
issuer = "test-issuer"

[tiers.gold]
limit = 100
window = "1m"
[tiers.authenticated]
limit = 100
window = "1m"
[tiers.anonymous]
limit = 100
window = "1m"
` + routeTo(be.url(), "")
	sc := startSidecarIn(t, t.TempDir(), cfg, "SIDECAR_TEST_JWT="+secret)
	sign := func(method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
		tok, err := jwt.NewWithClaims(method, claims).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	now := time.Now()
	good := jwt.MapClaims{"sub": "alice", "tier": "gold", "iss": "test-issuer", "exp": now.Add(time.Hour).Unix()}
	cases := []struct {
		name, token string
		status      int
		body        string
	}{
		{"valid", sign(jwt.SigningMethodHS256, []byte(secret), good), 200, "jwt:alice gold"},
		{"no tier claim", sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "bob", "iss": "test-issuer", "exp": now.Add(time.Hour).Unix()}), 200, "jwt:bob authenticated"},
		{"no exp", sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "bob", "iss": "test-issuer"}), 401, ""},
		{"expired", sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "a", "iss": "test-issuer", "exp": now.Add(-time.Minute).Unix()}), 401, ""},
		{"not yet valid", sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "a", "iss": "test-issuer", "nbf": now.Add(time.Hour).Unix()}), 401, ""},
		{"bad signature", sign(jwt.SigningMethodHS256, []byte("another-secret-another-secret-xx"), good), 401, ""},
		{"other algorithm", sign(jwt.SigningMethodHS384, []byte(secret), good), 401, ""},
		{"alg none", sign(jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, good), 401, ""},
		{"wrong issuer", sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "a", "iss": "evil"}), 401, ""},
		{"garbage", "not.a.token", 401, ""},
	}
	for _, c := range cases {
		resp, body := get(t, sc.url("/"), map[string]string{"Authorization": "Bearer " + c.token})
		if resp.StatusCode != c.status || (c.body != "" && body != c.body) {
			t.Errorf("%s: %d %q, want %d %q", c.name, resp.StatusCode, body, c.status, c.body)
		}
	}
}

func TestSpoofedForwardedForIgnored(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Header.Get("X-Sidecar-Client")) })
	cfg := "[tiers.anonymous]\nlimit = 2\nwindow = \"1m\"\n" + routeTo(be.url(), "")
	sc := startSidecar(t, cfg)
	for i := 0; i < 5; i++ {
		resp, body := get(t, sc.url("/"), map[string]string{"X-Forwarded-For": fmt.Sprintf("203.0.113.%d", i)})
		if i < 2 && (resp.StatusCode != 200 || body != "ip:127.0.0.1") {
			t.Errorf("request %d: %d %q", i, resp.StatusCode, body)
		}
		if i >= 2 && resp.StatusCode != 429 {
			t.Errorf("request %d with a made-up X-Forwarded-For escaped the limit: %d", i, resp.StatusCode)
		}
	}
	// Behind a trusted proxy, the right-most untrusted address counts.
	sc2 := startSidecar(t, "[server]\ntrusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]\n"+cfg)
	for i, c := range []struct{ xff, want string }{
		{"198.51.100.1, 10.1.1.1", "ip:198.51.100.1"},
		{"6.6.6.6, 198.51.100.2", "ip:198.51.100.2"},
		{"2001:db8:1:2:3:4:5:6", "ip:2001:db8:1:2::/64"},
	} {
		if _, body := get(t, sc2.url("/"), map[string]string{"X-Forwarded-For": c.xff}); body != c.want {
			t.Errorf("case %d: X-Forwarded-For %q identified as %q, want %q", i, c.xff, body, c.want)
		}
	}
}

func TestExpectContinueDeniedWithoutReadingTheBody(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.Copy(io.Discard, r.Body) })
	dir := t.TempDir()
	writeKeys(t, dir)
	sc := startSidecarIn(t, dir, "[identity]\napi_keys_file = \"keys.toml\"\n[tiers.anonymous]\nlimit = 1\nwindow = \"1m\"\n[tiers.premium]\nlimit = 1\nwindow = \"1m\"\n"+routeTo(be.url(), ""))
	send := func(extra string) string {
		c, err := net.Dial("tcp", sc.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		io.WriteString(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"+extra+"\r\n")
		line, _ := bufio.NewReader(c).ReadString('\n')
		if strings.HasPrefix(line, "HTTP/1.1 100") {
			io.WriteString(c, "hello")
		}
		return line
	}
	if line := send(""); !strings.HasPrefix(line, "HTTP/1.1 100") {
		t.Errorf("first request: %q, want 100 Continue", line)
	}
	if line := send(""); !strings.HasPrefix(line, "HTTP/1.1 429") {
		t.Errorf("over the limit: %q, want 429 before any body", line)
	}
	if line := send("X-API-Key: nope\r\n"); !strings.HasPrefix(line, "HTTP/1.1 401") {
		t.Errorf("unknown key: %q, want 401 before any body", line)
	}
}

func TestShadowModeAndRouteOverrides(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, fmt.Sprintf(`
[tiers.anonymous]
limit = 2
window = "1m"
mode = "shadow"

[upstreams.app]
url = %q

[[routes]]
name = "health"
path_prefix = "/healthz"
upstream = "app"
rate_limit_exempt = true

[[routes]]
name = "app"
upstream = "app"
`, be.url()))
	for i := 0; i < 5; i++ {
		resp, _ := get(t, sc.url("/x"), nil)
		if resp.StatusCode != 200 || resp.Header.Get("RateLimit") == "" {
			t.Errorf("shadow request %d: %d, RateLimit %q", i, resp.StatusCode, resp.Header.Get("RateLimit"))
		}
		if i >= 2 && resp.Header.Get("Retry-After") != "" {
			t.Errorf("shadow mode sent Retry-After")
		}
	}
	if v := sc.metric(`sidecar_ratelimit_decisions_total{route="app",tier="anonymous",result="shadow_denied",source="memory"}`); v != 3 {
		t.Errorf("would-have-denied counted %v, want 3", v)
	}
	if !strings.Contains(sc.logs.String(), "would deny") {
		t.Errorf("shadow denial not logged")
	}
	for i := 0; i < 5; i++ {
		resp, _ := get(t, sc.url("/healthz"), nil)
		if resp.StatusCode != 200 || resp.Header.Get("RateLimit") != "" {
			t.Errorf("exempt route limited: %d %q", resp.StatusCode, resp.Header.Get("RateLimit"))
		}
	}
}

// Three replicas share one Redis: together they admit the limit, not
// three times it.
func TestRedisSharedAcrossReplicas(t *testing.T) {
	rs := redistest.Start(t)
	var admitted []time.Time
	var mu sync.Mutex
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		admitted = append(admitted, time.Now())
		mu.Unlock()
	})
	const limit, window = 40, 2 * time.Second
	cfg := fmt.Sprintf("[rate_limit]\nstore = \"redis\"\n[redis]\naddrs = [%q]\n[tiers.anonymous]\nlimit = %d\nwindow = \"%s\"\n",
		rs.Addr, limit, window) + routeTo(be.url(), "")
	var replicas []*sidecar
	for i := 0; i < 3; i++ {
		replicas = append(replicas, startSidecar(t, cfg))
	}
	// A client asking at about twice its limit for 3 windows, spread over
	// the replicas.
	start := time.Now()
	var n, ok, fivexx atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 6; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < 3*window {
				i := n.Add(1)
				resp, err := http.Get(replicas[i%3].url("/"))
				if err != nil {
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				switch {
				case resp.StatusCode == 200:
					ok.Add(1)
				case resp.StatusCode >= 500:
					fivexx.Add(1)
				}
				time.Sleep(window / limit * 3)
			}
		}()
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	// The backend's clock is not Redis': allow 50 ms of measurement
	// jitter on the window (the exact check with injected time is in
	// limiter's tests).
	most := maxInWindow(admitted, window-50*time.Millisecond)
	perWindow := float64(ok.Load()) / (float64(time.Since(start)) / float64(window))
	t.Logf("3 replicas, %d requests: %d admitted (%.1f per window of limit %d), most in any window %d",
		n.Load(), ok.Load(), perWindow, limit, most)
	if most > limit {
		t.Errorf("%d admitted within one window across replicas, limit %d", most, limit)
	}
	if perWindow < 0.9*limit {
		t.Errorf("a client asking for twice its limit got %.1f per window of %d", perWindow, limit)
	}
	if fivexx.Load() != 0 {
		t.Errorf("%d 5xx", fivexx.Load())
	}
}

func maxInWindow(times []time.Time, w time.Duration) int {
	best, lo := 0, 0
	for hi := range times {
		for times[hi].Sub(times[lo]) >= w {
			lo++
		}
		best = max(best, hi-lo+1)
	}
	return best
}

// Redis killed, frozen and restarted under load: no 5xx, ever.
func TestRedisOutageUnderLoadNoFiveXX(t *testing.T) {
	rs := redistest.Start(t)
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, fmt.Sprintf("[rate_limit]\nstore = \"redis\"\ncooldown = \"1s\"\n[redis]\naddrs = [%q]\n[tiers.anonymous]\nlimit = 1000000\nwindow = \"1m\"\n", rs.Addr)+routeTo(be.url(), ""))
	stop := make(chan struct{})
	var total, fivexx, other atomic.Int64
	var slowest atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Timeout: 5 * time.Second}
			for {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				resp, err := client.Get(sc.url("/"))
				if err != nil {
					other.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				total.Add(1)
				if resp.StatusCode >= 500 {
					fivexx.Add(1)
				}
				if d := int64(time.Since(start)); d > slowest.Load() {
					slowest.Store(d)
				}
			}
		}()
	}
	step := func(name string, f func()) {
		before := total.Load()
		f()
		time.Sleep(1500 * time.Millisecond)
		t.Logf("%s: %d requests in 1.5 s", name, total.Load()-before)
	}
	step("steady", func() {})
	step("redis killed", rs.Kill)
	if resp, _ := http.Get("http://" + sc.Admin + "/readyz"); resp == nil || resp.StatusCode != 200 {
		t.Errorf("/readyz not ready while Redis is down")
	}
	step("redis restarted", rs.Restart)
	step("redis frozen", rs.Freeze)
	step("redis thawed", rs.Thaw)
	close(stop)
	wg.Wait()
	if fivexx.Load() != 0 || other.Load() != 0 {
		t.Errorf("%d requests: %d 5xx, %d failed", total.Load(), fivexx.Load(), other.Load())
	}
	if v := sc.metric(`sidecar_ratelimit_store_switches_total{to="store"}`); v < 2 {
		t.Errorf("returned to Redis %v times after 2 outages", v)
	}
	if v := sc.metric(`sidecar_ratelimit_decisions_total{route="app",tier="anonymous",result="allowed",source="store"}`); v < 1 {
		t.Errorf("no decisions from Redis")
	}
	t.Logf("%d requests, 0 5xx; slowest %v", total.Load(), time.Duration(slowest.Load()))
}

func TestKeysFileReloadsAndRouteLimits(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Header.Get("X-Sidecar-Client")) })
	dir := t.TempDir()
	writeKeys(t, dir)
	sc := startSidecarIn(t, dir, fmt.Sprintf(`
[identity]
api_keys_file = "keys.toml"
[tiers.anonymous]
limit = 100
window = "1m"
[tiers.premium]
limit = 100
window = "1m"
[upstreams.app]
url = %q
[[routes]]
name = "search"
path_prefix = "/search"
upstream = "app"
limits = { anonymous = 2 }
[[routes]]
name = "app"
upstream = "app"
`, be.url()))
	// The route's own limit, counted apart from the client's other requests.
	for i := 0; i < 3; i++ {
		resp, _ := get(t, sc.url("/search"), nil)
		if want := map[bool]int{true: 200, false: 429}[i < 2]; resp.StatusCode != want {
			t.Errorf("/search request %d: %d, want %d", i, resp.StatusCode, want)
		}
	}
	if resp, _ := get(t, sc.url("/other"), nil); resp.StatusCode != 200 {
		t.Errorf("another route shares the search route's count: %d", resp.StatusCode)
	}
	// A new key works once the keys file changes: no signal, no restart.
	if resp, _ := get(t, sc.url("/"), map[string]string{"X-API-Key": "new-key"}); resp.StatusCode != 401 {
		t.Fatalf("unknown key: %d", resp.StatusCode)
	}
	f, err := os.OpenFile(filepath.Join(dir, "keys.toml"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "\n[[keys]]\nsha256 = %q\ntier = \"premium\"\nclient = \"newcomer\"\n", policy.HashKey("new-key"))
	f.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, body := get(t, sc.url("/"), map[string]string{"X-API-Key": "new-key"})
		if resp.StatusCode == 200 && body == "key:newcomer" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("keys file change not picked up: %d %q", resp.StatusCode, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// RateLimit's t never exceeds the policy's w, and a GCRA tier's q is its
// limit per window, not its burst.
func TestRateLimitFieldsAgreeWithThePolicy(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, `
[tiers.anonymous]
limit = 1
window = "2s"
[tiers.gcra]
limit = 10
window = "10s"
burst = 3
algorithm = "gcra"
`+routeTo(be.url(), ""))
	field := func(v, name string) int {
		for part := range strings.SplitSeq(v, ";") {
			if val, ok := strings.CutPrefix(part, name+"="); ok {
				n, _ := strconv.Atoi(val)
				return n
			}
		}
		return -1
	}
	for i := range 3 {
		resp, _ := get(t, sc.url("/"), nil)
		w, tt := field(resp.Header.Get("RateLimit-Policy"), "w"), field(resp.Header.Get("RateLimit"), "t")
		if w != 2 || tt < 0 || tt > w {
			t.Errorf("request %d (%d): RateLimit %q with RateLimit-Policy %q: t must be at most w",
				i, resp.StatusCode, resp.Header.Get("RateLimit"), resp.Header.Get("RateLimit-Policy"))
		}
	}
	dir := t.TempDir()
	keys := fmt.Sprintf("[[keys]]\nsha256 = %q\ntier = \"gcra\"\nclient = \"g\"\n", policy.HashKey("gcra-key"))
	if err := os.WriteFile(filepath.Join(dir, "keys.toml"), []byte(keys), 0o600); err != nil {
		t.Fatal(err)
	}
	sc2 := startSidecarIn(t, dir, `
[identity]
api_keys_file = "keys.toml"
[tiers.anonymous]
limit = 1
window = "2s"
[tiers.gcra]
limit = 10
window = "10s"
burst = 3
algorithm = "gcra"
`+routeTo(be.url(), ""))
	resp, _ := get(t, sc2.url("/"), map[string]string{"X-API-Key": "gcra-key"})
	if p := resp.Header.Get("RateLimit-Policy"); p != `"gcra";q=10;w=10` {
		t.Errorf("GCRA tier: RateLimit-Policy %q, want q=10 (the limit per window, not the burst)", p)
	}
}
