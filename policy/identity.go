package policy

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"github.com/golang-jwt/jwt/v5"
	"github.com/pelletier/go-toml/v2"
)

// Identity says how clients are recognised; see IdentityFile.
type Identity struct {
	APIKeyHeader      string
	AnonymousTier     string
	AuthenticatedTier string
	ClientCertTier    string // "": client certificates are not an identity
	IPv6Prefix        int
	ClientHeader      string
	TierHeader        string
	// JWT is nil when tokens are not accepted.
	JWT  *JWT
	keys map[[32]byte]APIKey
}

// APIKey is one entry of the keys file.
type APIKey struct {
	Client  string
	Tier    string
	Revoked bool
	hash    [32]byte
}

// JWT verifies bearer tokens with one fixed algorithm and key.
type JWT struct {
	parser      *jwt.Parser
	key         any
	TierClaim   string
	ClientClaim string
	// RejectUnknownTier answers a token whose tier claim names no
	// [tiers.NAME] table with 401 instead of the authenticated tier.
	RejectUnknownTier bool
}

// MaxTokenBytes is the longest bearer token looked at; a longer one is
// refused before any decoding, so that a flood of huge tokens costs a
// length check each, not a base64 and JSON decode.
const MaxTokenBytes = 8 << 10

// maxClientIDBytes bounds a client id taken from a token or a certificate.
const maxClientIDBytes = 256

// Tier is one [tiers.NAME] with defaults applied.
type Tier struct {
	Name      string
	Limit     int
	Window    time.Duration
	Burst     int       // 0: Limit
	Algorithm Algorithm // the tier's own, else rate_limit.algorithm
	Shadow    bool
	// Unlimited tiers (unlimited = true) are never rate limited.
	Unlimited bool
	// Priority under overload protection, 0..100, higher first.
	Priority int
}

// Client is who a request comes from, as far as the sidecar can verify.
type Client struct {
	ID   string // "key:<client>", "jwt:<client>", "cert:<CN>" or "ip:<address or /64>"
	Tier string
}

// Credentials are what a request offers to be identified by: every field
// line of each kind, so that a repeated credential cannot hide behind the
// first one. The front-end fills it; nothing in it is trusted yet.
type Credentials struct {
	// APIKeys are the values of every field named identity.api_key_header,
	// also when spelled with '_' for '-' (CGI-style backends read both as
	// one variable).
	APIKeys [][]byte
	// Authorization holds every Authorization line.
	Authorization [][]byte
	// CertCN is the subject common name of a verified TLS client
	// certificate, or nil.
	CertCN []byte
	// ForwardedFor holds the X-Forwarded-For lines; the front-end reads
	// them only when Peer is a trusted proxy.
	ForwardedFor [][]byte
	// Peer is the socket's remote address.
	Peer netip.Addr
}

// Verdict is the outcome of a successful identification besides the id.
type Verdict struct {
	Tier string
	// UnknownTierClaim is a token's tier claim that named no tier table:
	// the client got the authenticated tier instead (count it, log it).
	UnknownTierClaim string
}

// Errors of Identify. The proxy answers ErrUnknownKey and ErrBadToken
// with 401, ErrAmbiguousCredentials with 400.
var (
	ErrUnknownKey           = errors.New("policy: unknown or revoked API key")
	ErrBadToken             = errors.New("policy: invalid bearer token")
	ErrAmbiguousCredentials = errors.New("policy: ambiguous credentials")
)

// Identify resolves a request's client and tier; see AppendIdentity.
func (s *Snapshot) Identify(c *Credentials) (Client, error) {
	id, v, err := s.AppendIdentity(nil, c)
	return Client{ID: string(id), Tier: v.Tier}, err
}

// Verifies reports whether c carries a credential that the sidecar checks
// (an API key with a keys file, a bearer token with [identity.jwt]), or
// an Authorization field repeated: identification may fail, and failures
// are limited by address (see the proxy).
func (s *Snapshot) Verifies(c *Credentials) bool {
	id := &s.Identity
	return (id.keys != nil && len(c.APIKeys) > 0) || len(c.Authorization) > 1 ||
		(id.JWT != nil && len(c.Authorization) == 1 && isBearer(c.Authorization[0]))
}

