package policy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"math/big"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/pelletier/go-toml/v2"
)

// Parse of a config that sets only what is required yields defaults, field
// for field: validate.go has no default of its own.
func TestParseYieldsDefaults(t *testing.T) {
	dir := t.TempDir()
	writeTestCert(t, filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem"))
	t.Setenv("SIDECAR_TEST_JWT", strings.Repeat("s", 32))
	s, err := Parse(filepath.Join(dir, "t.toml"), []byte(minimal+`
[upstreams.app.health_check]
[upstreams.app.fallback]
[server.tls]
cert_file = "c.pem"
key_file = "k.pem"
[identity.jwt]
algorithm = "HS256"
secret_env = "SIDECAR_TEST_JWT"
[tiers.anonymous]
limit = 1
window = "1s"
[tiers.authenticated]
limit = 1
window = "1s"
`))
	if err != nil {
		t.Fatal(err)
	}
	f := func(what string, got, want any) {
		t.Helper()
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\n%s", what, strings.Join(diff(what, reflect.ValueOf(got), reflect.ValueOf(want)), "\n"))
		}
	}
	if s.Server.TLS == nil || s.Server.TLS.Cert == nil {
		t.Fatalf("no certificate in %+v", s.Server.TLS)
	}
	tlsGot := *s.Server.TLS
	tlsGot.Cert, s.Server.TLS = nil, nil
	f("server", s.Server, defaults.Server)
	f("server.tls", tlsGot, defaults.ServerTLS)

	u := *s.Upstreams["app"]
	f("health_check", *u.HealthCheck, defaults.HealthCheck)
	f("fallback", *u.Fallback, defaults.Fallback)
	u.Name, u.Endpoints, u.HealthCheck, u.Fallback, u.Fingerprint = "", nil, nil, nil, [32]byte{}
	f("upstream", u, defaults.Upstream)

	r := s.Routes[0]
	if want := fmt.Sprintf(defaults.RouteName, 0); r.Name != want {
		t.Errorf("route name %q, want %q", r.Name, want)
	}
	r.Name, r.Upstream = "", ""
	f("route", r, defaults.Route)

	tier := *s.Tiers["anonymous"]
	tier.Name, tier.Limit, tier.Window = "", 0, 0
	f("tier", tier, defaults.Tier)

	j := s.Identity.JWT
	if j == nil {
		t.Fatal("no JWT")
	}
	d := defaults.JWT
	f("identity.jwt", jwtDefaults{TierClaim: j.TierClaim, ClientClaim: j.ClientClaim, RejectUnknownTier: j.RejectUnknownTier,
		Leeway: d.Leeway, RequireExp: d.RequireExp}, d)
	opts := []jwt.ParserOption{jwt.WithValidMethods([]string{"HS256"}), jwt.WithLeeway(d.Leeway)}
	if d.RequireExp {
		opts = append(opts, jwt.WithExpirationRequired())
	}
	f("identity.jwt parser", j.parser, jwt.NewParser(opts...))
	id := s.Identity
	id.JWT = nil
	f("identity", id, defaults.Identity)

	f("rate_limit", s.RateLimit, defaults.RateLimit)
	f("redis", s.Redis, defaults.Redis)
	f("access_log", s.AccessLog, defaults.AccessLog)
}

// What sidecar.toml sets beyond the defaults, on purpose, and the
// commented-out lines that show an example rather than a default. Every
// other line must state the default: deleting a key line, or uncommenting
// a "# key = value" line, leaves the compiled config unchanged. Patterns
// are path.Match patterns over table.key.
var shippedExamples = map[string]string{
	"upstreams.app.url":                 "required: the example upstream",
	"upstreams.app.ca_file":             "example; default: the system's CAs",
	"upstreams.app.server_name":         "example; default: the URL's host",
	"upstreams.app.fallback.upstream":   "example: the alternative to body",
	"routes.name":                       `the example route's metrics label; default "route<index>"`,
	"routes.upstream":                   "required",
	"routes.host":                       "example; default: any host",
	"routes.methods":                    "example; default: any method",
	"routes.limits":                     "example; default: the tiers' limits",
	"server.tls.client_ca_file":         "example; default: no client certificates",
	"server.tls.redirect_listen":        "example; default: off",
	"identity.api_keys_file":            "example; default: no API keys",
	"identity.client_cert_tier":         "example; default: certificates are no identity",
	"identity.jwt.public_key_file":      "example for RS256/ES256 (the base uses HS256)",
	"identity.jwt.issuer":               "example; default: not checked",
	"identity.jwt.audience":             "example; default: not checked",
	"tiers.internal":                    "an example tier",
	"tiers.*.limit":                     "the example tiers: with no [tiers] nothing is limited",
	"tiers.*.window":                    "the example tiers",
	"tiers.premium.priority":            "the example tiers' priorities (default 0)",
	"redis.addrs":                       `example; required with store = "redis", no default`,
	"redis.master_name":                 "example; sentinel only",
	"redis.username_env":                "example; default: no username",
	"redis.password_env":                "example; default: no password",
	"redis.sentinel_password_env":       "example; sentinel only",
	"redis.tls_ca_file":                 "example; needs tls = true",
	"redis.tls_server_name":             "example; needs tls = true",
	"access_log.fingerprint_secret_env": "example; default: a random key per process",
}

