package limiter

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
)

// slidingWindowLua is slide() in Redis: one key (a hash of sub-window
// number to admissions), one round trip, time from Redis' TIME unless
// ARGV[4] passes it. It returns {allowed, remaining, retry_ms, reset_ms}.
var slidingWindowLua = redis.NewScript(`
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local w = math.max(1, math.floor(window / 100))
local k = math.floor((window + w - 1) / w)
local cur = math.floor(now / w)
local oldest = cur - k
local raw = redis.call('HGETALL', key)
local idx, cnt, n, total = {}, {}, 0, 0
for i = 1, #raw, 2 do
  local b = tonumber(raw[i])
  if b < oldest then
    redis.call('HDEL', key, raw[i])
  else
    n = n + 1
    idx[n] = b
    cnt[b] = tonumber(raw[i + 1])
    total = total + cnt[b]
  end
end
table.sort(idx)
local last = idx[n]
if total + cost > limit then
  local retry_at = now + window
  local freed = 0
  for j = 1, n do
    freed = freed + cnt[idx[j]]
    if total - freed + cost <= limit then
      retry_at = (idx[j] + k + 1) * w
      break
    end
  end
  local reset = 0
  if n > 0 then reset = math.max(0, (last + k + 1) * w - now) end
  return {0, math.max(0, limit - total), math.max(1, retry_at - now), reset}
end
redis.call('HINCRBY', key, string.format('%d', cur), cost)
if last == nil or cur > last then last = cur end
local reset = math.max(0, (last + k + 1) * w - now)
redis.call('PEXPIRE', key, reset + 1)
return {1, limit - total - cost, 0, reset}
`)

// RedisOptions says how to reach Redis.
type RedisOptions struct {
	// Mode is "single" (default); "cluster" and "sentinel" come with the
	// scale-out issue.
	Mode  string
	Addrs []string
	// Password comes from the environment, never from the config file.
	Password string
	DB       int
	TLS      *tls.Config
	// Timeout bounds every command (dial, read, write). Default 50 ms.
	Timeout time.Duration
}

// NewRedisClient returns a go-redis client tuned to fail fast: go-redis'
// defaults take ~2 s per call to fail while Redis is down (dial retries
// and command retries), which would add seconds to every request.
func NewRedisClient(o RedisOptions) (redis.UniversalClient, error) {
	if len(o.Addrs) == 0 {
		return nil, errors.New("limiter: redis needs at least one address")
	}
	if o.Mode != "" && o.Mode != "single" {
		return nil, fmt.Errorf("limiter: redis mode %q is not supported yet (single only)", o.Mode)
	}
	if o.Timeout <= 0 {
		o.Timeout = 50 * time.Millisecond
	}
	return redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:                 o.Addrs[:1],
		Password:              o.Password,
		DB:                    o.DB,
		TLSConfig:             o.TLS,
		DialTimeout:           o.Timeout,
		ReadTimeout:           o.Timeout,
		WriteTimeout:          o.Timeout,
		PoolTimeout:           o.Timeout,
		ContextTimeoutEnabled: true,
		MaxRetries:            -1, // a retry is the caller's decision: we fall back instead
		DialerRetries:         1,
		PoolSize:              64,
		MinIdleConns:          4,
	}), nil
}

// redisStore runs decisions against Redis.
type redisStore struct {
	rdb    redis.UniversalClient
	gcra   *redis_rate.Limiter
	prefix string
}

func newRedisStore(rdb redis.UniversalClient, prefix string) *redisStore {
	return &redisStore{rdb: rdb, gcra: redis_rate.NewLimiter(rdb), prefix: prefix}
}

// key puts the whole client key in a hash tag, so that every key of one
// decision lives in one slot and the scripts run on Redis Cluster as is.
func (s *redisStore) key(k string) string {
	return s.prefix + ":rl:{" + k + "}"
}

// decisionFromReply converts the script's reply.
func decisionFromReply(limit int, v any) (Decision, error) {
	arr, ok := v.([]any)
	if !ok || len(arr) != 4 {
		return Decision{}, fmt.Errorf("limiter: unexpected script reply %v", v)
	}
	n := make([]int64, 4)
	for i, x := range arr {
		switch t := x.(type) {
		case int64:
			n[i] = t
		case string:
			n[i], _ = strconv.ParseInt(t, 10, 64)
		default:
			return Decision{}, fmt.Errorf("limiter: unexpected script reply %v", v)
		}
	}
	return Decision{Allowed: n[0] == 1, Limit: limit, Remaining: int(n[1]),
		RetryAfter: time.Duration(n[2]) * time.Millisecond, ResetAfter: time.Duration(n[3]) * time.Millisecond}, nil
}

func nowArg(nowMs int64) string {
	if nowMs == 0 {
		return ""
	}
	return strconv.FormatInt(nowMs, 10)
}

// gcraAllow runs redis_rate's GCRA for one decision.
func (s *redisStore) gcraAllow(ctx context.Context, key string, rule Rule, cost int) (Decision, error) {
	res, err := s.gcra.AllowN(ctx, s.key(key), redis_rate.Limit{Rate: rule.Limit, Period: rule.Window, Burst: rule.burst()}, cost)
	if err != nil {
		return Decision{}, err
	}
	d := Decision{Allowed: res.Allowed > 0, Limit: rule.burst(), Remaining: res.Remaining, ResetAfter: res.ResetAfter}
	if !d.Allowed {
		d.RetryAfter = res.RetryAfter
	}
	return d, nil
}

// slidingBatch runs many sliding-window decisions in one pipeline: one
// round trip and one write for all of them. nowMs 0 means Redis' clock.
func (s *redisStore) slidingBatch(ctx context.Context, calls []*call, nowMs int64) error {
	run := func() ([]redis.Cmder, error) {
		pipe := s.rdb.Pipeline()
		for _, c := range calls {
			slidingWindowLua.EvalSha(ctx, pipe, []string{s.key(c.key)},
				c.rule.Limit, c.rule.Window.Milliseconds(), c.cost, nowArg(nowMs))
		}
		return pipe.Exec(ctx)
	}
	cmds, err := run()
	if err != nil && isNoScript(err) {
		// After a restart or failover the script cache is empty: load it
		// (on every shard, for Cluster) and run the batch again.
		if lerr := s.loadScript(ctx); lerr != nil {
			return lerr
		}
		cmds, err = run()
	}
	if err != nil && len(cmds) == 0 {
		return err
	}
	for i, cmd := range cmds {
		c := calls[i]
		if cerr := cmd.Err(); cerr != nil {
			c.err = cerr
			continue
		}
		c.d, c.err = decisionFromReply(c.rule.Limit, cmd.(*redis.Cmd).Val())
	}
	return nil
}

func (s *redisStore) loadScript(ctx context.Context) error {
	if cc, ok := s.rdb.(*redis.ClusterClient); ok {
		return cc.ForEachShard(ctx, func(ctx context.Context, c *redis.Client) error {
			return slidingWindowLua.Load(ctx, c).Err()
		})
	}
	return slidingWindowLua.Load(ctx, s.rdb).Err()
}

func isNoScript(err error) bool {
	return err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT")
}
