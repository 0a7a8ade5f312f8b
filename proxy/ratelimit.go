package proxy

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/admission"
	"github.com/sidecar-proxy/sidecar/limiter"
	"github.com/sidecar-proxy/sidecar/policy"
)

// rateLimiting is the limiter of one store configuration; it outlives a
// reload that keeps [rate_limit] and [redis] as they were, so that counts
// carry over.
type rateLimiting struct {
	rl    policy.RateLimit
	redis policy.Redis
	lim   *limiter.Limiter
	close func()
}

func (p *Proxy) newRateLimiting(snap *policy.Snapshot) *rateLimiting {
	r := &rateLimiting{rl: snap.RateLimit, redis: snap.Redis}
	s := limiter.Settings{
		OnStoreError: limiterFailMode[snap.RateLimit.OnStoreError], StoreTimeout: snap.RateLimit.StoreTimeout, FailureThreshold: snap.RateLimit.FailureThreshold,
		Cooldown: snap.RateLimit.Cooldown, MaxKeys: snap.RateLimit.MaxKeys, KeyPrefix: snap.Redis.KeyPrefix,
		Logger: p.log, Metrics: p.set,
		Lease: snap.RateLimit.Lease, LeaseOvershoot: snap.RateLimit.LeaseOvershoot, LeaseDuration: snap.RateLimit.LeaseDuration,
	}
	r.close = func() {}
	if snap.RateLimit.Store == policy.StoreRedis {
		var tlsConf *tls.Config
		if snap.Redis.TLS {
			tlsConf = &tls.Config{MinVersion: tls.VersionTLS12, ServerName: snap.Redis.TLSServerName}
			if snap.Redis.TLSCA != nil {
				tlsConf.RootCAs = x509.NewCertPool()
				tlsConf.RootCAs.AppendCertsFromPEM(snap.Redis.TLSCA) // policy parsed it
			}
		}
		rdb := limiter.NewRedisClient(limiter.RedisOptions{Mode: limiterRedisMode[snap.Redis.Mode], Addrs: snap.Redis.Addrs,
			MasterName: snap.Redis.MasterName, Username: snap.Redis.Username, Password: snap.Redis.Password,
			SentinelPassword: snap.Redis.SentinelPassword, DB: snap.Redis.DB, TLS: tlsConf,
			Timeout: snap.RateLimit.StoreTimeout}) // policy validated them
		s.Redis = rdb
		r.close = func() { _ = rdb.Close() }
	}
	r.lim = limiter.New(s)
	return r
}

// The limiter's names for policy's enums (limiter imports nothing of ours).
var (
	limiterFailMode = [...]limiter.FailMode{policy.FailLocal: limiter.FailLocal, policy.FailAllow: limiter.FailAllow,
		policy.FailDeny: limiter.FailDeny}
	limiterRedisMode = [...]limiter.RedisMode{policy.RedisSingle: limiter.RedisSingle, policy.RedisCluster: limiter.RedisCluster,
		policy.RedisSentinel: limiter.RedisSentinel}
)

func (r *rateLimiting) sameConfig(snap *policy.Snapshot) bool {
	return r.rl == snap.RateLimit && reflect.DeepEqual(r.redis, snap.Redis)
}

func (r *rateLimiting) shutdown() {
	r.lim.Close()
	r.close()
}

// decision is what the limiter said about one request, kept until the
// response head is written.
type decision struct {
	set      bool
	d        limiter.Decision
	tier     *policy.Tier
	limit    int
	window   time.Duration
	shadowed bool
}

// expectVerdict carries what the expect handler decided to the handler
// that serves the same request after 100 Continue.
type expectVerdict struct {
	rl       decision
	clientID []byte
	tier     string
	priority int
}

var decisionKey = "sidecar.decision"

