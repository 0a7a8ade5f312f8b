package limiter

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/redis/go-redis/v9"
)

// FailMode is what happens to decisions while the store is unreachable.
type FailMode uint8

const (
	// FailLocal decides in memory with each replica's share of the limit
	// (limit ÷ replicas seen alive before the outage).
	FailLocal FailMode = iota
	// FailAllow admits everything.
	FailAllow
	// FailDeny refuses everything.
	FailDeny
)

// Source says where a decision came from.
type Source uint8

const (
	FromMemory    Source = iota // the memory store (no Redis configured)
	FromStore                   // Redis answered
	FromDenyCache               // a client known to be over its limit, denied without a Redis call
	FromFallback                // Redis failed or is cooling down: on_store_error decided
	FromLease                   // spent from this replica's lease of the client's quota (Settings.Lease)

	// Sources is the number of Source values, for arrays indexed by one.
	Sources = int(FromLease) + 1
)

func (s Source) String() string {
	switch s {
	case FromStore:
		return "store"
	case FromDenyCache:
		return "deny_cache"
	case FromFallback:
		return "store_error_fallback"
	case FromLease:
		return "lease"
	}
	return "memory"
}

// Settings configures a Limiter. Zero values are the documented defaults.
type Settings struct {
	// Redis shares limits across replicas; nil keeps them in memory.
	Redis redis.UniversalClient
	// OnStoreError applies while Redis fails. Default FailLocal.
	OnStoreError FailMode
	// StoreTimeout bounds one decision's wait for Redis. Default 50 ms.
	StoreTimeout time.Duration
	// FailureThreshold consecutive store failures start a cool-down.
	// Default 3.
	FailureThreshold int
	// Cooldown is how long Redis is left alone after that; then one
	// probe decides whether to return to it. Default 5 s.
	Cooldown time.Duration
	// MaxKeys caps the memory store (and the local fallback). Default
	// DefaultMaxKeys.
	MaxKeys int
	// KeyPrefix starts every Redis key. Default "sidecar".
	KeyPrefix string
	// Heartbeat is how often this replica announces itself in Redis; a
	// replica unseen for 3 heartbeats no longer counts. Default 2 s.
	Heartbeat time.Duration
	// MaxBatch caps the decisions sent in one batch: one script call, or
	// on a cluster one pipeline of a script call per hash slot. Default 128.
	MaxBatch int
	// Now is the clock; tests pass a fake one. Default time.Now.
	Now func() time.Time
	// Logger gets one line per switch to and from the fallback.
	Logger *slog.Logger
	// Metrics receives the limiter's series. Default: a private set.
	Metrics *metrics.Set

	// Lease turns on quota leases (with Redis only): for a hot client, a
	// replica takes a slice of the remaining quota in one call and spends
	// it in memory, giving back what it did not spend. Cold clients are
	// decided one request at a time as without leases. See lease.go for
	// the sizing and the bound. Default false.
	Lease bool
	// LeaseOvershoot is the share of a limit that the leases of all live
	// replicas may hold at once for one client; it bounds how far a window
	// can go over the limit. Default 0.01.
	LeaseOvershoot float64
	// LeaseDuration is how long a lease may be spent; units left then go
	// back to Redis. It is also the span over which a client's request
	// rate is measured to size its leases. Default 1 s.
	LeaseDuration time.Duration
	// MaxLeaseKeys caps the clients whose rate and lease a replica tracks.
	// Default 10,000.
	MaxLeaseKeys int
}

// Limiter makes rate-limit decisions against its store, and keeps doing so
// when the store fails. It is safe for concurrent use.
type Limiter struct {
	s      Settings
	mem    *Memory // the store without Redis; the local fallback with it
	store  *redisStore
	calls  chan *call
	denied denyCache
	// gcraRefunds counts the GCRA refunds in flight (refundToStore).
	gcraRefunds atomic.Int32
	// leases holds this replica's leases and the request rates that size
	// them, for at most MaxLeaseKeys clients; nil unless Settings.Lease
	// and Redis.
	leases *shardedMap[*leaseEntry]

	failures  atomic.Int32
	openUntil atomic.Int64 // unix ms; while in the future, Redis is not called
	probing   atomic.Bool
	replicas  atomic.Int64 // live replicas, as last seen in Redis
	replicaID string

	m    limiterMetrics
	stop chan struct{}
	wg   sync.WaitGroup
}

