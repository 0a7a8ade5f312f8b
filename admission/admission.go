// Package admission decides whether a request may go upstream, whatever
// the transport it came by: its route, its verified client and tier, its
// tier's rate limit (with the limit on failed identification), and its
// place in the circuit and bulkhead, run on
// a small view of the request (Request). It imports no HTTP server: the
// fasthttp front-end adapts its RequestCtx to a Request, and an HTTP/2
// front-end will be a second adapter calling the same code.
//
// Admission returns decisions and errors; turning them into statuses,
// headers and metrics is the front-end's business.
package admission

import (
	"bytes"
	"errors"
	"strconv"
	"time"

	"github.com/sidecar-proxy/sidecar/breaker"
	"github.com/sidecar-proxy/sidecar/limiter"
	"github.com/sidecar-proxy/sidecar/policy"
)

// Request is what admission looks at.
type Request struct {
	Method []byte
	// Host is the authority the request goes upstream with (an absolute
	// target's, when it had one).
	Host []byte
	// Paths are the readings of the target's path a backend may make:
	// Paths[0] is the one routes match (percent-decoded, dot segments
	// resolved); the others (the raw path, backslashes as slashes, ...)
	// must pick the same route, or the request is ErrAmbiguousPath.
	Paths [][]byte
	// Credentials are the request's credential lines and addresses.
	Credentials policy.Credentials
}

// Admitter decides for one policy snapshot and limiter.
type Admitter struct {
	snap    *policy.Snapshot
	lim     *limiter.Limiter
	circuit func(*policy.Route) *breaker.Breaker
	fail    *policy.Tier // the limit of an address's failed identifications (failureTier)
}

// DefaultFailureLimit is the limit of an address's failed identifications
// per minute when the anonymous tier is unlimited.
const DefaultFailureLimit = 100

// failureTier is the limit of an address's failed identifications: the
// anonymous tier's, enforced even while that tier is in shadow mode (a
// dark launch of the anonymous limit is no licence to guess keys), or
// DefaultFailureLimit per minute when it is unlimited. Before, either
// left key and token guessing unlimited.
func failureTier(snap *policy.Snapshot) *policy.Tier {
	anon := snap.Tiers[snap.Identity.AnonymousTier]
	switch {
	case anon == nil:
		return nil
	case anon.Unlimited:
		return &policy.Tier{Name: anon.Name, Limit: DefaultFailureLimit, Window: time.Minute}
	case anon.Shadow:
		enforced := *anon
		enforced.Shadow = false
		return &enforced
	}
	return anon
}

// New returns the Admitter of snap, limiting with lim. circuit returns the
// circuit a route's requests go through (the route's own, or its
// upstream's), nil for none; a nil circuit func means no circuits.
func New(snap *policy.Snapshot, lim *limiter.Limiter, circuit func(*policy.Route) *breaker.Breaker) *Admitter {
	return &Admitter{snap: snap, lim: lim, circuit: circuit, fail: failureTier(snap)}
}

// Circuit takes a place in the route's circuit and bulkhead: a Ticket to
// report the outcome on and end with Done, or breaker.ErrOpen (with the
// time until the next probe) or breaker.ErrSaturated, which the front-end
// answers with the upstream's fallback at once.
func (a *Admitter) Circuit(route *policy.Route, now time.Time) (breaker.Ticket, time.Duration, error) {
	if a.circuit == nil {
		return breaker.Ticket{}, 0, nil
	}
	b := a.circuit(route)
	if b == nil {
		return breaker.Ticket{}, 0, nil
	}
	return b.Allow(now)
}

// Errors of Route.
var (
	ErrNoRoute       = errors.New("admission: no route matches the request")
	ErrAmbiguousPath = errors.New("admission: the target's readings pick different routes")
)

// Route returns the first route matching r, ErrNoRoute, or
// ErrAmbiguousPath when another reading of the path picks another route.
func (a *Admitter) Route(r *Request) (*policy.Route, error) {
	route := a.snap.Match(r.Host, r.Paths[0], r.Method)
	for _, p := range r.Paths[1:] {
		if !bytes.Equal(p, r.Paths[0]) && a.snap.Match(r.Host, p, r.Method) != route {
			return nil, ErrAmbiguousPath
		}
	}
	if route == nil {
		return nil, ErrNoRoute
	}
	return route, nil
}

// Errors of Limit, besides policy's identification errors (ErrUnknownKey,
// ErrBadToken, ErrAmbiguousCredentials).
var (
	ErrRateLimited = errors.New("admission: rate limit exceeded")
	// ErrFailureLimited: the address failed identification too often; the
	// request was refused before its credential was looked at.
	ErrFailureLimited = errors.New("admission: too many failed identifications from this address")
)

// Decision is what Limit found. It is reused across requests: Limit
// resets it.
type Decision struct {
	// ClientID is the verified client ("key:acme", "ip:192.0.2.1", ...).
	ClientID []byte
	// Tier is the client's tier name ("" when identification failed);
	// TierTable its table, nil when tiers are not configured.
	Tier      string
	TierTable *policy.Tier
	// Limited says a limit was applied (not exempt, not unlimited): then
	// Rule, Limit, Source and Result describe it.
	Limited bool
	Rule    limiter.Rule
	Limit   limiter.Decision
	Source  limiter.Source
	// Result is "allowed", "denied" or "shadow_denied" (a shadow limit
	// that would have denied: the request goes on).
	Result string
	// UnknownTierClaim is a token tier claim that named no table (the
	// authenticated tier was used): worth counting and logging.
	UnknownTierClaim string

	scratch []byte
}