// limit identifies the client and applies its tier's limit (admission's
// Limit), then counts what it decided. It returns the error to answer
// with when the request goes no further (400, 401 or 429). The identity
// goes upstream in prepareRequest, after stripping.
func (x *exchange) limit(h *fasthttp.RequestHeader) error {
	ctx := x.r.ctx
	if ctx.Request.MayContinue() {
		// The expect handler decided already, before the body was sent.
		if v, ok := ctx.UserValue(decisionKey).(*expectVerdict); ok {
			x.r.rl, x.r.tier, x.r.priority = v.rl, v.tier, v.priority
			x.clientID = append(x.clientID[:0], v.clientID...)
			return nil
		}
	}
	d := &x.dec
	err := x.r.st.adm.Limit(x.credentials(h), x.r.rt.route, d)
	x.r.charged = d.Limited && d.Limit.Allowed
	x.clientID, x.r.tier = append(x.clientID[:0], d.ClientID...), d.Tier
	if d.TierTable != nil {
		x.r.priority = d.TierTable.Priority
	}
	if d.Limited {
		// q is the limit per window whatever the algorithm (a GCRA
		// decision's Limit is its bucket depth, the burst).
		x.r.rl = decision{set: true, d: d.Limit, tier: d.TierTable, limit: d.Rule.Limit, window: d.TierTable.Window,
			shadowed: d.Result == "shadow_denied"}
	}
	switch {
	case errors.Is(err, admission.ErrFailureLimited):
		if errors.Is(err, policy.ErrUnknownKey) || errors.Is(err, policy.ErrBadToken) || errors.Is(err, policy.ErrAmbiguousCredentials) {
			x.p.m.identity[identityReason(err)].Inc() // this failure took the address over
		}
		x.p.m.identity[reasonFailureLimit].Inc()
		return admission.ErrFailureLimited
	case err != nil && !errors.Is(err, admission.ErrRateLimited):
		x.p.m.identity[identityReason(err)].Inc()
		return err
	}
	if d.UnknownTierClaim != "" {
		x.p.m.identity[reasonUnknownTier].Inc()
		x.p.unknownTierLog(d.UnknownTierClaim, d.Tier)
	}
	if !d.Limited {
		return nil
	}
	x.r.rt.rl.counter(d.Tier, d.Result, d.Source).Inc()
	if d.Result == "shadow_denied" {
		x.p.shadowLog(x.r.rt.route.Name, d.Tier, d.Limit)
	}
	if err != nil {
		return ErrRateLimited
	}
	return nil
}

// refundRateLimit gives the request back to the client's rate limit: it
// was admitted and charged, then shed before it reached the upstream. The
// RateLimit headers of the answer count it as given back. A request whose
// limit the 100-continue handler decided is not refunded (its decision
// was made before this exchange and is not kept).
func (x *exchange) refundRateLimit() {
	if !x.r.charged {
		return
	}
	x.r.st.adm.Refund(&x.dec, x.r.start)
	x.r.charged = false
	x.r.rl.d.Remaining = min(x.r.rl.d.Remaining+1, x.r.rl.d.Limit)
}

// credentials collects the request's credential lines in one pass over
// the head: every API-key field (also spelled with '_'), every
// Authorization field, the verified client certificate's CN, and the
// X-Forwarded-For lines when the peer is a trusted proxy. The slices are
// views into the head, valid until it is modified.
func (x *exchange) credentials(h *fasthttp.RequestHeader) *admission.Request {
	c := &x.req.Credentials
	c.APIKeys, c.Authorization, c.ForwardedFor = c.APIKeys[:0], c.Authorization[:0], c.ForwardedFor[:0]
	c.CertCN, c.Peer = nil, x.r.peer
	keyName := x.r.st.apiKeyField
	for k, v := range h.All() {
		switch {
		case keyName.has(k):
			c.APIKeys = append(c.APIKeys, v)
		case len(k) == len("Authorization") && bytes.EqualFold(k, []byte("Authorization")):
			c.Authorization = append(c.Authorization, v)
		case x.fwd.trusted && len(k) == len("X-Forwarded-For") && bytes.EqualFold(k, []byte("X-Forwarded-For")):
			c.ForwardedFor = append(c.ForwardedFor, v)
		}
	}
	if x.r.st.snap.Identity.ClientCertTier != "" && x.r.ctx.IsTLS() {
		if st := x.r.ctx.TLSConnectionState(); st != nil && len(st.VerifiedChains) > 0 && len(st.PeerCertificates) > 0 {
			c.CertCN = []byte(st.PeerCertificates[0].Subject.CommonName)
		}
	}
	return &x.req
}

func identityReason(err error) int {
	switch {
	case errors.Is(err, policy.ErrUnknownKey):
		return reasonUnknownKey
	case errors.Is(err, policy.ErrAmbiguousCredentials):
		return reasonAmbiguous
	}
	return reasonBadToken
}

// unknownTierLog reports a token tier claim that names no tier, at most
// once a minute per process: the claim is the issuer's mistake (or a
// config's), worth seeing but not per request.
func (p *Proxy) unknownTierLog(claim, used string) {
	now := time.Now().Unix() / 60
	if last := p.lastUnknownTierLog.Load(); last == now || !p.lastUnknownTierLog.CompareAndSwap(last, now) {
		return
	}
	if len(claim) > 64 {
		claim = claim[:64] + "..."
	}
	p.log.Warn("a valid token's tier claim names no [tiers] table; the authenticated tier was used (identity.jwt.unknown_tier = \"reject\" refuses such tokens)",
		slog.String("tier_claim", claim), slog.String("tier", used))
}

