package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"reflect"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

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
	mode := map[string]limiter.FailMode{"local": limiter.FailLocal, "allow": limiter.FailAllow, "deny": limiter.FailDeny}[snap.RateLimit.OnStoreError]
	s := limiter.Settings{
		OnStoreError: mode, StoreTimeout: snap.RateLimit.StoreTimeout, FailureThreshold: snap.RateLimit.FailureThreshold,
		Cooldown: snap.RateLimit.Cooldown, MaxKeys: snap.RateLimit.MaxKeys, KeyPrefix: snap.Redis.KeyPrefix,
		Logger: p.log, Metrics: p.set,
		Lease: snap.RateLimit.Lease, LeaseOvershoot: snap.RateLimit.LeaseOvershoot, LeaseDuration: snap.RateLimit.LeaseDuration,
	}
	r.close = func() {}
	if snap.RateLimit.Store == "redis" {
		var tlsConf *tls.Config
		if snap.Redis.TLS {
			tlsConf = &tls.Config{MinVersion: tls.VersionTLS12, ServerName: snap.Redis.TLSServerName}
			if snap.Redis.TLSCA != nil {
				tlsConf.RootCAs = x509.NewCertPool()
				tlsConf.RootCAs.AppendCertsFromPEM(snap.Redis.TLSCA) // policy parsed it
			}
		}
		rdb, err := limiter.NewRedisClient(limiter.RedisOptions{Mode: snap.Redis.Mode, Addrs: snap.Redis.Addrs,
			MasterName: snap.Redis.MasterName, Username: snap.Redis.Username, Password: snap.Redis.Password,
			SentinelPassword: snap.Redis.SentinelPassword, DB: snap.Redis.DB, TLS: tlsConf,
			Timeout: snap.RateLimit.StoreTimeout})
		if err != nil { // policy validated the settings: this is a bug
			panic("BUG: " + err.Error())
		}
		s.Redis = rdb
		r.close = func() { _ = rdb.Close() }
	}
	r.lim = limiter.New(s)
	return r
}

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

var decisionKey = "sidecar.decision"

// limit resolves the client and applies its tier's limit. It returns false
// when it has answered the request itself (401 or 429).
func (x *exchange) limit(h *fasthttp.RequestHeader) bool {
	ctx := x.ctx
	if ctx.Request.MayContinue() {
		// The expect handler decided already, before the body was sent.
		if d, ok := ctx.UserValue(decisionKey).(*decision); ok {
			x.rl = *d
			if d.tier != nil {
				x.tier = d.tier.Name
			}
			return true
		}
	}
	snap := x.st.snap
	id := &snap.Identity
	peer := peerAddr(ctx)
	var xff [][]byte
	if snap.Server.Trusted(peer) {
		xff = h.PeekAll("X-Forwarded-For")
	}
	var certCN []byte
	if id.ClientCertTier != "" && ctx.IsTLS() {
		if st := ctx.TLSConnectionState(); st != nil && len(st.VerifiedChains) > 0 && len(st.PeerCertificates) > 0 {
			certCN = []byte(st.PeerCertificates[0].Subject.CommonName)
		}
	}
	clientID, tierName, err := snap.AppendIdentity(x.clientID[:0], h.Peek(id.APIKeyHeader), h.Peek("Authorization"), certCN, xff, peer)
	x.clientID = clientID
	x.tier = tierName
	if err != nil {
		x.fail(ErrUnauthorized)
		return false
	}
	// The upstream learns who the client is from us alone.
	h.Del(id.ClientHeader)
	h.Del(id.TierHeader)
	h.SetBytesV(id.ClientHeader, clientID)
	h.Set(id.TierHeader, tierName)

	tier := snap.Tiers[tierName]
	route := x.rt.route
	if tier == nil || route.RateLimitExempt {
		return true
	}
	rule := limiter.Rule{Limit: tier.Limit, Window: tier.Window, Burst: tier.Burst}
	if tier.Algorithm == "gcra" || (tier.Algorithm == "" && snap.RateLimit.Algorithm == "gcra") {
		rule.Algorithm = limiter.GCRA
	}
	if l, ok := route.Limits[tier.Name]; ok {
		rule.Limit = l
		if rule.Burst > l {
			rule.Burst = l
		}
	}
	key := tierName + "|" + string(clientID)
	if route.LimitPerRoute {
		key += "|" + route.Name
	}
	d, src := x.st.rl.lim.Allow(key, rule)
	x.rl = decision{set: true, d: d, tier: tier, limit: d.Limit, window: tier.Window}
	shadow := tier.Shadow || route.Shadow
	result := "allowed"
	switch {
	case d.Allowed:
	case shadow:
		result, x.rl.shadowed = "shadow_denied", true
		x.p.shadowLog(route.Name, tier.Name, d)
	default:
		result = "denied"
	}
	x.rt.rl.counter(tier.Name, result, src).Inc()
	if !d.Allowed && !shadow {
		x.fail(ErrRateLimited)
		return false
	}
	return true
}

// rateLimitHeaders adds the IETF RateLimit fields (draft-ietf-httpapi-
// ratelimit-headers: one named policy per tier), the legacy X-RateLimit-*
// ones when configured, and Retry-After on a denial.
func (x *exchange) rateLimitHeaders(h *fasthttp.ResponseHeader) {
	if !x.rl.set {
		return
	}
	d := &x.rl.d
	b := x.scratch[:0]
	b = append(b, '"')
	b = append(b, x.rl.tier.Name...)
	b = append(b, `";q=`...)
	b = strconv.AppendInt(b, int64(x.rl.limit), 10)
	b = append(b, ";w="...)
	b = strconv.AppendInt(b, int64(ceilSeconds(x.rl.window)), 10)
	h.SetBytesV("RateLimit-Policy", b)
	reset := ceilSeconds(d.ResetAfter)
	if !d.Allowed {
		reset = ceilSeconds(d.RetryAfter)
	}
	b = append(b[:0], '"')
	b = append(b, x.rl.tier.Name...)
	b = append(b, `";r=`...)
	b = strconv.AppendInt(b, int64(d.Remaining), 10)
	b = append(b, ";t="...)
	b = strconv.AppendInt(b, int64(reset), 10)
	h.SetBytesV("RateLimit", b)
	if x.st.snap.RateLimit.LegacyHeaders {
		b = strconv.AppendInt(b[:0], int64(x.rl.limit), 10)
		h.SetBytesV("X-RateLimit-Limit", b)
		b = strconv.AppendInt(b[:0], int64(d.Remaining), 10)
		h.SetBytesV("X-RateLimit-Remaining", b)
		b = strconv.AppendInt(b[:0], int64(reset), 10)
		h.SetBytesV("X-RateLimit-Reset", b)
	}
	if !d.Allowed && !x.rl.shadowed {
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