type limiterMetrics struct {
	storeDuration *metrics.PrometheusHistogram
	storeErrors   *metrics.Counter
	commands      *metrics.Counter
	toFallback    *metrics.Counter
	toStore       *metrics.Counter
	denyCacheHits *metrics.Counter
	evictions     *metrics.Counter

	leases        *metrics.Counter
	unitsGranted  *metrics.Counter
	unitsReturned *metrics.Counter
	unitsExpired  *metrics.Counter
}

// callKind says what a call asks of Redis.
type callKind uint8

const (
	decide      callKind = iota // one request's decision
	lease                       // a lease of up to cost units
	returnUnits                 // cost unspent units of a lease, back into sub-window idx
)

// call is one request to Redis waiting for the batcher. A decision or a
// lease has a waiter, signalled on done; a returnUnits has none: the batcher
// accounts for it and puts it back in the pool.
type call struct {
	key     string
	rule    Rule
	kind    callKind
	cost    int
	idx     int64 // returnUnits: the grant's sub-window; lease: set from the reply
	granted int   // lease: units granted; returnUnits: units Redis took back
	d       Decision
	err     error
	done    chan struct{}
	timer   *time.Timer // request's wait for done; nil until the first
}

var callPool = sync.Pool{New: func() any { return &call{done: make(chan struct{}, 1)} }}

// New returns a Limiter; Close releases it.
func New(s Settings) *Limiter {
	if s.StoreTimeout <= 0 {
		s.StoreTimeout = 50 * time.Millisecond
	}
	if s.FailureThreshold <= 0 {
		s.FailureThreshold = 3
	}
	if s.Cooldown <= 0 {
		s.Cooldown = 5 * time.Second
	}
	if s.KeyPrefix == "" {
		s.KeyPrefix = "sidecar"
	}
	if s.Heartbeat <= 0 {
		s.Heartbeat = 2 * time.Second
	}
	if s.MaxBatch <= 0 {
		s.MaxBatch = 128
	}
	if s.Now == nil {
		s.Now = time.Now
	}
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	shared := s.Metrics != nil
	if s.Metrics == nil {
		s.Metrics = metrics.NewSet()
	}
	if s.LeaseOvershoot <= 0 {
		s.LeaseOvershoot = 0.01
	}
	if s.LeaseDuration <= 0 {
		s.LeaseDuration = time.Second
	}
	if s.MaxLeaseKeys <= 0 {
		s.MaxLeaseKeys = 10_000
	}
	var id [6]byte
	_, _ = rand.Read(id[:])
	l := &Limiter{s: s, mem: NewMemory(s.MaxKeys), stop: make(chan struct{}), replicaID: hex.EncodeToString(id[:])}
	l.replicas.Store(1)
	set := s.Metrics
	l.m = limiterMetrics{
		storeDuration: set.GetOrCreatePrometheusHistogramExt(`sidecar_ratelimit_store_duration_seconds`,
			metrics.ExponentialBuckets(0.00005, 2, 14)),
		storeErrors:   set.GetOrCreateCounter(`sidecar_ratelimit_store_errors_total`),
		commands:      set.GetOrCreateCounter(`sidecar_ratelimit_store_commands_total`),
		toFallback:    set.GetOrCreateCounter(`sidecar_ratelimit_store_switches_total{to="fallback"}`),
		toStore:       set.GetOrCreateCounter(`sidecar_ratelimit_store_switches_total{to="store"}`),
		denyCacheHits: set.GetOrCreateCounter(`sidecar_ratelimit_deny_cache_hits_total`),
		evictions:     set.GetOrCreateCounter(`sidecar_ratelimit_memory_evictions_total`),
		leases:        set.GetOrCreateCounter(`sidecar_ratelimit_leases_total`),
		unitsGranted:  set.GetOrCreateCounter(`sidecar_ratelimit_lease_units_total{outcome="granted"}`),
		unitsReturned: set.GetOrCreateCounter(`sidecar_ratelimit_lease_units_total{outcome="returned"}`),
		unitsExpired:  set.GetOrCreateCounter(`sidecar_ratelimit_lease_units_total{outcome="expired"}`),
	}
	l.mem.evicted = l.m.evictions.Inc
	l.denied.init()
	if s.Redis != nil {
		redisLogOnce.Do(func() { redis.SetLogger(&quietRedisLog{log: s.Logger}) })
		l.store = newRedisStore(s.Redis, s.KeyPrefix)
		l.calls = make(chan *call, 4096)
		// One batcher: measured on loopback with Redis on a shared core,
		// four in flight did no better than one; across a real network a
		// decision waits at most two round trips either way.
		l.wg.Add(2)
		go l.batcher()
		go l.heartbeat()
		if s.Lease {
			l.leases = newShardedMap[*leaseEntry](leaseShards, s.MaxLeaseKeys)
			l.every(max(s.LeaseDuration/2, 5*time.Millisecond), func(now time.Time) { l.sweepLeases(now.UnixMilli()) })
		}
	}
	l.gauges(set, shared)
	l.every(10*time.Second, l.sweep)
	return l
}