// AppendIdentity resolves a request's client and tier from what can be
// verified, appending the client id to dst (so that the request path
// builds it without allocating):
//
//  1. an API key, when a keys file is configured: exactly one line, and
//     one the keys file knows and has not revoked, else an error;
//  2. a bearer token, when [identity.jwt] is configured: exactly one,
//     well-formed ("Bearer" SP token), validly signed and in date, else
//     an error;
//  3. a verified TLS client certificate, with identity.client_cert_tier;
//  4. the client address (AppendAddress), in the anonymous tier.
//
// An API key and a bearer token together, or two Authorization fields,
// are ErrAmbiguousCredentials: which one a backend would believe is
// anyone's guess. Another Authorization scheme (Basic, Digest) is not
// looked at. Nothing a client sends can choose its tier without a valid
// key or token.
func (s *Snapshot) AppendIdentity(dst []byte, c *Credentials) ([]byte, Verdict, error) {
	id := &s.Identity
	if n := len(c.Authorization); n > 1 {
		return dst, Verdict{}, fmt.Errorf("%w: %d Authorization fields", ErrAmbiguousCredentials, n)
	}
	useKey := id.keys != nil && len(c.APIKeys) > 0
	bearer := id.JWT != nil && len(c.Authorization) == 1 && isBearer(c.Authorization[0])
	switch {
	case useKey && len(c.APIKeys) > 1:
		return dst, Verdict{}, fmt.Errorf("%w: %d %s fields", ErrAmbiguousCredentials, len(c.APIKeys), id.APIKeyHeader)
	case useKey && bearer:
		return dst, Verdict{}, fmt.Errorf("%w: both an API key and a bearer token", ErrAmbiguousCredentials)
	case useKey:
		k, ok := id.lookup(c.APIKeys[0])
		if !ok {
			return dst, Verdict{}, ErrUnknownKey
		}
		return append(append(dst, "key:"...), k.Client...), Verdict{Tier: k.Tier}, nil
	case bearer:
		tok, err := bearerToken(c.Authorization[0])
		if err != nil {
			return dst, Verdict{}, err
		}
		return id.verify(dst, tok, s.Tiers)
	}
	if len(c.CertCN) > 0 && id.ClientCertTier != "" && printableID(c.CertCN) {
		return append(append(dst, "cert:"...), c.CertCN...), Verdict{Tier: id.ClientCertTier}, nil
	}
	return s.AppendAddress(dst, c), Verdict{Tier: id.AnonymousTier}, nil
}

// AppendAddress appends the id of the client's address: "ip:" and the
// socket peer, or, only when the peer is a trusted proxy, the right-most
// X-Forwarded-For entry that is not itself one; IPv6 addresses by their
// identity.ipv6_prefix network.
func (s *Snapshot) AppendAddress(dst []byte, c *Credentials) []byte {
	addr := s.Server.clientAddr(c.ForwardedFor, c.Peer)
	dst = append(dst, "ip:"...)
	if addr.Is6() && s.Identity.IPv6Prefix < 128 {
		p, _ := addr.Prefix(s.Identity.IPv6Prefix)
		return p.AppendTo(dst)
	}
	return addr.AppendTo(dst)
}

// lookup finds a key by its SHA-256 and checks it in constant time.
func (id *Identity) lookup(key []byte) (APIKey, bool) {
	sum := sha256.Sum256(key)
	k, ok := id.keys[sum]
	if !ok || subtle.ConstantTimeCompare(k.hash[:], sum[:]) != 1 || k.Revoked {
		return APIKey{}, false
	}
	return k, true
}

// authScheme returns the auth-scheme of an Authorization value (RFC 9110
// §11.4: a token) and what follows it.
func authScheme(v []byte) (scheme, rest []byte) {
	i := 0
	for i < len(v) && tokenByte[v[i]] {
		i++
	}
	return v[:i], v[i:]
}

func isBearer(v []byte) bool {
	scheme, _ := authScheme(v)
	return bytes.EqualFold(scheme, []byte("Bearer"))
}

// bearerToken returns the token of a Bearer credential, which RFC 6750
// §2.1 writes as "Bearer" 1*SP b64token: a tab, no token, or anything after
// the token is malformed.
func bearerToken(v []byte) (string, error) {
	_, rest := authScheme(v)
	tok := bytes.TrimLeft(rest, " ")
	switch {
	case len(rest) == 0 || rest[0] != ' ' || len(tok) == 0:
		return "", fmt.Errorf("%w: want \"Bearer <token>\"", ErrBadToken)
	case len(tok) > MaxTokenBytes:
		return "", fmt.Errorf("%w: longer than %d bytes", ErrBadToken, MaxTokenBytes)
	}
	for _, c := range tok {
		if !b64tokenByte[c] {
			return "", fmt.Errorf("%w: want \"Bearer <token>\"", ErrBadToken)
		}
	}
	return string(tok), nil
}

// tokenByte marks RFC 9110 tchar; b64tokenByte RFC 6750's b64token.
var tokenByte, b64tokenByte = func() (t, b [256]bool) {
	for c := 0; c < 256; c++ {
		alnum := ('0' <= c && c <= '9') || ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z')
		t[c] = alnum || strings.IndexByte("!#$%&'*+-.^_`|~", byte(c)) >= 0
		b[c] = alnum || strings.IndexByte("-._~+/=", byte(c)) >= 0
	}
	return t, b
}()