// Limit identifies r's client and applies its tier's limit on route. It
// returns nil when the request may go on, ErrRateLimited or
// ErrFailureLimited (d describes the limit for the response's headers),
// or the identification error. d.ClientID and d.Tier are set on success.
func (a *Admitter) Limit(r *Request, route *policy.Route, d *Decision) error {
	*d = Decision{ClientID: d.ClientID[:0], scratch: d.scratch[:0]}
	snap := a.snap
	c := &r.Credentials
	// An address that keeps failing identification is refused before its
	// next key lookup or signature check: see failureKey.
	var failKey string
	anon := a.fail
	if anon != nil && snap.Verifies(c) {
		failKey = a.failureKey(c, d)
		if ld, denied := a.lim.Denied(failKey, TierRule(anon, nil)); denied {
			d.refused(anon, ld)
			return ErrFailureLimited
		}
	}
	id, v, err := snap.AppendIdentity(d.ClientID, c)
	d.ClientID = id
	if err != nil {
		if failKey != "" && a.chargeFailure(failKey, anon, d) {
			return errors.Join(ErrFailureLimited, err)
		}
		return err
	}
	d.Tier, d.UnknownTierClaim = v.Tier, v.UnknownTierClaim
	tier := snap.Tiers[d.Tier]
	d.TierTable = tier
	if tier == nil || tier.Unlimited || route.RateLimitExempt {
		return nil
	}
	d.Rule = TierRule(tier, route)
	b := AppendKey(d.scratch[:0], tier.Name, d.ClientID)
	if route.LimitPerRoute {
		b = appendKeyPart(b, route.Name)
	}
	d.scratch = b
	d.Limit, d.Source = a.lim.Allow(string(b), d.Rule)
	d.Limited = true
	switch {
	case d.Limit.Allowed:
		d.Result = "allowed"
	case tier.Shadow || route.Shadow:
		d.Result = "shadow_denied"
	default:
		d.Result = "denied"
		return ErrRateLimited
	}
	return nil
}

// Refund gives back the request that Limit admitted with d and charged to
// the client's limit, when it was then not served at all (overload
// protection shed it): the client's next request gets its place. at is
// when Limit decided. A decision that charged nothing (exempt, unlimited,
// denied, shadow-denied) has nothing to give back.
func (a *Admitter) Refund(d *Decision, at time.Time) {
	if d.Limited && d.Limit.Allowed {
		a.lim.Refund(string(d.scratch), d.Rule, d.Source, at)
	}
}

// chargeFailure counts a failed identification against the address, and
// reports whether that took it over the limit.
func (a *Admitter) chargeFailure(key string, anon *policy.Tier, d *Decision) (refused bool) {
	rule := TierRule(anon, nil)
	ld, _ := a.lim.Allow(key, rule)
	if !ld.Allowed {
		a.lim.Remember(key, ld)
		d.refused(anon, ld)
		return true
	}
	if ld.Remaining == 0 {
		// That was the last failure the limit allows: learn when the next
		// would be, so that it is refused before its check (a denied
		// decision charges nothing).
		if next, _ := a.lim.Allow(key, rule); !next.Allowed {
			a.lim.Remember(key, next)
		}
	}
	return false
}

func (d *Decision) refused(anon *policy.Tier, ld limiter.Decision) {
	d.Tier, d.TierTable, d.Limited, d.Limit, d.Result = "", anon, true, ld, "denied"
	d.Rule = TierRule(anon, nil)
}

// failureKey is the limiter key that counts an address's failed
// identifications, under the anonymous tier's limit: "fail:" and the
// address id, a client id no credential can produce.
func (a *Admitter) failureKey(c *policy.Credentials, d *Decision) string {
	addr := a.snap.AppendAddress(append(d.scratch[:0], "fail:"...), c)
	key := string(AppendKey(addr[len(addr):], a.snap.Identity.AnonymousTier, addr))
	d.scratch = addr[:0]
	return key
}

// TierRule is the limiter rule of tier, with route's override if any.
func TierRule(tier *policy.Tier, route *policy.Route) limiter.Rule {
	rule := limiter.Rule{Limit: tier.Limit, Window: tier.Window, Burst: tier.Burst, Algorithm: limiterAlgorithm[tier.Algorithm]}
	if route == nil {
		return rule
	}
	if l, ok := route.Limits[tier.Name]; ok {
		rule.Limit = l
		if rule.Burst > l {
			rule.Burst = l
		}
	}
	return rule
}

var limiterAlgorithm = [...]limiter.Algorithm{policy.SlidingWindow: limiter.SlidingWindow, policy.GCRA: limiter.GCRA}

// AppendKey appends the limiter key of a tier and client: each part with
// its length in front ("9:anonymous13:ip:127.0.0.1"), so that no client
// id, whatever it contains, can spell another client's key or another
// route's count.
func AppendKey(dst []byte, tier string, client []byte) []byte {
	dst = appendKeyPart(dst, tier)
	dst = strconv.AppendInt(dst, int64(len(client)), 10)
	dst = append(dst, ':')
	return append(dst, client...)
}

func appendKeyPart(dst []byte, part string) []byte {
	dst = strconv.AppendInt(dst, int64(len(part)), 10)
	dst = append(dst, ':')
	return append(dst, part...)
}