// gaugeOwners holds, per metrics set given in Settings, the limiter its
// gauges read: the one created last on it. A gauge is registered once per
// set, with its function; a reload that rebuilds the limiter creates the
// new one before it closes the old, and the gauges follow the new one
// instead of reading the closed one for ever.
var gaugeOwners sync.Map // *metrics.Set → *atomic.Pointer[Limiter]

func (l *Limiter) gauges(set *metrics.Set, shared bool) {
	owner := new(atomic.Pointer[Limiter])
	if shared {
		v, _ := gaugeOwners.LoadOrStore(set, owner)
		owner = v.(*atomic.Pointer[Limiter])
	}
	owner.Store(l)
	gauge := func(name string, f func(l *Limiter) float64) {
		set.GetOrCreateGauge(name, func() float64 { return f(owner.Load()) })
	}
	gauge(`sidecar_ratelimit_store_cooldown`, func(l *Limiter) float64 {
		if l.coolingDown(l.s.Now().UnixMilli()) {
			return 1
		}
		return 0
	})
	gauge(`sidecar_ratelimit_memory_keys`, func(l *Limiter) float64 { return float64(l.mem.Len()) })
	gauge(`sidecar_ratelimit_live_replicas`, func(l *Limiter) float64 { return float64(l.replicas.Load()) })
	gauge(`sidecar_ratelimit_lease_keys`, func(l *Limiter) float64 {
		if l.leases == nil {
			return 0
		}
		return float64(l.leases.Len())
	})
}

// Close stops the limiter's goroutines and withdraws this replica from the
// heartbeat set. It does not close the Redis client.
func (l *Limiter) Close() {
	close(l.stop)
	l.wg.Wait()
	if l.store != nil {
		ctx, cancel := context.WithTimeout(context.Background(), l.s.StoreTimeout)
		defer cancel()
		l.returnAll(ctx)
		_ = l.store.rdb.ZRem(ctx, l.replicasKey(), l.replicaID).Err()
	}
}

// CoolingDown reports whether Redis is being left alone after failures.
func (l *Limiter) CoolingDown() bool { return l.coolingDown(l.s.Now().UnixMilli()) }

func (l *Limiter) coolingDown(nowMs int64) bool { return l.openUntil.Load() > nowMs }