// printableID accepts a client id from a token or certificate only if it
// is short visible ASCII (spaces inside allowed): it goes upstream in a
// header and into logs.
func printableID(v []byte) bool {
	if len(v) == 0 || len(v) > maxClientIDBytes || v[0] == ' ' || v[len(v)-1] == ' ' {
		return false
	}
	for _, c := range v {
		if c < ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}

// errCrit: RFC 7515 §4.1.11 — a token naming extensions in "crit" must be
// refused by a recipient that does not understand them, and this one
// understands none.
var errCrit = errors.New("unsupported critical header \"crit\"")

func (id *Identity) verify(dst []byte, tok string, tiers map[string]*Tier) ([]byte, Verdict, error) {
	j := id.JWT
	claims := jwt.MapClaims{}
	keyFunc := func(t *jwt.Token) (any, error) {
		if _, ok := t.Header["crit"]; ok {
			return nil, errCrit
		}
		return j.key, nil
	}
	if _, err := j.parser.ParseWithClaims(tok, claims, keyFunc); err != nil {
		return dst, Verdict{}, fmt.Errorf("%w: %w", ErrBadToken, err)
	}
	client, _ := claims[j.ClientClaim].(string)
	if !printableID([]byte(client)) {
		return dst, Verdict{}, fmt.Errorf("%w: no %q claim of at most %d visible ASCII characters", ErrBadToken, j.ClientClaim, maxClientIDBytes)
	}
	v := Verdict{Tier: id.AuthenticatedTier}
	if tier, _ := claims[j.TierClaim].(string); tier != "" {
		if _, ok := tiers[tier]; ok {
			v.Tier = tier
		} else if j.RejectUnknownTier {
			return dst, Verdict{}, fmt.Errorf("%w: %q claim names no tier", ErrBadToken, j.TierClaim)
		} else {
			v.UnknownTierClaim = tier
		}
	}
	return append(append(dst, "jwt:"...), client...), v, nil
}

// clientAddr is the socket peer, or, behind trusted proxies, the right-most
// X-Forwarded-For address that is not one of them. An entry that is not an
// address ends the chain: nothing left of it is believed, and the last
// trusted proxy counts as the client.
func (s *Server) clientAddr(xff [][]byte, peer netip.Addr) netip.Addr {
	addr := peer.Unmap()
	if !s.Trusted(addr) {
		return addr
	}
	for i := len(xff) - 1; i >= 0; i-- {
		line := xff[i]
		for len(line) > 0 {
			j := bytes.LastIndexByte(line, ',')
			part := bytes.TrimSpace(line[j+1:])
			line = line[:max(j, 0)]
			if j < 0 {
				line = nil
			}
			if len(part) == 0 && len(line) > 0 {
				continue // "a,,b": an empty list element (RFC 9110 §5.6.1)
			}
			a, ok := forwardedAddr(part)
			if !ok {
				return addr // garbage in the chain: trust nothing left of it
			}
			addr = a
			if !s.Trusted(addr) {
				return addr
			}
		}
	}
	return addr
}

// forwardedAddr parses one X-Forwarded-For entry: an address, an IPv4
// address with a port ("192.0.2.1:5555"), or a bracketed IPv6 address with
// or without one ("[2001:db8::1]:443", "[2001:db8::1]"), as proxies write
// them. Zones are dropped.
func forwardedAddr(part []byte) (netip.Addr, bool) {
	host := part
	switch {
	case len(part) > 0 && part[0] == '[':
		end := bytes.IndexByte(part, ']')
		if end < 0 || !validPort(part[end+1:], true) {
			return netip.Addr{}, false
		}
		host = part[1:end]
	case bytes.Count(part, []byte{':'}) == 1:
		i := bytes.IndexByte(part, ':')
		if !validPort(part[i:], false) {
			return netip.Addr{}, false
		}
		host = part[:i]
	}
	// ParseAddr keeps nothing of its argument: a string view saves an
	// allocation per request.
	a, err := netip.ParseAddr(unsafe.String(unsafe.SliceData(host), len(host)))
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap().WithZone(""), true
}

// validPort accepts ":" and a port number (or nothing, when optional).
func validPort(p []byte, optional bool) bool {
	if len(p) == 0 {
		return optional
	}
	if p[0] != ':' || len(p) < 2 || len(p) > 6 {
		return false
	}
	n := 0
	for _, c := range p[1:] {
		if c < '0' || c > '9' {
			return false
		}
		n = n*10 + int(c-'0')
	}
	return n <= 65535
}

// HashKey returns the keys-file form of an API key: hex SHA-256.
func HashKey(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}

// loadKeys reads the keys file strictly.
func (v *validator) loadKeys(path string, tiers map[string]*Tier) map[[32]byte]APIKey {
	data, err := os.ReadFile(path)
	if err != nil {
		v.addf("identity.api_keys_file", "%v", err)
		return nil
	}
	var kf KeysFile
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&kf); err != nil {
		for _, p := range decodeProblems(path, data, err) {
			v.problems = append(v.problems, p)
		}
		return nil
	}
	kv := validator{file: path, pos: indexPositions(data)}
	keys := make(map[[32]byte]APIKey, len(kf.Keys))
	for i, k := range kf.Keys {
		key := fmt.Sprintf("keys[%d]", i)
		raw, err := hex.DecodeString(strings.ToLower(k.SHA256))
		if err != nil || len(raw) != 32 {
			kv.addf(key+".sha256", "want 64 hex digits (sidecar -hash-key KEY prints them)")
			continue
		}
		if _, ok := tiers[k.Tier]; !ok && len(tiers) > 0 {
			kv.addf(key+".tier", "unknown tier %q", k.Tier)
		}
		if k.Tier == "" {
			kv.addf(key+".tier", "required")
		}
		if !nameRE.MatchString(k.Client) {
			kv.addf(key+".client", "client names may use letters, digits, '_', '.', '-' (at most 64), got %q", k.Client)
		}
		var h [32]byte
		copy(h[:], raw)
		if _, dup := keys[h]; dup {
			kv.addf(key+".sha256", "duplicate key")
		}
		keys[h] = APIKey{Client: k.Client, Tier: k.Tier, Revoked: k.Revoked, hash: h}
	}
	v.problems = append(v.problems, kv.problems...)
	return keys
}

