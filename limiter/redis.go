package limiter

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
)

// slidingWindowLua is slide() in Redis: one key, one round trip. ARGV:
// limit, window_ms, cost, now (ms; empty for Redis' TIME), Subwindows
// (luaWindowStart reads the 2nd, 4th and 5th). It returns {allowed,
// remaining, retry_ms, reset_ms}.
//
// With ARGV[6] = "1" it grants a quota lease instead: asked for cost
// units, it admits g = min(cost, limit - total) of them at once, recorded
// in the current sub-window exactly as g single admissions would be, and
// returns {1, remaining, 0, reset_ms, g, sub-window}; when nothing is left
// it is the denial of one request, {0, remaining, retry_ms, reset_ms, 0,
// sub-window}. Without ARGV[6] the decisions are those of slide().
//
// The key is a string: a 24-byte header (newest sub-window written, total
// admissions in the window, newest sub-window with an admission) and a
// ring of k+1 counters, one per sub-window of [cur-k, cur]. A decision
// reads and writes only the header and the slots it touches (GETRANGE,
// SETRANGE), so it costs O(sub-windows elapsed since the client's last
// request), not O(k); a hash with a field per sub-window cost ~14 µs of
// Redis time per decision for a busy client.
var slidingWindowLua = redis.NewScript(luaWindowStart + `
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[3])
local size = 24 + 8 * ring
local hdr = redis.call('GETRANGE', key, 0, 23)
local head, total, last
local fresh = string.len(hdr) ~= 24 or redis.call('STRLEN', key) ~= size
if not fresh then
  head, total, last = struct.unpack('<ddd', hdr)
  fresh = cur - head >= ring
end
local writes = {}
local function read(idx)
  local off = 24 + 8 * (idx % ring)
  if writes[off] then return writes[off] end
  if fresh then return 0 end
  return (struct.unpack('<d', redis.call('GETRANGE', key, off, off + 7)))
end
if fresh then
  -- nothing recorded is still inside the window: start afresh
  head, total, last = cur, 0, -1
elseif cur > head then
  -- the sub-windows after head reuse slots of expired ones: clear them
  for idx = head + 1, cur do
    local c = read(idx)
    if c ~= 0 then
      total = total - c
      writes[24 + 8 * (idx % ring)] = 0
    end
  end
  head = cur
end
local function flush(ttl)
  if fresh then
    redis.call('SET', key, string.rep('\0', size), 'PX', ttl)
  else
    redis.call('PEXPIRE', key, ttl)
  end
  redis.call('SETRANGE', key, 0, struct.pack('<ddd', head, total, last))
  for off, c in pairs(writes) do
    redis.call('SETRANGE', key, off, struct.pack('<d', c))
  end
end
local lease = ARGV[6] == '1'
if lease then
  -- a partial grant; with nothing left, the denial of one request
  cost = math.max(1, math.min(cost, limit - total))
end
if total + cost > limit then
  local retry_at = now + window
  local freed = 0
  for idx = cur - k, cur do
    freed = freed + read(idx)
    if total - freed + cost <= limit then
      retry_at = (idx + k + 1) * w
      break
    end
  end
  local reset = 0
  if last >= 0 and total > 0 then reset = math.max(0, (last + k + 1) * w - now) end
  if next(writes) ~= nil then flush(math.max(1, reset) + 1) end
  if lease then
    return {0, math.max(0, limit - total), math.max(1, retry_at - now), reset, 0, cur}
  end
  return {0, math.max(0, limit - total), math.max(1, retry_at - now), reset}
end
writes[24 + 8 * (cur % ring)] = read(cur) + cost
total = total + cost
last = cur
local reset = math.max(0, (last + k + 1) * w - now)
flush(reset + 1)
if lease then
  return {1, limit - total, 0, reset, cost, cur}
end
return {1, limit - total, 0, reset}
`)