// Allow decides whether one request of key fits rule. It always returns a
// decision: store failures are handled here (OnStoreError), never passed up.
// A rule without a positive limit and window admits everything (policy
// never builds one).
func (l *Limiter) Allow(key string, rule Rule) (Decision, Source) {
	if !rule.valid() {
		return Decision{Allowed: true}, FromMemory
	}
	now := l.s.Now()
	if l.store == nil {
		return l.mem.AllowAt(key, rule, now, 1), FromMemory
	}
	nowMs := now.UnixMilli()
	if until, ok := l.denied.get(key, nowMs); ok {
		return l.denyCached(rule, until, nowMs), FromDenyCache
	}
	if l.leases != nil {
		if d, src, ok := l.allowLeased(key, rule, now); ok {
			return d, src
		}
	}
	if l.coolingDown(nowMs) || (l.openUntil.Load() != 0 && !l.probing.CompareAndSwap(false, true)) {
		return l.fallback(key, rule, now), FromFallback
	}
	d, err := l.ask(key, rule)
	if err != nil {
		l.failed(nowMs, err)
		return l.fallback(key, rule, now), FromFallback
	}
	l.succeeded()
	if !d.Allowed && d.RetryAfter > 0 {
		l.denied.put(key, nowMs+d.RetryAfter.Milliseconds())
	}
	return d, FromStore
}

// Denied reports whether key is known to be over rule's limit, from this
// replica's memory alone (see Remember; with Redis, also what Allow saw
// Redis deny): no store call, nothing charged. It is for checks that must
// cost less than the work a denial spares.
func (l *Limiter) Denied(key string, rule Rule) (Decision, bool) {
	nowMs := l.s.Now().UnixMilli()
	until, ok := l.denied.get(key, nowMs)
	if !ok {
		return Decision{}, false
	}
	return l.denyCached(rule, until, nowMs), true
}

// Remember makes Denied report key for as long as denial d says to wait.
func (l *Limiter) Remember(key string, d Decision) {
	if !d.Allowed && d.RetryAfter > 0 {
		l.denied.put(key, l.s.Now().UnixMilli()+d.RetryAfter.Milliseconds())
	}
}

func (l *Limiter) denyCached(rule Rule, until, nowMs int64) Decision {
	l.m.denyCacheHits.Inc()
	return Decision{Limit: rule.Limit, RetryAfter: time.Duration(until-nowMs) * time.Millisecond,
		ResetAfter: time.Duration(until-nowMs) * time.Millisecond}
}

// ask sends one decision to Redis, batched with whatever else is waiting.
func (l *Limiter) ask(key string, rule Rule) (Decision, error) {
	d, _, _, err := l.request(key, rule, decide, 1)
	return d, err
}

// request sends one decision (kind decide, n 1) or one lease request
// (kind lease, up to n units) to Redis, batched with whatever else is
// waiting; GCRA calls go alone. A lease also returns the units granted
// and, for a sliding window, the sub-window they were recorded in.
func (l *Limiter) request(key string, rule Rule, kind callKind, n int) (d Decision, granted int, idx int64, err error) {
	start := time.Now()
	defer func() { l.m.storeDuration.UpdateDuration(start) }()
	if rule.Algorithm == GCRA {
		ctx, cancel := context.WithTimeout(context.Background(), l.s.StoreTimeout)
		defer cancel()
		l.m.commands.Inc()
		if kind == lease {
			d, granted, err = l.store.gcraLease(ctx, key, rule, n)
			return d, granted, 0, err
		}
		d, err = l.store.gcraAllow(ctx, key, rule, 1)
		return d, 0, 0, err
	}
	c := callPool.Get().(*call)
	c.key, c.rule, c.kind, c.cost, c.idx, c.granted, c.err = key, rule, kind, n, 0, 0, nil
	select {
	case l.calls <- c:
	default:
		callPool.Put(c)
		return Decision{}, 0, 0, errQueueFull
	}
	// The timer goes with the pooled call (a new one allocates). Since Go
	// 1.23 Reset and Stop leave no stale tick in its channel.
	if c.timer == nil {
		c.timer = time.NewTimer(l.s.StoreTimeout * 2)
	} else {
		c.timer.Reset(l.s.StoreTimeout * 2)
	}
	select {
	case <-c.done:
		c.timer.Stop()
		d, granted, idx, err = c.d, c.granted, c.idx, c.err
		callPool.Put(c)
		return d, granted, idx, err
	case <-c.timer.C:
		// The batcher still owns c and will signal it; leave it to the GC.
		// A lease granted meanwhile is lost: its units stay counted in
		// Redis until they leave the window (on the side of denying).
		return Decision{}, 0, 0, errStoreTimeout
	}
}