// relPath resolves a path from the config file's directory.
func relPath(configFile, p string) string {
	if filepath.IsAbs(p) || configFile == "" {
		return p
	}
	return filepath.Join(filepath.Dir(configFile), p)
}

func (v *validator) jwt(f *JWTFile, configFile string) *JWT {
	const key = "identity.jwt"
	str := func(p *string, def string) string {
		if p == nil {
			return def
		}
		return *p
	}
	def := &defaults.JWT
	j := &JWT{TierClaim: str(f.TierClaim, def.TierClaim), ClientClaim: str(f.ClientClaim, def.ClientClaim),
		RejectUnknownTier: def.RejectUnknownTier}
	alg := str(f.Algorithm, "")
	opts := []jwt.ParserOption{jwt.WithValidMethods([]string{alg})}
	switch alg {
	case "HS256":
		if f.SecretEnv == nil || f.PublicKeyFile != nil {
			v.addf(key, "HS256 takes secret_env (and no public_key_file)")
			return nil
		}
		secret := os.Getenv(*f.SecretEnv)
		if len(secret) < 32 {
			v.addf(key+".secret_env", "environment variable %s must hold a secret of at least 32 bytes", *f.SecretEnv)
			return nil
		}
		j.key = []byte(secret)
	case "RS256", "ES256":
		if f.PublicKeyFile == nil || f.SecretEnv != nil {
			v.addf(key, "%s takes public_key_file (and no secret_env)", alg)
			return nil
		}
		pem, err := os.ReadFile(relPath(configFile, *f.PublicKeyFile))
		if err != nil {
			v.addf(key+".public_key_file", "%v", err)
			return nil
		}
		if alg == "RS256" {
			j.key, err = jwt.ParseRSAPublicKeyFromPEM(pem)
		} else {
			j.key, err = jwt.ParseECPublicKeyFromPEM(pem)
		}
		if err != nil {
			v.addf(key+".public_key_file", "not a %s public key: %v", alg, err)
			return nil
		}
	default:
		v.addf(key+".algorithm", "want \"HS256\", \"RS256\" or \"ES256\", got %q", alg)
		return nil
	}
	if f.Issuer != nil {
		opts = append(opts, jwt.WithIssuer(*f.Issuer))
	}
	if f.Audience != nil {
		opts = append(opts, jwt.WithAudience(*f.Audience))
	}
	leeway := def.Leeway
	if f.Leeway != nil {
		leeway = f.Leeway.Duration
	}
	opts = append(opts, jwt.WithLeeway(leeway))
	if or(f.RequireExp, def.RequireExp) {
		opts = append(opts, jwt.WithExpirationRequired())
	}
	if f.UnknownTier != nil {
		j.RejectUnknownTier = v.oneOf(key+".unknown_tier", *f.UnknownTier, "authenticated", "reject") == "reject"
	}
	j.parser = jwt.NewParser(opts...)
	return j
}
