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

// slidingWindowLua is slide() in Redis: one key, one round trip, time from
// Redis' TIME unless ARGV[4] passes it. It returns {allowed, remaining,
// retry_ms, reset_ms}.
//
// The key is a string: a 24-byte header (newest sub-window written, total
// admissions in the window, newest sub-window with an admission) and a
// ring of k+1 counters, one per sub-window of [cur-k, cur]. A decision
// reads and writes only the header and the slots it touches (GETRANGE,
// SETRANGE), so it costs O(sub-windows elapsed since the client's last
// request), not O(k); a hash with a field per sub-window cost ~14 µs of
// Redis time per decision for a busy client.
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
local ring = k + 1
local size = 24 + 8 * ring
local cur = math.floor(now / w)
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
  return {0, math.max(0, limit - total), math.max(1, retry_at - now), reset}
end
writes[24 + 8 * (cur % ring)] = read(cur) + cost
total = total + cost
last = cur
local reset = math.max(0, (last + k + 1) * w - now)
flush(reset + 1)
return {1, limit - total, 0, reset}
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