// The keys a commented-out table needs before any other of its lines can
// be tried (they are examples too).
var shippedTableBase = map[string][]string{
	"server.tls":                 {"cert_file", "key_file"},
	"identity.jwt":               {"algorithm", "secret_env"},
	"upstreams.app.health_check": nil,
	"upstreams.app.fallback":     nil,
	"upstreams.app.overload":     nil,
}

// sidecar.toml shows these lists abbreviated with "...": what it lists
// must start the default.
var shippedAbbreviated = map[string][]string{
	"server.trusted_only_headers": DefaultTrustedOnlyHeaders,
}

// sidecar.toml states every default: line by line, and as a whole.
func TestShippedConfigStatesDefaults(t *testing.T) { checkShipped(t, "../sidecar.toml") }

func checkShipped(t *testing.T, file string) {
	m := readShipped(t, file)
	used := map[string]bool{}
	example := func(k *shippedKey) bool {
		for pat := range shippedExamples {
			if ok, _ := path.Match(pat, k.path()); ok || pat == k.table {
				used[pat] = true
				return true
			}
		}
		return false
	}
	for _, k := range m.keys {
		where := fmt.Sprintf("sidecar.toml:%d", k.line+1)
		if slices.Contains(shippedTableBase[k.table], k.key) || example(k) {
			continue
		}
		if list, ok := shippedAbbreviated[k.path()]; ok {
			var v struct{ V []string }
			text := strings.Replace(k.valueText(), ", ...]", "]", 1)
			if err := toml.Unmarshal([]byte("V = "+text), &v); err != nil || len(v.V) == 0 || !slices.Equal(v.V, list[:min(len(v.V), len(list))]) {
				t.Errorf("%s: %s lists %q, which does not start the default %q", where, k.path(), text, list)
			}
			continue
		}
		m.same(t, where, k, k.uncommented())
	}
	for pat := range shippedExamples {
		if !used[pat] {
			t.Errorf("shippedExamples[%q] matches no line of sidecar.toml", pat)
		}
	}
	for name, tb := range m.tables {
		if _, ok := shippedTableBase[name]; tb.commented && !ok && shippedExamples[name] == "" {
			t.Errorf("sidecar.toml:%d: commented-out table [%s]: add it to shippedTableBase or shippedExamples", tb.header+1, name)
		}
	}

	// As a whole, sidecar.toml is a minimal config (whose url is
	// sidecar.toml's) plus its example route name and tiers.
	shipped, err := Parse(m.name, []byte(strings.Join(m.lines, "\n")))
	if err != nil {
		t.Fatal(err)
	}
	bare, err := Parse(m.name, []byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	if len(shipped.Tiers) == 0 || shipped.Routes[0].Name == bare.Routes[0].Name {
		t.Errorf("sidecar.toml has no example tiers or route name any more: update shippedExamples")
	}
	shipped.Tiers, shipped.Routes[0].Name = bare.Tiers, bare.Routes[0].Name
	if !reflect.DeepEqual(shipped, bare) {
		t.Errorf("sidecar.toml is not the defaults:\n%s", strings.Join(diff("", reflect.ValueOf(shipped), reflect.ValueOf(bare)), "\n"))
	}
}

// Every "Default X" that config.go states for a key is the code's: setting
// the key to X changes nothing. Defaults stated in words ("Default: the
// system's") are not checked.
func TestDocCommentsStateDefaults(t *testing.T) { checkDocs(t, "config.go", "../sidecar.toml") }

func checkDocs(t *testing.T, goFile, tomlFile string) {
	m := readShipped(t, tomlFile)
	tables := map[string]string{ // File type → a table of that type in sidecar.toml
		"ServerFile": "server", "TLSFile": "server.tls", "UpstreamFile": "upstreams.app",
		"HealthCheckFile": "upstreams.app.health_check", "BreakerFile": "upstreams.app.breaker",
		"FallbackFile": "upstreams.app.fallback", "OverloadFile": "upstreams.app.overload", "RouteFile": "routes", "IdentityFile": "identity",
		"JWTFile": "identity.jwt", "TierFile": "tiers.anonymous", "RateLimitFile": "rate_limit",
		"RedisFile": "redis", "AccessLogFile": "access_log",
	}
	fset := token.NewFileSet()
	file, err := parser.ParseFile(fset, goFile, nil, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, decl := range file.Decls {
		gd, ok := decl.(*ast.GenDecl)
		if !ok || gd.Tok != token.TYPE {
			continue
		}
		ts := gd.Specs[0].(*ast.TypeSpec)
		table, ok := tables[ts.Name.Name]
		if !ok {
			continue
		}
		delete(tables, ts.Name.Name)
		// A field without a comment shares the doc comment above it
		// ("Defaults 3 and 5s"); a line comment is one field's.
		var groups [][]*ast.Field
		for _, fl := range ts.Type.(*ast.StructType).Fields.List {
			if fl.Doc == nil && fl.Comment == nil && len(groups) > 0 && groups[len(groups)-1][0].Doc != nil {
				groups[len(groups)-1] = append(groups[len(groups)-1], fl)
			} else {
				groups = append(groups, []*ast.Field{fl})
			}
		}
		for _, g := range groups {
			lits := statedDefaults(g[0].Doc.Text() + " " + g[0].Comment.Text())
			where := fmt.Sprintf("config.go:%d: %s", fset.Position(g[0].Pos()).Line, ts.Name.Name)
			if len(lits) == 0 {
				continue
			}
			if len(lits) != len(g) {
				t.Errorf("%s: %d defaults %q for %d keys: say which is whose", where, len(lits), lits, len(g))
				continue
			}
			for i, fl := range g {
				tag, _ := strconv.Unquote(fl.Tag.Value)
				key := reflect.StructTag(tag).Get("toml")
				lit := lits[i]
				if star, ok := fl.Type.(*ast.StarExpr); ok && fmt.Sprint(star.X) == "Duration" && !strings.HasPrefix(lit, `"`) {
					lit = strconv.Quote(lit)
				}
				k := m.find(table, key)
				m.same(t, where+"."+fl.Names[0].Name, k, key+" = "+lit)
				checked++
			}
		}
	}
	if len(tables) > 0 || checked < 50 {
		t.Errorf("config.go: types %v not found, %d defaults checked", tables, checked)
	}
}

// statedDefaults returns the TOML literals a doc comment gives as defaults:
// `Default 5s`, `Defaults 3 and 5s`, `"memory" (default)`. Placeholders
// such as "route<index>" are not literals.
func statedDefaults(doc string) []string {
	const lit = `"[^"]*"|'[^']*'|\[[^\]]*\]|true|false|-?[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h)?`
	re := regexp.MustCompile(`(?i)\bdefaults? ((?:` + lit + `)(?:(?:, | and )(?:` + lit + `))*)|(` + lit + `) \(default\b`)
	var out []string
	for _, m := range re.FindAllStringSubmatch(strings.Join(strings.Fields(doc), " "), -1) {
		for _, l := range regexp.MustCompile(lit).FindAllString(m[1]+m[2], -1) {
			if !strings.Contains(l, "<") {
				out = append(out, l)
			}
		}
	}
	return out
}

// shipped is sidecar.toml as lines, with its tables and key lines.
type shipped struct {
	name   string // where the variants are parsed, beside their files
	lines  []string
	tables map[string]*shippedTable
	keys   []*shippedKey
}

type shippedTable struct {
	header    int // line index
	commented bool
}

type shippedKey struct {
	m          *shipped
	table, key string
	line       int // -1: not in the file
	commented  bool
}

func (k *shippedKey) path() string { return k.table + "." + k.key }

// uncommented is the key's line as a setting.
func (k *shippedKey) uncommented() string { return strings.TrimPrefix(k.m.lines[k.line], "# ") }

// valueText is the key's value with any trailing comment.
func (k *shippedKey) valueText() string {
	v := strings.SplitN(k.uncommented(), " = ", 2)[1]
	if i := strings.Index(v, "  #"); i >= 0 {
		v = v[:i]
	}
	return strings.TrimSpace(v)
}

// readShipped reads a sidecar.toml and prepares what its commented-out
// tables need (certificate files, the token secret) beside a copy.
func readShipped(t *testing.T, file string) *shipped {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	m := &shipped{name: filepath.Join(dir, "sidecar.toml"), lines: strings.Split(string(data), "\n"), tables: map[string]*shippedTable{}}
	tableRE := regexp.MustCompile(`^(# )?\[\[?([A-Za-z0-9_.]+)\]\]?`)
	keyRE := regexp.MustCompile(`^(# )?([a-z0-9_]+) = `)
	cur, real := "", ""
	for i, line := range m.lines {
		if g := tableRE.FindStringSubmatch(line); g != nil {
			cur = g[2]
			m.tables[cur] = &shippedTable{header: i, commented: g[1] != ""}
			if g[1] == "" {
				real = cur
			}
			continue
		}
		if strings.TrimSpace(line) == "" {
			cur = real // a commented-out table's block ends at a blank line
			continue
		}
		if g := keyRE.FindStringSubmatch(line); g != nil {
			if g[1] == "" && m.tables[cur].commented {
				t.Errorf("sidecar.toml:%d: %s belongs to [%s] in TOML, not to the commented-out [%s] above it", i+1, g[2], real, cur)
			}
			m.keys = append(m.keys, &shippedKey{m: m, table: cur, key: g[2], line: i, commented: g[1] != ""})
		}
	}
	value := func(table, key string) string {
		var v map[string]string
		if err := toml.Unmarshal([]byte(m.find(table, key).uncommented()), &v); err != nil {
			t.Fatalf("[%s] %s: %v", table, key, err)
		}
		return v[key]
	}
	writeTestCert(t, filepath.Join(dir, value("server.tls", "cert_file")), filepath.Join(dir, value("server.tls", "key_file")))
	t.Setenv(value("identity.jwt", "secret_env"), strings.Repeat("s", 32))
	return m
}

// find returns the line of table.key, or a key not in the file.
func (m *shipped) find(table, key string) *shippedKey {
	for _, k := range m.keys {
		if k.table == table && k.key == key {
			return k
		}
	}
	if m.tables[table] == nil {
		panic("BUG: sidecar.toml has no table " + table)
	}
	return &shippedKey{m: m, table: table, key: key, line: -1}
}

// variant is sidecar.toml with k's table present (uncommented with its
// base keys) and k set to the line set, or absent when set is "".
func (m *shipped) variant(k *shippedKey, set string) string {
	lines := slices.Clone(m.lines)
	if tb := m.tables[k.table]; tb.commented {
		lines[tb.header] = strings.TrimPrefix(lines[tb.header], "# ")
		for _, b := range shippedTableBase[k.table] {
			lines[m.find(k.table, b).line] = m.find(k.table, b).uncommented()
		}
	}
	switch {
	case k.line >= 0 && (set != "" || !k.commented):
		lines[k.line] = set
	case k.line < 0 && set != "":
		h := m.tables[k.table].header
		lines[h] += "\n" + set
	}
	return strings.Join(lines, "\n")
}

// same reports whether setting k with the line set compiles to what leaving
// k out does.
func (m *shipped) same(t *testing.T, where string, k *shippedKey, set string) {
	t.Helper()
	parse := func(doc string) *Snapshot {
		s, err := Parse(m.name, []byte(doc))
		if err != nil {
			t.Errorf("%s: %s: %v", where, set, err)
			return nil
		}
		for _, tier := range s.Tiers { // the defaults that name another key
			if tier.Burst == 0 {
				tier.Burst = tier.Limit
			}
		}
		return s
	}
	absent, given := parse(m.variant(k, "")), parse(m.variant(k, set))
	if absent == nil || given == nil {
		return
	}
	if !reflect.DeepEqual(given, absent) {
		t.Errorf("%s: %q is not the default [%s] %s:\n%s", where, set, k.table, k.key,
			strings.Join(diff("", reflect.ValueOf(given), reflect.ValueOf(absent)), "\n"))
	}
}

// diff lists where got differs from want, as "path: got, want default".
func diff(at string, got, want reflect.Value) []string {
	if got.IsValid() != want.IsValid() {
		return []string{fmt.Sprintf("%s: %v, want %v", at, got, want)}
	}
	if !got.IsValid() || (got.CanInterface() && reflect.DeepEqual(got.Interface(), want.Interface())) {
		return nil
	}
	var out []string
	switch got.Kind() {
	case reflect.Pointer:
		if !got.IsNil() && !want.IsNil() {
			return diff(at, got.Elem(), want.Elem())
		}
	case reflect.Struct:
		for i := range got.NumField() {
			out = append(out, diff(at+"."+got.Type().Field(i).Name, got.Field(i), want.Field(i))...)
		}
		return out
	case reflect.Map:
		keys := map[string]reflect.Value{}
		for _, k := range append(got.MapKeys(), want.MapKeys()...) {
			keys[fmt.Sprint(k)] = k
		}
		for _, n := range slices.Sorted(maps.Keys(keys)) {
			out = append(out, diff(at+"["+n+"]", got.MapIndex(keys[n]), want.MapIndex(keys[n]))...)
		}
		return out
	}
	if !got.CanInterface() && fmt.Sprint(got) == fmt.Sprint(want) {
		return nil
	}
	return []string{fmt.Sprintf("%s: %v, want %v", at, got, want)}
}

// writeTestCert writes a self-signed certificate and its key (PEM).
func writeTestCert(t *testing.T, certPath, keyPath string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
}
