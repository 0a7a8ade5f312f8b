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
}

// Tier is one [tiers.NAME] with defaults applied.
type Tier struct {
	Name      string
	Limit     int
	Window    time.Duration
	Burst     int    // 0: Limit
	Algorithm string // "sliding_window" or "gcra"
	Shadow    bool
}

// Client is who a request comes from, as far as the sidecar can verify.
type Client struct {
	ID   string // "key:<client>", "jwt:<client>" or "ip:<address or /64>"
	Tier string
}

// Errors of Identify; the proxy answers them with 401.
var (
	ErrUnknownKey = errors.New("policy: unknown or revoked API key")
	ErrBadToken   = errors.New("policy: invalid bearer token")
)

// Identify resolves a request's client and tier from what can be verified:
// an API key (apiKey: the header's value), else a bearer token
// (authorization: the Authorization header), else the client address:
// the socket peer, or, only when the peer is a trusted proxy, the
// right-most address in X-Forwarded-For (xff, one entry per header line)
// that is not itself a trusted proxy. Nothing a client sends can choose
// its tier without a valid key or token.
func (s *Snapshot) Identify(apiKey, authorization []byte, xff [][]byte, peer netip.Addr) (Client, error) {
	id, tier, err := s.AppendIdentity(nil, apiKey, authorization, nil, xff, peer)
	return Client{ID: string(id), Tier: tier}, err
}

// AppendIdentity is Identify that appends the client id to dst, so that
// the request path builds it without allocating. certCN is the subject
// common name of a verified TLS client certificate, or nil: with
// identity.client_cert_tier set, it identifies the client after API keys
// and tokens and before the address.
func (s *Snapshot) AppendIdentity(dst, apiKey, authorization, certCN []byte, xff [][]byte, peer netip.Addr) ([]byte, string, error) {
	id := &s.Identity
	if len(apiKey) > 0 && id.keys != nil {
		k, ok := id.lookup(apiKey)
		if !ok {
			return dst, "", ErrUnknownKey
		}
		return append(append(dst, "key:"...), k.Client...), k.Tier, nil
	}
	if id.JWT != nil {
		if tok, ok := bearer(authorization); ok {
			c, err := id.verify(tok)
			return append(dst, c.ID...), c.Tier, err
		}
	}
	if len(certCN) > 0 && id.ClientCertTier != "" {
		return append(append(dst, "cert:"...), certCN...), id.ClientCertTier, nil
	}
	addr := s.Server.clientAddr(xff, peer)
	dst = append(dst, "ip:"...)
	if addr.Is6() && id.IPv6Prefix < 128 {
		p, _ := addr.Prefix(id.IPv6Prefix)
		return p.AppendTo(dst), id.AnonymousTier, nil
	}
	return addr.AppendTo(dst), id.AnonymousTier, nil
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

func bearer(auth []byte) (string, bool) {
	const prefix = "bearer "
	if len(auth) <= len(prefix) || !bytes.EqualFold(auth[:len(prefix)], []byte(prefix)) {
		return "", false
	}
	return string(bytes.TrimSpace(auth[len(prefix):])), true
}

func (id *Identity) verify(tok string) (Client, error) {
	j := id.JWT
	claims := jwt.MapClaims{}
	if _, err := j.parser.ParseWithClaims(tok, claims, func(*jwt.Token) (any, error) { return j.key, nil }); err != nil {
		return Client{}, fmt.Errorf("%w: %w", ErrBadToken, err)
	}
	client, _ := claims[j.ClientClaim].(string)
	if client == "" {
		return Client{}, fmt.Errorf("%w: no %q claim", ErrBadToken, j.ClientClaim)
	}
	tier, _ := claims[j.TierClaim].(string)
	if tier == "" {
		tier = id.AuthenticatedTier
	}
	return Client{ID: "jwt:" + client, Tier: tier}, nil
}

// clientAddr is the socket peer, or, behind trusted proxies, the right-most
// X-Forwarded-For address that is not one of them.
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
			// ParseAddr keeps nothing of its argument: a string view of
			// part saves an allocation per request.
			a, err := netip.ParseAddr(unsafe.String(unsafe.SliceData(part), len(part)))
			if err != nil {
				return addr // garbage in the chain: trust nothing left of it
			}
			addr = a.Unmap()
			if !s.Trusted(addr) {
				return addr
			}
		}
	}
	return addr
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
		for _, p := range decodeProblems(path, err) {
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
	j := &JWT{TierClaim: str(f.TierClaim, "tier"), ClientClaim: str(f.ClientClaim, "sub")}
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
	if f.Leeway != nil {
		opts = append(opts, jwt.WithLeeway(f.Leeway.Duration))
	}
	j.parser = jwt.NewParser(opts...)
	return j
}
