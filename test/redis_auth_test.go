package test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/redistest"
)

// The sidecar against a Redis that wants credentials and TLS, as managed
// Redis services do: with the right ones the limit is kept in Redis; with
// wrong ones (a bad password, a server certificate from another CA) clients
// still get answers, decided locally, and the operator is told why.
func TestRedisCredentialsAndTLS(t *testing.T) {
	pki := newPKI(t)
	pki.issue("redis", "localhost", 2, false)
	other := newPKI(t) // a CA that did not sign the server's certificate
	rs := redistest.StartProtected(t, redistest.Protected{
		Password: "default-secret", User: "sidecar", UserPassword: "user-secret",
		TLSCert: pki.dir + "/redis.pem", TLSKey: pki.dir + "/redis.key", TLSCA: pki.dir + "/ca.pem",
	})
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	const limit = 3
	env := []string{"T_REDIS_USER=sidecar", "T_REDIS_PASSWORD=user-secret", "T_REDIS_WRONG=not-the-password"}

	// start runs a sidecar with [redis] extra, asks limit+2 times as one
	// client, and returns it with the statuses.
	start := func(t *testing.T, redis string) (*sidecar, []int) {
		// Each subtest counts under its own key prefix: the client is the
		// same address every time.
		redis += fmt.Sprintf("\nkey_prefix = %q", strings.NewReplacer(" ", "_", "/", "_").Replace(t.Name()))
		// The first decision dials, shakes hands and authenticates: under
		// -race on a loaded machine that can outlast the 50 ms default, and
		// a timed-out decision is made locally. This test is about
		// credentials, not latency.
		cfg := fmt.Sprintf("[rate_limit]\nstore = \"redis\"\nstore_timeout = \"2s\"\n[redis]\n%s\n[tiers.anonymous]\nlimit = %d\nwindow = \"1m\"\n",
			redis, limit) + routeTo(be.url(), "")
		sc := &sidecar{t: t, logs: &syncBuffer{}, waited: make(chan struct{})}
		addrs := freeAddrs(t, 2)
		sc.Addr, sc.Admin = addrs[0], addrs[1]
		sc.Config = t.TempDir() + "/sidecar.toml"
		sc.writeConfig(cfg)
		sc.run(env)
		var statuses []int
		for i := 0; i < limit+2; i++ {
			resp, err := http.Get(sc.url("/"))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			statuses = append(statuses, resp.StatusCode)
		}
		return sc, statuses
	}
	storeDecisions := func(sc *sidecar, result string) float64 {
		return sc.metric(fmt.Sprintf(`sidecar_ratelimit_decisions_total{route="app",tier="anonymous",result=%q,source="store"}`, result))
	}
	wantKeptInRedis := func(t *testing.T, sc *sidecar, statuses []int) {
		want := []int{200, 200, 200, 429, 429}
		if fmt.Sprint(statuses) != fmt.Sprint(want) {
			t.Fatalf("statuses %v, want %v\n%s", statuses, want, sc.logs.String())
		}
		// The second denial may come from the deny cache (the first one's
		// Retry-After, remembered): Redis decided at least the first.
		if a, d := storeDecisions(sc, "allowed"), storeDecisions(sc, "denied"); a != limit || d < 1 {
			t.Errorf("decided by Redis: %v allowed, %v denied; want %d and ≥ 1", a, d, limit)
		}
		if v := sc.metric(`sidecar_ratelimit_store_errors_total`); v != 0 {
			t.Errorf("%v store errors", v)
		}
	}
	// wantLocal: Redis refused us; every request is answered (the limit
	// is kept in memory meanwhile) and the reason is in the log.
	wantLocal := func(t *testing.T, sc *sidecar, statuses []int, reason string) {
		for _, s := range statuses {
			if s >= 500 {
				t.Fatalf("statuses %v: a 5xx for a Redis that refuses us", statuses)
			}
		}
		if v := storeDecisions(sc, "allowed"); v > 0 {
			t.Errorf("%v decisions by a Redis that should have refused us", v)
		}
		if v := sc.metric(`sidecar_ratelimit_store_errors_total`); v < 1 {
			t.Errorf("store errors %v, want ≥ 1", v)
		}
		deadline := time.Now().Add(3 * time.Second)
		for !strings.Contains(sc.logs.String(), reason) {
			if time.Now().After(deadline) {
				t.Fatalf("the log does not say %q:\n%s", reason, sc.logs.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	t.Run("ACL user", func(t *testing.T) {
		sc, statuses := start(t, fmt.Sprintf("addrs = [%q]\nusername_env = \"T_REDIS_USER\"\npassword_env = \"T_REDIS_PASSWORD\"", rs.Addr))
		wantKeptInRedis(t, sc, statuses)
		keys, err := redistest.DoAs(rs.Addr, "sidecar", "user-secret", "KEYS", "*rl:*")
		if err != nil || len(keys.([]any)) == 0 {
			t.Errorf("no limiter key in Redis: %v %v", keys, err)
		}
	})
	t.Run("wrong password", func(t *testing.T) {
		sc, statuses := start(t, fmt.Sprintf("addrs = [%q]\nusername_env = \"T_REDIS_USER\"\npassword_env = \"T_REDIS_WRONG\"", rs.Addr))
		wantLocal(t, sc, statuses, "WRONGPASS")
	})
	t.Run("TLS", func(t *testing.T) {
		sc, statuses := start(t, fmt.Sprintf("addrs = [%q]\nusername_env = \"T_REDIS_USER\"\npassword_env = \"T_REDIS_PASSWORD\"\ntls = true\ntls_ca_file = %q\ntls_server_name = \"localhost\"",
			rs.TLSAddr, pki.dir+"/ca.pem"))
		wantKeptInRedis(t, sc, statuses)
	})
	t.Run("TLS with a server certificate from another CA", func(t *testing.T) {
		sc, statuses := start(t, fmt.Sprintf("addrs = [%q]\nusername_env = \"T_REDIS_USER\"\npassword_env = \"T_REDIS_PASSWORD\"\ntls = true\ntls_ca_file = %q\ntls_server_name = \"localhost\"",
			rs.TLSAddr, other.dir+"/ca.pem"))
		wantLocal(t, sc, statuses, "certificate")
	})
}