// leaseReturnLua gives back units of a lease that were not spent:
// KEYS[1] the client's key; ARGV: the grant's sub-window, window_ms,
// units, now (ms; empty for Redis' TIME), Subwindows, laid out as
// slidingWindowLua's for luaWindowStart. It subtracts them from the
// sub-window the grant was recorded in, and from the total, only while
// that sub-window still counts: once it has left the window (or its slot
// was reused, or the key was created afresh since the grant) the units
// have expired with it and nothing changes. A count never goes below
// zero, and the key keeps its TTL (SETRANGE does not touch it). It
// returns the units subtracted.
var leaseReturnLua = redis.NewScript(luaWindowStart + `
local idx = tonumber(ARGV[1])
local units = tonumber(ARGV[3])
if units <= 0 or idx > cur or cur - idx > k then return 0 end
if redis.call('STRLEN', key) ~= 24 + 8 * ring then return 0 end
local head, total, last = struct.unpack('<ddd', redis.call('GETRANGE', key, 0, 23))
if idx > head or head - idx > k then return 0 end
local off = 24 + 8 * (idx % ring)
local c = struct.unpack('<d', redis.call('GETRANGE', key, off, off + 7))
local r = math.min(units, c, total)
if r <= 0 then return 0 end
redis.call('SETRANGE', key, off, struct.pack('<d', c - r))
redis.call('SETRANGE', key, 0, struct.pack('<ddd', head, total - r, last))
return r
`)

// luaWindowStart is the start both window scripts share, with their
// KEYS and ARGV layout: the client's key from KEYS[1], the window in ms
// from ARGV[2], now in ms from ARGV[4], or from Redis' TIME when it is
// empty, and the sub-window geometry as geometry() computes it from
// ARGV[5] (Subwindows) — width w, k counted sub-windows, a ring of k+1
// slots, the current sub-window cur.
const luaWindowStart = `local key = KEYS[1]
local window = tonumber(ARGV[2])
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local w = math.max(1, math.floor(window / tonumber(ARGV[5])))
local k = math.floor((window + w - 1) / w)
local ring = k + 1
local cur = math.floor(now / w)
`

// RedisMode is how Redis is deployed.
type RedisMode uint8

const (
	RedisSingle   RedisMode = iota // one server
	RedisCluster                   // Redis Cluster
	RedisSentinel                  // a primary and replicas watched by Redis Sentinel
)

// RedisOptions says how to reach Redis. Zero values are the defaults. The
// caller validates them (policy does: addresses present, one for single,
// db 0 on a cluster, a master name exactly for sentinel); this package
// does not check them a second time.
type RedisOptions struct {
	// Mode is RedisSingle (default), RedisCluster or RedisSentinel.
	Mode RedisMode
	// Addrs are, by mode: the server (single, exactly one); seed nodes
	// (cluster: any one that answers tells the whole topology); the
	// sentinels (sentinel). Required.
	Addrs []string
	// MasterName is the primary's name in the sentinels' configuration
	// (`sentinel monitor NAME ...`). Required for sentinel, refused
	// otherwise.
	MasterName string
	// Username and Password authenticate to the data nodes (an ACL user;
	// no username is Redis' "default" user). Default: none. They come
	// from the environment, never from the config file.
	Username string
	Password string
	// SentinelPassword authenticates to the sentinels (their
	// requirepass). Default: none.
	SentinelPassword string
	// DB selects the database (single and sentinel). Redis Cluster has
	// only db 0: any other value is refused. Default 0.
	DB int
	// TLS, when set, is used for every connection (data nodes and
	// sentinels). Default: plain TCP.
	TLS *tls.Config
	// Timeout bounds every command (dial, read, write). Default 50 ms.
	Timeout time.Duration
}