var (
	errQueueFull    = fmt.Errorf("limiter: decision queue full")
	errStoreTimeout = fmt.Errorf("limiter: store did not answer in time")
	errClosed       = fmt.Errorf("limiter: closed")
)

// batcher sends waiting decisions to Redis: each round takes everything
// queued (up to MaxBatch) and sends it as one batch (slidingBatch: one
// script call, or one per hash slot on a cluster). Under load that is
// many decisions per round trip; when idle, a lone decision goes at once.
func (l *Limiter) batcher() {
	defer l.wg.Done()
	batch := make([]*call, 0, l.s.MaxBatch)
	for {
		select {
		case <-l.stop:
			return
		case c := <-l.calls:
			batch = append(batch[:0], c)
		}
	fill:
		for len(batch) < l.s.MaxBatch {
			select {
			case c := <-l.calls:
				batch = append(batch, c)
			default:
				break fill
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), l.s.StoreTimeout)
		l.m.commands.Inc()                  // one batch: one write and one round trip
		l.store.slidingBatch(ctx, batch, 0) // each call gets its own decision or error
		cancel()
		for _, c := range batch {
			if c.kind == returnUnits {
				l.countReturned(c)
				callPool.Put(c)
				continue
			}
			c.done <- struct{}{}
		}
	}
}

func (l *Limiter) failed(nowMs int64, err error) {
	l.m.storeErrors.Inc()
	if l.probing.Load() {
		// The probe after a cool-down failed: cool down again.
		l.openUntil.Store(nowMs + l.s.Cooldown.Milliseconds())
		l.probing.Store(false)
		return
	}
	if int(l.failures.Add(1)) == l.s.FailureThreshold {
		l.openUntil.Store(nowMs + l.s.Cooldown.Milliseconds())
		l.m.toFallback.Inc()
		l.s.Logger.Warn("rate-limit store failing: deciding locally during a cool-down",
			"error", err.Error(), "cooldown", l.s.Cooldown.String(), "on_store_error", l.modeName(),
			"replicas_share", l.replicas.Load())
	}
}

func (l *Limiter) succeeded() {
	if l.probing.Load() || l.openUntil.Load() != 0 {
		l.openUntil.Store(0)
		l.probing.Store(false)
		l.m.toStore.Inc()
		l.s.Logger.Info("rate-limit store is back: decisions are shared again")
	}
	l.failures.Store(0)
}

func (l *Limiter) modeName() string {
	switch l.s.OnStoreError {
	case FailAllow:
		return "allow"
	case FailDeny:
		return "deny"
	}
	return "local"
}

// fallback decides without Redis, per OnStoreError. Local gives each
// replica its share: with N replicas alive before the outage, each admits
// at most limit/N in memory, so the fleet stays within the limit.
func (l *Limiter) fallback(key string, rule Rule, now time.Time) Decision {
	switch l.s.OnStoreError {
	case FailAllow:
		return Decision{Allowed: true, Limit: rule.Limit, Remaining: rule.Limit}
	case FailDeny:
		return Decision{Limit: rule.Limit, RetryAfter: l.s.Cooldown, ResetAfter: l.s.Cooldown}
	}
	d := l.mem.AllowAt(key, l.localShare(rule), now, 1)
	d.Limit = rule.Limit
	return d
}