// rateLimitHeaders adds the IETF RateLimit fields (draft-ietf-httpapi-
// ratelimit-headers: one named policy per tier), the legacy X-RateLimit-*
// ones when configured, and Retry-After on a denial.
func (x *exchange) rateLimitHeaders(h *fasthttp.ResponseHeader) {
	if !x.r.rl.set {
		return
	}
	d := &x.r.rl.d
	b := x.scratch[:0]
	b = append(b, '"')
	b = append(b, x.r.rl.tier.Name...)
	b = append(b, `";q=`...)
	b = strconv.AppendInt(b, int64(x.r.rl.limit), 10)
	b = append(b, ";w="...)
	b = strconv.AppendInt(b, int64(ceilSeconds(x.r.rl.window)), 10)
	h.SetBytesV("RateLimit-Policy", b)
	reset := ceilSeconds(d.ResetAfter)
	if !d.Allowed {
		reset = ceilSeconds(d.RetryAfter)
	}
	// t never exceeds w: a sliding window's oldest sub-window can keep a
	// denied client waiting a little past the window (Retry-After says so
	// exactly), but the policy resets within its window.
	reset = min(reset, ceilSeconds(x.r.rl.window))
	b = append(b[:0], '"')
	b = append(b, x.r.rl.tier.Name...)
	b = append(b, `";r=`...)
	b = strconv.AppendInt(b, int64(d.Remaining), 10)
	b = append(b, ";t="...)
	b = strconv.AppendInt(b, int64(reset), 10)
	h.SetBytesV("RateLimit", b)
	if x.r.st.snap.RateLimit.LegacyHeaders {
		b = strconv.AppendInt(b[:0], int64(x.r.rl.limit), 10)
		h.SetBytesV("X-RateLimit-Limit", b)
		b = strconv.AppendInt(b[:0], int64(d.Remaining), 10)
		h.SetBytesV("X-RateLimit-Remaining", b)
		b = strconv.AppendInt(b[:0], int64(reset), 10)
		h.SetBytesV("X-RateLimit-Reset", b)
	}
	if !d.Allowed && !x.r.rl.shadowed {
		b = strconv.AppendInt(b[:0], int64(ceilSeconds(d.RetryAfter)), 10)
		h.SetBytesV("Retry-After", b)
	}
	x.scratch = b
}

// ceilSeconds rounds up: a client told to wait 0 s would retry at once.
func ceilSeconds(d time.Duration) int {
	return int((d + time.Second - 1) / time.Second)
}

// shadowLog reports a would-have-denied decision, at most once a second
// per process so that a shadow limit cannot flood the logs.
func (p *Proxy) shadowLog(route, tier string, d limiter.Decision) {
	now := time.Now().Unix()
	if last := p.lastShadowLog.Load(); last == now || !p.lastShadowLog.CompareAndSwap(last, now) {
		return
	}
	p.log.Info("rate limit would deny (shadow mode)", slog.String("route", route), slog.String("tier", tier),
		slog.Int("limit", d.Limit), slog.Duration("retry_after", d.RetryAfter))
}

// tierCounters are one route's decision counters, created on first use.
type tierCounters struct {
	set   *metrics.Set
	route string
	m     map[string]*[3][limiter.Sources]atomic.Pointer[metrics.Counter] // by tier; built at Apply, read-only
}

var decisionResults = [...]string{"allowed", "denied", "shadow_denied"}

func newTierCounters(set *metrics.Set, route string, tiers map[string]*policy.Tier) *tierCounters {
	tc := &tierCounters{set: set, route: route, m: make(map[string]*[3][limiter.Sources]atomic.Pointer[metrics.Counter], len(tiers))}
	for name := range tiers {
		tc.m[name] = new([3][limiter.Sources]atomic.Pointer[metrics.Counter])
	}
	return tc
}

func (tc *tierCounters) counter(tier, result string, src limiter.Source) *metrics.Counter {
	ri := indexOr(decisionResults[:], result)
	return lazyCounter(tc.set, &tc.m[tier][ri][src], func() string {
		return fmt.Sprintf(`sidecar_ratelimit_decisions_total{route=%q,tier=%q,result=%q,source=%q}`,
			tc.route, tier, decisionResults[ri], src.String())
	})
}