// NewRedisClient returns a go-redis client for o.Mode, tuned to fail fast:
// go-redis' defaults take ~2 s per call to fail while Redis is down (dial
// retries and command retries), which would add seconds to every request.
//
//   - single: redis.NewClient.
//   - cluster: redis.NewClusterClient. Every command goes to the primary
//     of its slot (ReadOnly false: the limiter writes on every decision, so
//     RouteByLatency and RouteRandomly, which only move reads to replicas,
//     do not apply). MaxRedirects stays at 3: in a ClusterClient, MaxRetries
//     only sets the node clients' own retries, while the cluster loop
//     follows MOVED/ASK (after a failover or a resharding) and retries
//     network errors up to MaxRedirects times; -1 there would turn every
//     redirect into an error. Its retries run without back-off sleeps
//     (MinRetryBackoff -1): a redirect costs one more round trip, and a
//     dead node a few refused dials, not a sleep through Timeout.
//   - sentinel: redis.NewFailoverClient. Each new connection asks a
//     sentinel for the primary, and a +switch-master event closes the
//     connections to the old one.
func NewRedisClient(o RedisOptions) redis.UniversalClient {
	if o.Timeout <= 0 {
		o.Timeout = 50 * time.Millisecond
	}
	const (
		poolSize     = 64
		minIdleConns = 4
	)
	switch o.Mode {
	case RedisCluster:
		return redis.NewClusterClient(&redis.ClusterOptions{
			Addrs:    o.Addrs,
			Username: o.Username, Password: o.Password, TLSConfig: o.TLS,
			DialTimeout: o.Timeout, ReadTimeout: o.Timeout, WriteTimeout: o.Timeout, PoolTimeout: o.Timeout,
			ContextTimeoutEnabled: true,
			MaxRedirects:          3,
			MaxRetries:            -1,
			MinRetryBackoff:       -1,
			DialerRetries:         1,
			PoolSize:              poolSize, MinIdleConns: minIdleConns, // per node
		})
	case RedisSentinel:
		return redis.NewFailoverClient(&redis.FailoverOptions{
			MasterName: o.MasterName, SentinelAddrs: o.Addrs, SentinelPassword: o.SentinelPassword,
			Username: o.Username, Password: o.Password, DB: o.DB, TLSConfig: o.TLS,
			DialTimeout: o.Timeout, ReadTimeout: o.Timeout, WriteTimeout: o.Timeout, PoolTimeout: o.Timeout,
			ContextTimeoutEnabled: true,
			MaxRetries:            -1,
			DialerRetries:         1,
			PoolSize:              poolSize, MinIdleConns: minIdleConns,
		})
	default:
		return redis.NewClient(&redis.Options{
			Addr:     o.Addrs[0],
			Username: o.Username, Password: o.Password, DB: o.DB, TLSConfig: o.TLS,
			DialTimeout: o.Timeout, ReadTimeout: o.Timeout, WriteTimeout: o.Timeout, PoolTimeout: o.Timeout,
			ContextTimeoutEnabled: true,
			MaxRetries:            -1, // a retry is the caller's decision: we fall back instead
			DialerRetries:         1,
			PoolSize:              poolSize, MinIdleConns: minIdleConns,
		})
	}
}

// redisStore runs decisions against Redis.
type redisStore struct {
	rdb     redis.UniversalClient
	cluster *redis.ClusterClient // rdb, when it is one
	gcra    *redis_rate.Limiter
	prefix  string

	lastRefresh atomic.Int64 // unix ms of the last cluster topology refresh
}

func newRedisStore(rdb redis.UniversalClient, prefix string) *redisStore {
	s := &redisStore{rdb: rdb, gcra: redis_rate.NewLimiter(rdb), prefix: prefix}
	s.cluster, _ = rdb.(*redis.ClusterClient)
	return s
}

// key puts the whole client key in a hash tag, so that every key of one
// decision lives in one slot and the scripts run on Redis Cluster as is.
func (s *redisStore) key(k string) string {
	return s.prefix + ":rl:{" + k + "}"
}

// decisionFromReply converts the sliding-window script's reply; for a
// lease it also returns the units granted and the sub-window they were
// recorded in.
func decisionFromReply(limit int, v any, leased bool) (d Decision, granted int, idx int64, err error) {
	want := 4
	if leased {
		want = 6
	}
	n, err := replyInts(v, want)
	if err != nil {
		return Decision{}, 0, 0, err
	}
	d = Decision{Allowed: n[0] == 1, Limit: limit, Remaining: int(n[1]),
		RetryAfter: time.Duration(n[2]) * time.Millisecond, ResetAfter: time.Duration(n[3]) * time.Millisecond}
	if leased {
		granted, idx = int(n[4]), n[5]
	}
	return d, granted, idx, nil
}

// replyInts reads a script's array reply of want integers.
func replyInts(v any, want int) ([]int64, error) {
	arr, ok := v.([]any)
	if !ok || len(arr) != want {
		return nil, fmt.Errorf("limiter: unexpected script reply %v", v)
	}
	n := make([]int64, want)
	for i, x := range arr {
		switch t := x.(type) {
		case int64:
			n[i] = t
		case string:
			n[i], _ = strconv.ParseInt(t, 10, 64)
		default:
			return nil, fmt.Errorf("limiter: unexpected script reply %v", v)
		}
	}
	return n, nil
}

