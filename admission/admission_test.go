package admission

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/sidecar-proxy/sidecar/limiter"
	"github.com/sidecar-proxy/sidecar/policy"
)

// Limiter keys write each part with its length: no client id, whatever it
// holds, spells another (tier, client, route).
func TestLimitKeysAreUnambiguous(t *testing.T) {
	key := func(tier, client, route string) string {
		b := AppendKey(nil, tier, []byte(client))
		if route != "" {
			b = appendKeyPart(b, route)
		}
		return string(b)
	}
	if got := key("anonymous", "ip:127.0.0.1", ""); got != "9:anonymous12:ip:127.0.0.1" {
		t.Errorf("key %q", got)
	}
	seen := map[string][3]string{}
	for _, c := range [][3]string{
		{"t", "jwt:x", "r"}, {"t", "jwt:x|r", ""}, {"t", "jwt:x|", "r"}, {"t|jwt:x", "r", ""},
		{"t", "jwt:x5:r", ""}, {"t", "jwt:x", "5:r"}, {"t", "", "jwt:x"}, {"t1", ":jwt:x", ""},
	} {
		k := key(c[0], c[1], c[2])
		if prev, dup := seen[k]; dup {
			t.Errorf("%q and %q share the key %q", prev, c, k)
		}
		seen[k] = c
	}
}

func admitter(t *testing.T, cfg string) *Admitter {
	t.Helper()
	snap, err := policy.Parse("t", []byte(cfg+`
[upstreams.app]
url = "http://127.0.0.1:1"
[[routes]]
name = "health"
path_prefix = "/healthz"
rate_limit_exempt = true
upstream = "app"
[[routes]]
name = "api"
upstream = "app"
`))
	if err != nil {
		t.Fatal(err)
	}
	lim := limiter.New(limiter.Settings{})
	t.Cleanup(lim.Close)
	return New(snap, lim, nil)
}

func request(path string, extra ...[]byte) *Request {
	return &Request{Method: []byte("GET"), Host: []byte("x"), Paths: append([][]byte{[]byte(path)}, extra...),
		Credentials: policy.Credentials{Peer: netip.MustParseAddr("192.0.2.1")}}
}

func TestRoute(t *testing.T) {
	a := admitter(t, "")
	if r, err := a.Route(request("/healthz/x")); err != nil || r.Name != "health" {
		t.Errorf("/healthz/x: %v %v", r, err)
	}
	if _, err := a.Route(request("/healthz", []byte("/api/..%2Fhealthz"))); !errors.Is(err, ErrAmbiguousPath) {
		t.Errorf("readings on two routes: %v, want ErrAmbiguousPath", err)
	}
	if r, err := a.Route(request("/api/x", []byte("/api/./x"))); err != nil || r.Name != "api" {
		t.Errorf("readings on one route: %v %v", r, err)
	}
}

// The tier's limit applies unless the route is exempt; past it, ErrRateLimited
// with the decision for the headers; failed identification is limited by
// address, and then refused before its credential is looked at.
func TestLimit(t *testing.T) {
	t.Setenv("ADMISSION_TEST_SECRET", "0123456789abcdef0123456789abcdef")
	a := admitter(t, "[identity.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"ADMISSION_TEST_SECRET\"\n"+
		"[tiers.anonymous]\nlimit = 2\nwindow = \"1m\"\n[tiers.authenticated]\nlimit = 5\nwindow = \"1m\"\n")
	api, _ := a.Route(request("/api"))
	health, _ := a.Route(request("/healthz"))
	var d Decision
	for i := range 3 {
		err := a.Limit(request("/api"), api, &d)
		if want := i == 2; errors.Is(err, ErrRateLimited) != want || string(d.ClientID) != "ip:192.0.2.1" || d.Tier != "anonymous" {
			t.Fatalf("request %d: %v %q %q", i, err, d.ClientID, d.Tier)
		}
		if d.Rule.Limit != 2 || !d.Limited {
			t.Errorf("request %d: rule %+v limited %v", i, d.Rule, d.Limited)
		}
	}
	if err := a.Limit(request("/healthz"), health, &d); err != nil || d.Limited {
		t.Errorf("exempt route: %v limited %v", err, d.Limited)
	}
	bad := request("/api")
	bad.Credentials.Peer = netip.MustParseAddr("198.51.100.1")
	bad.Credentials.Authorization = [][]byte{[]byte("Bearer not.a.token")}
	for i := range 4 {
		err := a.Limit(bad, api, &d)
		switch {
		case i < 2 && (!errors.Is(err, policy.ErrBadToken) || errors.Is(err, ErrFailureLimited)):
			t.Errorf("bad token %d: %v, want a plain ErrBadToken", i, err)
		case i >= 2 && !errors.Is(err, ErrFailureLimited):
			t.Errorf("bad token %d: %v, want ErrFailureLimited", i, err)
		case i == 3 && errors.Is(err, policy.ErrBadToken):
			t.Errorf("bad token %d was verified again: %v", i, err)
		}
	}
}

// Failed identification is limited even when the anonymous tier's own
// limit is not enforced: in shadow mode its limit still bounds failures,
// and an unlimited anonymous tier leaves DefaultFailureLimit per minute.
// Either left key and token guessing unlimited.
func TestFailureLimitWithoutAnEnforcedAnonymousLimit(t *testing.T) {
	t.Setenv("ADMISSION_TEST_SECRET", "0123456789abcdef0123456789abcdef")
	jwt := "[identity.jwt]\nalgorithm = \"HS256\"\nsecret_env = \"ADMISSION_TEST_SECRET\"\n[tiers.authenticated]\nlimit = 5\nwindow = \"1m\"\n"
	for _, tc := range []struct {
		name, anon string
		allowed    int
	}{
		{"shadow", "[tiers.anonymous]\nlimit = 3\nwindow = \"1m\"\nmode = \"shadow\"\n", 3},
		{"unlimited", "[tiers.anonymous]\nunlimited = true\n", 100}, // DefaultFailureLimit
	} {
		a := admitter(t, jwt+tc.anon)
		api, _ := a.Route(request("/api"))
		var d Decision
		bad := request("/api")
		bad.Credentials.Authorization = [][]byte{[]byte("Bearer not.a.token")}
		limited := -1
		for i := range tc.allowed + 2 {
			if err := a.Limit(bad, api, &d); errors.Is(err, ErrFailureLimited) {
				limited = i
				break
			}
		}
		if limited != tc.allowed {
			t.Errorf("%s anonymous tier: the failure limit refused the %dth bad token, want the %dth", tc.name, limited+1, tc.allowed+1)
		}
	}
}
