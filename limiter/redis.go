package limiter

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
)

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
	perKey  bool                 // rdb is a Ring: a script call carries one key
	gcra    *redis_rate.Limiter
	prefix  string

	lastRefresh atomic.Int64 // unix ms of the last cluster topology refresh
}

func newRedisStore(rdb redis.UniversalClient, prefix string) *redisStore {
	s := &redisStore{rdb: rdb, gcra: redis_rate.NewLimiter(rdb), prefix: prefix}
	s.cluster, _ = rdb.(*redis.ClusterClient)
	_, s.perKey = rdb.(*redis.Ring)
	return s
}

// key puts the whole client key in a hash tag, so that every key of one
// decision lives in one slot and the scripts run on Redis Cluster as is.
func (s *redisStore) key(k string) string {
	return s.prefix + ":rl:{" + k + "}"
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

// gcraRefundLua gives one unit back to a GCRA key in redis_rate's format
// (the TAT in seconds since 2017, under "rate:"): the TAT moves back one
// emission interval, never behind now, and a TAT no longer ahead of now is
// deleted, which is what a key with nothing charged is. redis_rate's own
// script with cost -1 stores only a TAT still in the future, so the last
// unit a client had charged was never given back.
var gcraRefundLua = redis.NewScript(`
redis.replicate_commands()
local tat = redis.call("GET", KEYS[1])
if not tat then
  return 0
end
local now = redis.call("TIME")
now = (now[1] - 1483228800) + (now[2] / 1000000)
local new_tat = math.max(tonumber(tat), now) - tonumber(ARGV[1])
if new_tat > now then
  redis.call("SET", KEYS[1], new_tat, "EX", math.ceil(new_tat - now))
else
  redis.call("DEL", KEYS[1])
end
return 1
`)

// gcraRefund gives one unit of rule back to key (gcraRefundLua).
func (s *redisStore) gcraRefund(ctx context.Context, key string, rule Rule) error {
	emission := rule.Window.Seconds() / float64(rule.Limit)
	return s.onceMoreIfLost(ctx, func() error {
		return gcraRefundLua.Run(ctx, s.rdb, []string{gcraKeyPrefix + s.key(key)}, emission).Err()
	})
}

// gcraKeyPrefix is redis_rate's prefix of its keys.
const gcraKeyPrefix = "rate:"

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

// slidingBatch runs many sliding-window calls (decisions, leases,
// give-backs) in one script call (windowBatchLua): one round trip, one
// write and one script run for all of them. On a cluster a script's keys
// must share a hash slot, and each client key is a hash tag of its own:
// there it is one script call per slot, which for a batch of different
// clients is about one per call, in one pipeline per primary holding some
// of the keys, in parallel. nowMs 0 means Redis' clock. Each call gets its
// own decision or error; calls that failed only because of where they
// were sent get one more try within ctx:
//   - NOSCRIPT: after a restart or failover the script cache is empty
//     (Redis does not replicate it), and EVALSHA does not fall back to
//     EVAL: the script is loaded and those calls run again;
//   - a cluster node that cannot be reached: see refreshCluster;
//   - TRYAGAIN: while a cluster moves a slot to another primary, a script
//     call whose keys (different clients of that slot) are some on one
//     primary and some on the other is refused, not run; its calls run
//     again one key per script call, which go-redis sends where each key
//     is (ASK).
//
// Only the calls of failed script calls run again, never the whole batch,
// so a decision that Redis counted is not counted twice (nor a call that
// failed alone inside a script that ran: its key holds another type, say).
// A call whose reply was lost after Redis ran it (a connection cut
// mid-reply) may be: the error is on the side of denying. For that reason
// a lease return runs again only after NOSCRIPT or TRYAGAIN (it certainly
// did not run): counted twice, it would free units that were spent.
func (s *redisStore) slidingBatch(ctx context.Context, calls []*call, nowMs int64) {
	s.slidingRun(ctx, calls, nowMs, false)
	var again []*call
	noScript, lost, split := false, false, false
	for _, c := range calls {
		switch {
		case c.err == nil:
		case isNoScript(c.err):
			noScript = true
			again = append(again, c)
		case s.cluster != nil && redis.HasErrorPrefix(c.err, "TRYAGAIN"):
			split = true
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
		s.slidingRun(ctx, again, nowMs, split)
	}
}

// slidingRun sends the calls as one script call, or on a cluster one per
// hash slot (alone: one per call), all in one pipeline, and gives each
// call its decision or error. A script call's error is that of each of
// its calls.
func (s *redisStore) slidingRun(ctx context.Context, calls []*call, nowMs int64, alone bool) {
	b := batchPool.Get().(*scriptBatch)
	defer b.release()
	b.build(ctx, s, calls, nowMs, alone)
	var execErr error
	if len(b.groups) == 1 && s.cluster == nil {
		execErr = s.rdb.Process(ctx, b.groups[0].cmd)
	} else {
		pipe := s.rdb.Pipeline()
		for _, g := range b.groups {
			_ = pipe.Process(ctx, g.cmd)
		}
		_, execErr = pipe.Exec(ctx)
	}
	// Errors are per command, except when no connection could be set up
	// (a refused password, a failed TLS handshake): then go-redis leaves
	// the commands unsent, without error or reply, and only Exec says why.
	for _, g := range b.groups {
		err := g.cmd.Err()
		if err == nil && g.cmd.Val() == nil && execErr != nil {
			err = execErr
		}
		b.settle(calls, g, err)
	}
}

// loadScript loads the sliding-window script where decisions run: the
// server, every primary of a cluster, or every shard of a Ring.
func (s *redisStore) loadScript(ctx context.Context) error {
	load := func(ctx context.Context, c *redis.Client) error { return windowBatchLua.Load(ctx, c).Err() }
	switch rdb := s.rdb.(type) {
	case *redis.ClusterClient:
		return rdb.ForEachMaster(ctx, load)
	case *redis.Ring:
		return rdb.ForEachShard(ctx, load)
	}
	return windowBatchLua.Load(ctx, s.rdb).Err()
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