func nowArg(nowMs int64) string {
	if nowMs == 0 {
		return ""
	}
	return strconv.FormatInt(nowMs, 10)
}

// onceMoreIfLost runs call, and once more after reloading a cluster's slot
// map when a node was unreachable (a failover moved its slots).
func (s *redisStore) onceMoreIfLost(ctx context.Context, call func() error) error {
	err := call()
	if err != nil && s.cluster != nil && unreachable(err) && ctx.Err() == nil {
		s.refreshCluster(ctx)
		err = call()
	}
	return err
}

// gcraAllow runs redis_rate's GCRA for one decision. redis_rate falls
// back from EVALSHA to EVAL by itself on NOSCRIPT.
func (s *redisStore) gcraAllow(ctx context.Context, key string, rule Rule, cost int) (Decision, error) {
	d, _, err := s.gcraRun(ctx, s.gcra.AllowN, key, rule, cost)
	return d, err
}

// gcraLease takes up to n units of a GCRA rule at once with redis_rate's
// AllowAtMost: the bucket is charged at once for what is granted, so
// units cannot be given back. When fewer than n are left the script
// charges the fractional token too but grants only whole ones (a partial
// grant wastes less than one token), and with less than one left it is a
// denial with its retry time. It returns the decision and the units
// granted (0 when denied).
func (s *redisStore) gcraLease(ctx context.Context, key string, rule Rule, n int) (Decision, int, error) {
	d, granted, err := s.gcraRun(ctx, s.gcra.AllowAtMost, key, rule, n)
	if err == nil && !d.Allowed {
		d.RetryAfter = max(time.Millisecond, d.RetryAfter)
		granted = 0
	}
	return d, granted, err
}

// gcraRun makes one redis_rate call (AllowN or AllowAtMost) for n units
// of rule on key, once more if a cluster node was lost, and returns the
// decision and the units the call granted.
func (s *redisStore) gcraRun(ctx context.Context, call func(context.Context, string, redis_rate.Limit, int) (*redis_rate.Result, error),
	key string, rule Rule, n int) (Decision, int, error) {
	limit := redis_rate.Limit{Rate: rule.Limit, Period: rule.Window, Burst: rule.burst()}
	var res *redis_rate.Result
	err := s.onceMoreIfLost(ctx, func() (err error) {
		res, err = call(ctx, s.key(key), limit, n)
		return err
	})
	if err != nil {
		return Decision{}, 0, err
	}
	d := Decision{Allowed: res.Allowed > 0, Limit: rule.burst(), Remaining: res.Remaining, ResetAfter: res.ResetAfter}
	if !d.Allowed {
		d.RetryAfter = res.RetryAfter
	}
	return d, res.Allowed, nil
}

// slidingBatch runs many sliding-window decisions in one pipeline: one
// round trip and one write for all of them (on a cluster, one per primary
// holding some of the keys, in parallel). nowMs 0 means Redis' clock.
// Each call gets its own decision or error; calls that failed only
// because of where they were sent get one more try within ctx:
//   - NOSCRIPT: after a restart or failover the script cache is empty
//     (Redis does not replicate it), and a pipeline of EVALSHA does not
//     fall back to EVAL: the script is loaded and those calls run again;
//   - a cluster node that cannot be reached: see refreshCluster.
//
// Only the failed calls run again, never the whole batch, so a decision
// that Redis counted is not counted twice. A call whose reply was lost
// after Redis ran it (a connection cut mid-reply) may be: the error is on
// the side of denying. For that reason a lease return runs again only
// after NOSCRIPT (it certainly did not run): counted twice, it would
// free units that were spent.
func (s *redisStore) slidingBatch(ctx context.Context, calls []*call, nowMs int64) {
	s.slidingRun(ctx, calls, nowMs)
	var again []*call
	noScript, lost := false, false
	for _, c := range calls {
		switch {
		case c.err == nil:
		case isNoScript(c.err):
			noScript = true
			again = append(again, c)
		case s.cluster != nil && unreachable(c.err) && c.kind != returnUnits:
			lost = true
			again = append(again, c)
		}
	}
	if len(again) == 0 || ctx.Err() != nil {
		return
	}
	switch {
	case lost:
		s.refreshCluster(ctx) // loads the script on the primaries too
	case noScript:
		_ = s.loadScript(ctx) // a shard that fails here fails the rerun
	}
	if ctx.Err() == nil {
		s.slidingRun(ctx, again, nowMs)
	}
}