// localShare is this replica's share of rule under FailLocal.
func (l *Limiter) localShare(rule Rule) Rule {
	share := rule
	if n := int(l.replicas.Load()); n > 1 {
		share.Limit = max(1, rule.Limit/n)
		if share.Burst > 0 {
			share.Burst = max(1, share.Burst/n)
		}
	}
	return share
}

func (l *Limiter) replicasKey() string { return "{" + l.s.KeyPrefix + ":replicas}" }

// heartbeat keeps this replica in a sorted set in Redis (one key, so it
// works on Cluster) and counts the replicas seen recently. The count is
// what FailLocal divides by during an outage.
func (l *Limiter) heartbeat() {
	defer l.wg.Done()
	t := time.NewTicker(l.s.Heartbeat)
	defer t.Stop()
	for {
		if !l.coolingDown(l.s.Now().UnixMilli()) {
			ctx, cancel := context.WithTimeout(context.Background(), l.s.StoreTimeout*2)
			nowMs := l.s.Now().UnixMilli()
			pipe := l.store.rdb.TxPipeline()
			key := l.replicasKey()
			pipe.ZAdd(ctx, key, redis.Z{Score: float64(nowMs), Member: l.replicaID})
			pipe.ZRemRangeByScore(ctx, key, "-inf", strconv.FormatInt(nowMs-3*l.s.Heartbeat.Milliseconds(), 10))
			card := pipe.ZCard(ctx, key)
			pipe.PExpire(ctx, key, 10*l.s.Heartbeat)
			if _, err := pipe.Exec(ctx); err == nil {
				l.replicas.Store(max(1, card.Val()))
			}
			cancel()
		}
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
	}
}

var redisLogOnce sync.Once

// quietRedisLog routes go-redis' own log lines (one per failed dial, which
// is a flood while Redis is down) to slog at debug level, at most one per
// 10 s; the limiter logs the switches that matter itself.
type quietRedisLog struct {
	log  *slog.Logger
	last atomic.Int64
}

func (q *quietRedisLog) Printf(_ context.Context, format string, v ...any) {
	now := time.Now().UnixMilli()
	if last := q.last.Load(); now-last < 10_000 || !q.last.CompareAndSwap(last, now) {
		return
	}
	q.log.Debug("go-redis", "msg", fmt.Sprintf(format, v...))
}

// sweep drops the memory states and deny-cache entries expired at now.
// New runs it every 10 s.
func (l *Limiter) sweep(now time.Time) {
	l.mem.Sweep(now)
	l.denied.sweep(now.UnixMilli())
}

// every runs f with the time every d, on a goroutine of its own, until
// Close.
func (l *Limiter) every(d time.Duration, f func(now time.Time)) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-l.stop:
				return
			case <-t.C:
				f(l.s.Now())
			}
		}
	}()
}

// denyCache remembers clients Redis denied, until their retry time, so
// that an abusive client costs one Redis call per retry period instead of
// one per request. It never over-admits: other replicas can only push the
// client's state later. A full shard takes no new clients (nor new retry
// times) until its entries expire.
type denyCache struct {
	m *shardedMap[int64] // key → unix ms until which it is denied
}

const (
	denyShards   = 16
	denyCacheMax = denyShards * 65536 // 65,536 per shard
)

func (c *denyCache) init() { c.m = newShardedMap[int64](denyShards, denyCacheMax) }

func (c *denyCache) get(key string, nowMs int64) (int64, bool) {
	s := c.m.shard(key)
	s.mu.Lock()
	until, ok := s.m[key]
	if ok && until <= nowMs {
		delete(s.m, key)
		ok = false
	}
	s.mu.Unlock()
	return until, ok
}

func (c *denyCache) put(key string, until int64) {
	s := c.m.shard(key)
	s.mu.Lock()
	if !c.m.full(s) {
		s.m[key] = until
	}
	s.mu.Unlock()
}

func (c *denyCache) sweep(nowMs int64) {
	c.m.sweep(func(_ string, until int64) bool { return until > nowMs })
}
