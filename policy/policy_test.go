package policy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
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
	f("[server]\nidle_timeout = \"1 minute\"\n"+minimal, "server.idle_timeout", 2, "invalid duration")
	f("[server]\nmax_header_bytes = 10\n"+minimal, "server.max_header_bytes", 2, "between")
	f("[server]\nmax_body_bytes = -1\n"+minimal, "server.max_body_bytes", 2, "unlimited")
	f("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"bogus\"]\n"+minimal, "server.trusted_proxies[1]", 2, "CIDR")
	f("[server]\nrequest_id_header = \"X Id\"\n"+minimal, "server.request_id_header", 2, "header name")
	f("[server]\nlisen = \"x\"\n"+minimal, "server.lisen", 2, "unknown key")
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
	f("[[routes]]\nupstream = \"x\"\n", "upstreams", 0, "at least one")
	f("[server\n", "", 1, "")
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