// slidingRun sends one pipeline and gives each call its decision or error.
func (s *redisStore) slidingRun(ctx context.Context, calls []*call, nowMs int64) {
	pipe := s.rdb.Pipeline()
	cmds := make([]*redis.Cmd, len(calls))
	for i, c := range calls {
		keys := []string{s.key(c.key)}
		switch c.kind {
		case decide:
			cmds[i] = slidingWindowLua.EvalSha(ctx, pipe, keys,
				c.rule.Limit, c.rule.Window.Milliseconds(), c.cost, nowArg(nowMs), Subwindows)
		case lease:
			cmds[i] = slidingWindowLua.EvalSha(ctx, pipe, keys,
				c.rule.Limit, c.rule.Window.Milliseconds(), c.cost, nowArg(nowMs), Subwindows, "1")
		case returnUnits:
			cmds[i] = leaseReturnLua.EvalSha(ctx, pipe, keys,
				c.idx, c.rule.Window.Milliseconds(), c.cost, nowArg(nowMs), Subwindows)
		}
	}
	// Errors are per command, except when no connection could be set up
	// (a refused password, a failed TLS handshake): then go-redis leaves
	// the commands unsent, without error or reply, and only Exec says why.
	_, execErr := pipe.Exec(ctx)
	for i, c := range calls {
		err := cmds[i].Err()
		if err == nil && cmds[i].Val() == nil && execErr != nil {
			err = execErr
		}
		if err != nil {
			c.err = err
			continue
		}
		switch c.kind {
		case returnUnits:
			var n int64
			n, c.err = cmds[i].Int64()
			c.granted = int(n)
		default:
			c.d, c.granted, c.idx, c.err = decisionFromReply(c.rule.Limit, cmds[i].Val(), c.kind == lease)
		}
	}
}

// loadScript loads the sliding-window scripts where decisions run: the
// server, or every primary of a cluster.
func (s *redisStore) loadScript(ctx context.Context) error {
	load := func(ctx context.Context, c redis.Scripter) error {
		if err := slidingWindowLua.Load(ctx, c).Err(); err != nil {
			return err
		}
		return leaseReturnLua.Load(ctx, c).Err()
	}
	if s.cluster != nil {
		return s.cluster.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
			return load(ctx, c)
		})
	}
	return load(ctx, s.rdb)
}

// clusterRefreshEvery spaces topology refreshes when many decisions fail
// at once (a dead primary, before its replica takes over).
const clusterRefreshEvery = 100 * time.Millisecond

// refreshCluster reloads the slot map of a cluster at once, then loads
// the script on every primary. go-redis' ClusterClient reloads its slot
// map on MOVED/ASK (a live node redirecting) and every
// ClusterStateReloadInterval (60 s), not when a node stops answering: after
// a primary dies, its slots would go on being sent to the dead address for
// up to a minute after its replica took over. ForEachMaster reloads the
// map synchronously first; the replica it finds promoted has an empty
// script cache, which the load fills. At most one refresh per
// clusterRefreshEvery; errors are left to the rerun.
func (s *redisStore) refreshCluster(ctx context.Context) {
	now := time.Now().UnixMilli()
	last := s.lastRefresh.Load()
	if now-last < clusterRefreshEvery.Milliseconds() || !s.lastRefresh.CompareAndSwap(last, now) {
		return
	}
	_ = s.loadScript(ctx)
}

// unreachable reports whether err says that a node could not be reached
// or dropped the connection (refused, reset, EOF), as opposed to an error
// reply, a timeout (no time would be left to try again) or a bad reply.
func unreachable(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) {
		return !ne.Timeout()
	}
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

func isNoScript(err error) bool {
	return redis.HasErrorPrefix(err, "NOSCRIPT")
}
