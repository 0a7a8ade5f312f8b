package policy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/overload"
)

const minimal = `
[upstreams.app]
url = "http://127.0.0.1:3000"

[[routes]]
upstream = "app"
`

func TestDefaults(t *testing.T) {
	s, err := Parse("t.toml", []byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	srv := s.Server
	if srv.Listen != DefaultListen || srv.AdminListen != DefaultAdminListen ||
		srv.HeaderTimeout != 10*time.Second || srv.IdleTimeout != 60*time.Second ||
		srv.MaxHeaderBytes != 16<<10 || srv.MaxBodyBytes != 100<<20 ||
		srv.DrainTimeout != 30*time.Second || srv.DrainDelay != 0 ||
		srv.MaxConnections != 10000 || srv.MaxConnectionsPerIP != 0 ||
		len(srv.TrustedProxies) != 0 || srv.RequestIDHeader != "X-Request-Id" {
		t.Errorf("server defaults: %+v", srv)
	}
	u := s.Upstreams["app"]
	if u.ConnectTimeout != time.Second || u.ResponseTimeout != 15*time.Second || u.MaxConnections != 1024 ||
		u.MaxIdleConnections != 128 || u.RewriteHost || len(u.Endpoints) != 1 || u.Endpoints[0].Addr != "127.0.0.1:3000" {
		t.Errorf("upstream defaults: %+v", u)
	}
	r := s.Routes[0]
	if r.Name != "route0" || r.PathPrefix != "/" || r.Host != "" || r.Methods != nil {
		t.Errorf("route defaults: %+v", r)
	}
	rl := s.RateLimit
	if rl.Store != StoreMemory || rl.Lease || rl.LeaseOvershoot != 0.01 || rl.LeaseDuration != time.Second {
		t.Errorf("rate_limit defaults: %+v", rl)
	}
	if b := u.Breaker; b == nil || b.ErrorPercent != 50 || b.VolumeThreshold != 20 || b.ConsecutiveFailures != 0 {
		t.Errorf("breaker defaults: %+v", b)
	}
	s, err = Parse("t.toml", []byte(minimal+"[upstreams.app.breaker]\nconsecutive_failures = 5\n"))
	if err != nil {
		t.Fatal(err)
	}
	if b := s.Upstreams["app"].Breaker; b.ConsecutiveFailures != 5 {
		t.Errorf("consecutive_failures = 5 parsed as %d", b.ConsecutiveFailures)
	}
}

// Quota leases: on with Redis, tuned; the tuning keys are accepted with
// leases off, so that one line turns them off.
func TestLeaseSettings(t *testing.T) {
	s, err := Parse("t.toml", []byte("[rate_limit]\nstore = \"redis\"\nlease = true\nlease_overshoot = 0.05\nlease_duration = \"250ms\"\n"+
		"[redis]\naddrs = [\"127.0.0.1:6379\"]\n"+minimal))
	if err != nil {
		t.Fatal(err)
	}
	if rl := s.RateLimit; !rl.Lease || rl.LeaseOvershoot != 0.05 || rl.LeaseDuration != 250*time.Millisecond {
		t.Errorf("lease settings: %+v", rl)
	}
	s, err = Parse("t.toml", []byte("[rate_limit]\nlease = false\nlease_overshoot = 0.2\n"+minimal))
	if err != nil {
		t.Fatal(err)
	}
	if rl := s.RateLimit; rl.Lease || rl.LeaseOvershoot != 0.2 {
		t.Errorf("leases off: %+v", rl)
	}
}

// f-test: each bad document must fail with a problem naming key and line.
func TestProblems(t *testing.T) {
	f := func(doc, wantKey string, wantLine int, wantMsg string) {
		t.Helper()
		_, err := Parse("bad.toml", []byte(doc))
		if err == nil {
			t.Fatalf("no error for:\n%s", doc)
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("error does not wrap ErrInvalid: %v", err)
		}
		var pe *Error
		if !errors.As(err, &pe) {
			t.Fatalf("error is %T", err)
		}
		for _, p := range pe.Problems {
			if p.Key == wantKey && p.Line == wantLine && strings.Contains(p.Msg, wantMsg) {
				return
			}
		}
		t.Errorf("want problem %s at line %d containing %q, got:\n%v", wantKey, wantLine, wantMsg, err)
	}
	f("[server]\nlisten = \"nope\"\n"+minimal, "server.listen", 2, "want host:port")
	f("[server]\nlisten = \"127.0.0.1:9090\"\n"+minimal, "server.admin_listen", 1, "must differ")
	f("[server]\nidle_timeout = \"0s\"\n"+minimal, "server.idle_timeout", 2, "greater than zero")
	f("[server]\ndrain_delay = \"-1s\"\n"+minimal, "server.drain_delay", 2, "must not be negative (0 is allowed)")
	f("[server]\nidle_timeout = \"1 minute\"\n"+minimal, "server.idle_timeout", 2, "invalid duration")
	// A duplicate key: go-toml names it without its table.
	f("[server]\nh2c = true\nh2c = false\n"+minimal, "server.h2c", 3, "already defined")
	// A number for a duration: go-toml gives no position for it.
	f("[server]\nlimit = 5\nidle_timeout = 5\n"+minimal, "server.idle_timeout", 3, `such as "5s"`)
	f(minimal+"[upstreams.app.breaker]\nsleep_window = 3.5\n", "upstreams.app.breaker.sleep_window", strings.Count(minimal, "\n")+2, "not 3.5")
	f(minimal+"[tiers.free]\nlimit = 1\nwindow = true\n", "tiers.free.window", strings.Count(minimal, "\n")+3, "not true")
	f("[server]\nmax_header_bytes = 10\n"+minimal, "server.max_header_bytes", 2, "between")
	f("[server]\nmax_body_bytes = -1\n"+minimal, "server.max_body_bytes", 2, "unlimited")
	f("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"bogus\"]\n"+minimal, "server.trusted_proxies[1]", 2, "CIDR")
	f("[server]\nrequest_id_header = \"X Id\"\n"+minimal, "server.request_id_header", 2, "header name")
	f("[server]\nlisen = \"x\"\n"+minimal, "server.lisen", 2, "unknown key")
	// Header roles: distinct, and none a field the sidecar reads or rewrites.
	f("[server]\nrequest_id_header = \"x_api_key\"\n"+minimal, "server.request_id_header", 2, "also identity.api_key_header")
	f("[identity]\nclient_header = \"Host\"\n"+minimal, "identity.client_header", 2, "reads or rewrites")
	f("[server]\nrequest_id_header = \"Retry-After\"\n"+minimal, "server.request_id_header", 2, "reads or rewrites")
	f("[identity]\ntier_header = \"x_forwarded_for\"\n"+minimal, "identity.tier_header", 2, "reads or rewrites")
	t.Setenv("POLICY_TEST_SECRET", "0123456789abcdef0123456789abcdef")
	f("[identity]\napi_key_header = \"Authorization\"\n[identity.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"POLICY_TEST_SECRET\"\n"+minimal,
		"identity.api_key_header", 2, "reads or rewrites")
	f("[upstreams.app]\nurl = \"http://a:1\"\nurls = [\"http://b:1\"]\n[[routes]]\nupstream = \"app\"\n", "upstreams.app.urls", 3, "not both")
	f("[upstreams.app]\nconnect_timeout = \"1s\"\n[[routes]]\nupstream = \"app\"\n", "upstreams.app", 1, "url (or urls) is required")
	f("[upstreams.app]\nurl = \"ftp://a\"\n[[routes]]\nupstream = \"app\"\n", "upstreams.app.url", 2, "scheme must be http or https")
	f("[upstreams.app]\nurl = \"http://a\"\nca_file = \"ca.pem\"\n[[routes]]\nupstream = \"app\"\n", "upstreams.app", 1, "https endpoints only")
	f("[server.tls]\ncert_file = \"nope.pem\"\nkey_file = \"nope.key\"\n"+minimal, "server.tls.cert_file", 2, "no such file")
	f("[server.tls]\ncert_file = \"a\"\n"+minimal, "server.tls", 1, "required")
	f("[upstreams.app]\nurl = \"http://a:1/base\"\n[[routes]]\nupstream = \"app\"\n", "upstreams.app.url", 2, "only scheme://host:port")
	f("[upstreams.app]\nurls = [\"http://a:1\", \"http://b:99999\"]\n[[routes]]\nupstream = \"app\"\n", "upstreams.app.urls[1]", 2, "invalid port")
	f("[upstreams.\"bad name\"]\nurl = \"http://a:1\"\n[[routes]]\nupstream = \"bad name\"\n", "upstreams.bad name", 1, "upstream names")
	f(minimal+"[[routes]]\nupstream = \"nope\"\n", "routes[1].upstream", 8, "unknown upstream")
	f(minimal+"[[routes]]\npath_prefix = \"api\"\nupstream = \"app\"\n", "routes[1].path_prefix", 8, "start with '/'")
	f(minimal+"[[routes]]\nmethods = [\"get\"]\nupstream = \"app\"\n", "routes[1].methods[0]", 8, "upper-case")
	f(minimal+"[[routes]]\nhost = \"bad host\"\nupstream = \"app\"\n", "routes[1].host", 8, "invalid host")
	f(minimal+"[[routes]]\npath_prefix = \"/x\"\n", "routes[1]", 7, "upstream is required")
	f("[upstreams.app]\nurl = \"http://a:1\"\n[[routes]]\nname = \"r\"\nupstream = \"app\"\n[[routes]]\nname = \"r\"\nupstream = \"app\"\n", "routes[1].name", 7, "duplicate")
	f("[upstreams.app]\nurl = \"http://a:1\"\n", "routes", 0, "at least one")
	f("[upstreams.app]\nurl = \"http://a:1\"\nprotocol = \"h3\"\n[[routes]]\nupstream = \"app\"\n", "upstreams.app.protocol", 3, "want one of")
	f("[upstreams.app]\nurl = \"https://a:1\"\nprotocol = \"h2c\"\n[[routes]]\nupstream = \"app\"\n", "upstreams.app.protocol", 3, "use protocol = \"h2\"")
	f("[upstreams.app]\nurl = \"http://a:1\"\nprotocol = \"h2\"\n[[routes]]\nupstream = \"app\"\n", "upstreams.app.protocol", 3, "use protocol = \"h2c\"")
	f("[[routes]]\nupstream = \"x\"\n", "upstreams", 0, "at least one")
	f(minimal+"[upstreams.app.breaker]\nconsecutive_failures = -1\n", "upstreams.app.breaker.consecutive_failures", 8, "between 0 and")
	f("[server\n", "", 1, "")

	// [redis]: modes, credentials, TLS.
	const redisStore = "[rate_limit]\nstore = \"redis\"\n"
	f("[redis]\nmode = \"ring\"\n"+minimal, "redis.mode", 2, "want one of")
	f("[redis]\nmaster = \"m\"\n"+minimal, "redis.master", 2, "unknown key")
	f("[redis]\naddrs = [\"a:1\", \"b:1\"]\n"+minimal, "redis.addrs", 2, "takes one address")
	f("[redis]\nmode = \"cluster\"\naddrs = [\"a:1\", \"nope\"]\n"+minimal, "redis.addrs[1]", 3, "want host:port")
	f(redisStore+"[redis]\nmode = \"cluster\"\n"+minimal, "redis.addrs", 3, "one or more seed nodes")
	f(redisStore+"[redis]\nmode = \"sentinel\"\n"+minimal, "redis.addrs", 3, "the sentinels' addresses")
	f(redisStore+"[redis]\nmode = \"sentinel\"\naddrs = [\"127.0.0.1:26379\"]\n"+minimal, "redis", 3, "needs master_name")
	f("[redis]\nmode = \"sentinel\"\nmaster_name = \"\"\n"+minimal, "redis.master_name", 3, "want the name")
	f("[redis]\nmode = \"cluster\"\nmaster_name = \"m\"\n"+minimal, "redis.master_name", 3, "only for mode = \"sentinel\"")
	f("[redis]\nmaster_name = \"m\"\n"+minimal, "redis.master_name", 2, "only for mode = \"sentinel\"")
	f("[redis]\nsentinel_password_env = \"X\"\n"+minimal, "redis.sentinel_password_env", 2, "only for mode")
	f("[redis]\nmode = \"cluster\"\ndb = 2\n"+minimal, "redis.db", 3, "only db 0")
	f("[redis]\ndb = 16\n"+minimal, "redis.db", 2, "between 0 and 15")
	f(redisStore+"[redis]\naddrs = [\"a:1\"]\nusername_env = \"SIDECAR_TEST_UNSET\"\n"+minimal, "redis.username_env", 5, "SIDECAR_TEST_UNSET is not set")
	f(redisStore+"[redis]\nmode = \"sentinel\"\naddrs = [\"a:1\"]\nmaster_name = \"m\"\nsentinel_password_env = \"SIDECAR_TEST_UNSET\"\n"+minimal,
		"redis.sentinel_password_env", 7, "is not set")
	f("[redis]\ntls_ca_file = \"ca.pem\"\n"+minimal, "redis.tls_ca_file", 2, "needs tls = true")
	f("[redis]\ntls_server_name = \"redis.internal\"\n"+minimal, "redis.tls_server_name", 2, "needs tls = true")
	f("[redis]\ntls = true\ntls_ca_file = \"nope.pem\"\n"+minimal, "redis.tls_ca_file", 3, "no such file")
	f("[redis]\ntls = true\ntls_server_name = \"bad name\"\n"+minimal, "redis.tls_server_name", 3, "host name")

	// [rate_limit] quota leases.
	f("[rate_limit]\nlease = true\n"+minimal, "rate_limit.lease", 2, "needs store = \"redis\"")
	f("[rate_limit]\nlease_overshoot = 0.0\n"+minimal, "rate_limit.lease_overshoot", 2, "greater than 0 and at most 0.2")
	f("[rate_limit]\nlease_overshoot = 0.25\n"+minimal, "rate_limit.lease_overshoot", 2, "at most 0.2, got 0.25")
	f("[rate_limit]\nlease_overshoot = -0.01\n"+minimal, "rate_limit.lease_overshoot", 2, "greater than 0")
	f("[rate_limit]\nlease_overshoot = nan\n"+minimal, "rate_limit.lease_overshoot", 2, "got NaN")
	f("[rate_limit]\nlease_overshoot = \"1%\"\n"+minimal, "rate_limit.lease_overshoot", 2, "cannot decode TOML string")
	f("[rate_limit]\nlease_duration = \"0s\"\n"+minimal, "rate_limit.lease_duration", 2, "greater than zero")
	f("[rate_limit]\nlease_duration = \"5ms\"\n"+minimal, "rate_limit.lease_duration", 2, "between 10ms and 1m")
	f("[rate_limit]\nlease_duration = \"2m\"\n"+minimal, "rate_limit.lease_duration", 2, "between 10ms and 1m")
	f("[rate_limit]\nleases = true\n"+minimal, "rate_limit.leases", 2, "unknown key")

	// [upstreams.NAME.overload] and tier priorities.
	const ol = minimal + "[upstreams.app.overload]\n"
	f(ol+"min_limit = 0\n", "upstreams.app.overload.min_limit", 8, "between 1 and")
	f(ol+"min_limit = 50\nmax_limit = 20\n", "upstreams.app.overload.max_limit", 9, "must not be below min_limit 50")
	f(ol+"max_limit = 50\ninitial_limit = 80\n", "upstreams.app.overload.initial_limit", 9, "within min_limit 10 and max_limit 50")
	f(ol+"queue_timeout = \"0s\"\n", "upstreams.app.overload.queue_timeout", 8, "greater than zero")
	f(ol+"queue_size = -1\n", "upstreams.app.overload.queue_size", 8, "between 0 and")
	f(ol+"reserved = 1.0\n", "upstreams.app.overload.reserved", 8, "below 1, got 1")
	f(ol+"reserved = nan\n", "upstreams.app.overload.reserved", 8, "got NaN")
	f(ol+"min_limit = 1\nreserved = 0.1\n", "upstreams.app.overload.reserved", 9, "leaves the lower priorities no slot")
	f(ol+"limit = 5\n", "upstreams.app.overload.limit", 8, "unknown key")
	f(ol+"queue_timeout = \"2m\"\n", "upstreams.app.overload.queue_timeout", 8, "at most 1m")
	f(ol+"enabled = false\nreserved = 7.0\n", "upstreams.app.overload.reserved", 9, "below 1")
	f(minimal+"[tiers.anonymous]\nlimit = 1\nwindow = \"1s\"\npriority = 101\n", "tiers.anonymous.priority", 10, "between 0 and 100")
}

// An overload table turns protection on with the overload package's
// recommended settings; keys it sets replace them; TopPriority is the
// highest tier priority; enabled = false turns it off.
func TestOverloadSettings(t *testing.T) {
	s, err := Parse("t.toml", []byte(minimal))
	if err != nil || s.Upstreams["app"].Overload != nil {
		t.Fatalf("no table: overload %+v, err %v; want off", s.Upstreams["app"].Overload, err)
	}
	s, err = Parse("t.toml", []byte(minimal+`
[upstreams.app.overload]
max_limit = 15
queue_timeout = "20ms"
[tiers.anonymous]
limit = 1
window = "1s"
[tiers.premium]
limit = 1
window = "1s"
priority = 70
[tiers.batch]
unlimited = true
priority = 5
`))
	if err != nil {
		t.Fatal(err)
	}
	want := overload.DefaultSettings()
	// The initial limit left out follows the bounds: 20 capped at 15.
	want.MaxLimit, want.InitialLimit, want.QueueTimeout, want.TopPriority = 15, 15, 20*time.Millisecond, 70
	if got := *s.Upstreams["app"].Overload; got != want {
		t.Errorf("overload settings %+v, want %+v", got, want)
	}
	if p := s.Tiers["batch"].Priority; p != 5 {
		t.Errorf("unlimited tier priority %d, want 5", p)
	}
	if p := s.Tiers["anonymous"].Priority; p != 0 {
		t.Errorf("default priority %d, want 0", p)
	}
	if _, err := Parse("t.toml", []byte(minimal+"[upstreams.app.overload]\nqueue_size = 0\nqueue_timeout = \"0s\"\n")); err != nil {
		t.Errorf("no queue and no queue timeout: %v", err)
	}
	s, err = Parse("t.toml", []byte(minimal+"[upstreams.app.overload]\nenabled = false\nmin_limit = 5\n"))
	if err != nil || s.Upstreams["app"].Overload != nil {
		t.Errorf("enabled = false: overload %+v, err %v; want off", s.Upstreams["app"].Overload, err)
	}
}

// The three Redis modes compile into what limiter.NewRedisClient needs,
// with the credentials from the environment and the CA bundle read.
func TestRedisModes(t *testing.T) {
	t.Setenv("SIDECAR_TEST_REDIS_USER", "limiter")
	t.Setenv("SIDECAR_TEST_REDIS_PASS", "s3cret")
	t.Setenv("SIDECAR_TEST_SENTINEL_PASS", "watch")
	dir := t.TempDir()
	ca := writeTestCA(t, filepath.Join(dir, "redis-ca.pem"))
	f := func(redis string, want Redis) {
		t.Helper()
		path := filepath.Join(dir, "sidecar.toml")
		if err := os.WriteFile(path, []byte("[rate_limit]\nstore = \"redis\"\n[redis]\n"+redis+minimal), 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Load(path)
		if err != nil {
			t.Fatalf("%s: %v", redis, err)
		}
		if !reflect.DeepEqual(s.Redis, want) {
			t.Errorf("%s:\ngot  %+v\nwant %+v", redis, s.Redis, want)
		}
	}
	f("addrs = [\"10.0.0.1:6379\"]\n",
		Redis{Mode: RedisSingle, Addrs: []string{"10.0.0.1:6379"}, KeyPrefix: "sidecar"})
	f("mode = \"cluster\"\naddrs = [\"10.0.0.1:6379\", \"10.0.0.2:6379\"]\nusername_env = \"SIDECAR_TEST_REDIS_USER\"\npassword_env = \"SIDECAR_TEST_REDIS_PASS\"\n",
		Redis{Mode: RedisCluster, Addrs: []string{"10.0.0.1:6379", "10.0.0.2:6379"}, Username: "limiter", Password: "s3cret", KeyPrefix: "sidecar"})
	f("mode = \"sentinel\"\naddrs = [\"10.0.0.1:26379\", \"10.0.0.2:26379\", \"10.0.0.3:26379\"]\nmaster_name = \"mymaster\"\n"+
		"password_env = \"SIDECAR_TEST_REDIS_PASS\"\nsentinel_password_env = \"SIDECAR_TEST_SENTINEL_PASS\"\ndb = 3\n"+
		"tls = true\ntls_ca_file = \"redis-ca.pem\"\ntls_server_name = \"redis.internal\"\nkey_prefix = \"edge\"\n",
		Redis{Mode: RedisSentinel, Addrs: []string{"10.0.0.1:26379", "10.0.0.2:26379", "10.0.0.3:26379"}, MasterName: "mymaster",
			Password: "s3cret", SentinelPassword: "watch", DB: 3, TLS: true, TLSCA: ca, TLSServerName: "redis.internal", KeyPrefix: "edge"})

	// The CA file is watched like the config: a change reloads.
	s, err := Load(filepath.Join(dir, "sidecar.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(s.Files, filepath.Join(dir, "redis-ca.pem")) {
		t.Errorf("CA file not among the watched files %v", s.Files)
	}
}

// writeTestCA writes a self-signed CA certificate (PEM) to path.
func writeTestCA(t *testing.T, path string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test redis CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return data
}

func TestEveryProblemIsReported(t *testing.T) {
	_, err := Parse("bad.toml", []byte(`[server]
listen = "x"
idle_timeout = "-1s"
[upstreams.app]
url = "ftp://a"
[[routes]]
upstream = "none"
`))
	var pe *Error
	if !errors.As(err, &pe) || len(pe.Problems) != 4 {
		t.Fatalf("want 4 problems, got %v", err)
	}
	if !strings.HasPrefix(pe.Error(), "bad.toml:2:1: server.listen:") {
		t.Errorf("first line %q", strings.SplitN(pe.Error(), "\n", 2)[0])
	}
}

func TestMatch(t *testing.T) {
	s, err := Parse("t.toml", []byte(`
[upstreams.a]
url = "http://a:1"
[[routes]]
name = "wild"
host = "*.Example.com"
path_prefix = "/api/"
methods = ["GET", "HEAD"]
upstream = "a"
[[routes]]
name = "exact"
host = "example.com"
upstream = "a"
[[routes]]
name = "v6"
host = "::1"
upstream = "a"
[[routes]]
name = "rest"
path_prefix = "/"
upstream = "a"
`))
	if err != nil {
		t.Fatal(err)
	}
	f := func(host, path, method, want string) {
		t.Helper()
		r := s.Match([]byte(host), []byte(path), []byte(method))
		got := "<nil>"
		if r != nil {
			got = r.Name
		}
		if got != want {
			t.Errorf("Match(%q, %q, %q) = %s, want %s", host, path, method, got, want)
		}
	}
	f("a.example.com", "/api/x", "GET", "wild")
	f("A.EXAMPLE.COM:8080", "/api/x", "HEAD", "wild")
	f("a.example.com", "/api/x", "POST", "rest")
	f("example.com", "/api/x", "GET", "exact")
	f("example.com:443", "/", "GET", "exact")
	f("xexample.com", "/api/x", "GET", "rest")
	f("[::1]:8080", "/", "GET", "v6")
	f("other", "/anything", "DELETE", "rest")
}

func TestTrusted(t *testing.T) {
	s, err := Parse("t.toml", []byte("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.1\", \"::ffff:172.16.0.0/108\", \"fd00::/8\"]\n"+minimal))
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]bool{
		"10.1.2.3": true, "11.0.0.1": false, "192.168.1.1": true, "192.168.1.2": false,
		"::ffff:10.0.0.1": true, "172.16.5.5": true, "fd00::1": true, "fe80::1": false,
	} {
		if got := s.Server.Trusted(netip.MustParseAddr(addr)); got != want {
			t.Errorf("Trusted(%s) = %v", addr, got)
		}
	}
}

func TestShippedConfigIsValid(t *testing.T) {
	if _, err := Load("../sidecar.toml"); err != nil {
		t.Fatal(err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(minimal))
	f.Add([]byte("[server]\nlisten = \"127.0.0.1:1\"\n" + minimal))
	f.Add([]byte("[[routes]]\n[[routes]]\nupstream=1\n"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		s, err := Parse("fuzz.toml", doc)
		if (s == nil) == (err == nil) {
			t.Fatalf("Parse returned snapshot %v and error %v", s != nil, err)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Fatalf("error does not wrap ErrInvalid: %v", err)
		}
	})
}

// Every restart-only setting is named when a reload changes it.
func TestRestartSettingsNamed(t *testing.T) {
	parse := func(server string) Restart {
		s, err := Parse("t.toml", []byte("[server]\n"+server+minimal))
		if err != nil {
			t.Fatal(err)
		}
		return s.Server.Restart()
	}
	base := parse("")
	if got := base.Changed(parse("")); len(got) != 0 {
		t.Errorf("the same settings changed %v", got)
	}
	for server, want := range map[string]string{
		"listen = \"127.0.0.1:7070\"\n":    "server.listen",
		"idle_timeout = \"5s\"\n":          "server.idle_timeout (as the keep-alive idle time; transfers use the new value)",
		"reuse_port = true\n":              "server.reuse_port",
		"admin_pprof = true\n":             "server.admin_pprof",
		"header_timeout = \"1s\"\n":        "server.header_timeout",
		"max_connections_per_ip = 5\n":     "server.max_connections_per_ip",
		"max_header_bytes = 4096\n":        "server.max_header_bytes",
		"max_connections = 5\n":            "server.max_connections",
		"admin_listen = \"127.0.0.1:1\"\n": "server.admin_listen",
	} {
		if got := base.Changed(parse(server)); len(got) != 1 || got[0] != want {
			t.Errorf("%s: changed %v, want [%s]", server, got, want)
		}
	}
	if base != parse("trusted_proxies = [\"10.0.0.0/8\"]\ndrain_timeout = \"1s\"\n") {
		t.Error("reloadable settings counted as restart-only")
	}
}
