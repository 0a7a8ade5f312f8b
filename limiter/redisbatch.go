package limiter

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// windowBatchLua decides a batch of sliding-window calls in one script
// call: KEYS are the calls' keys, in order, a key as often as it has calls
// (the calls of one key run one after the other, as sequential decisions).
// ARGV[1] is now in ms (0: Redis' TIME, read once for the batch), ARGV[2]
// Subwindows, then four per call: kind (callKind: 0 decide, 1 lease, 2
// give back), limit (for a give-back, the grant's sub-window), window_ms,
// cost (units). The reply is a flat array of replyStride integers per call:
//
//   - decide: {allowed, remaining, retry_ms, reset_ms, 0, 0};
//   - lease: {allowed, remaining, retry_ms, reset_ms, granted, sub-window};
//   - give back: {1, 0, 0, 0, units subtracted, 0}.
//
// A call that fails in Redis (its key holds another type, a write refused
// for memory) is {code, 0, 0, 0, 0, 0} with a negative code (scriptFailures)
// and changes nothing; the other calls of the batch are not affected.
//
// slide and giveBack are the scripts of one call each that the limiter
// ran before batches, made functions: the same body per key.
//
// slide is slide() in Redis. With lease it grants a quota lease instead:
// asked for cost units, it admits g = min(cost, limit - total) of them at
// once, recorded in the current sub-window exactly as g single admissions
// would be, and returns {1, remaining, 0, reset_ms, g, sub-window}; when
// nothing is left it is the denial of one request, {0, remaining,
// retry_ms, reset_ms, 0, sub-window}.
//
// The key is a string: a 24-byte header (newest sub-window written, total
// admissions in the window, newest sub-window with an admission) and a
// ring of k+1 counters, one per sub-window of [cur-k, cur]. A decision
// reads and writes only the header and the slots it touches (GETRANGE,
// SETRANGE), so it costs O(sub-windows elapsed since the client's last
// request), not O(k); a hash with a field per sub-window cost ~14 µs of
// Redis time per decision for a busy client.
//
// giveBack gives back units of a lease that were not spent: it subtracts
// them from the sub-window idx the grant was recorded in, and from the
// total, only while that sub-window still counts: once it has left the
// window (or its slot was reused, or the key was created afresh since the
// grant) the units have expired with it and nothing changes. A count never
// goes below zero, and the key keeps its TTL (SETRANGE does not touch it).
// It returns the units subtracted.
//
// geometry is geometry() of algorithm.go: width w, k counted sub-windows,
// a ring of k+1 slots, the current sub-window cur.
var windowBatchLua = redis.NewScript(`
local function geometry(window, sub, now)
  local w = math.max(1, math.floor(window / sub))
  local k = math.floor((window + w - 1) / w)
  return w, k, k + 1, math.floor(now / w)
end

local function slide(key, limit, window, cost, lease, now, sub)
  local w, k, ring, cur = geometry(window, sub, now)
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
end

local function giveBack(key, idx, window, units, now, sub)
  local w, k, ring, cur = geometry(window, sub, now)
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
end

local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local sub = tonumber(ARGV[2])
local out, n = {}, 0
for i = 1, #KEYS do
  local a = 4 * i - 1
  local kind, x, window, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local ok, r
  if kind == 2 then
    ok, r = pcall(giveBack, KEYS[i], x, window, cost, now, sub)
    if ok then r = {1, 0, 0, 0, r, 0} end
  else
    ok, r = pcall(slide, KEYS[i], x, window, cost, kind == 1, now, sub)
  end
  if not ok then
    local e = r
    if type(r) == 'table' then e = r.err end
    e = tostring(e)
    if string.find(e, 'WRONGTYPE', 1, true) then r = {-1}
    elseif string.find(e, 'OOM', 1, true) then r = {-2}
    else r = {-3} end
  end
  for j = 1, 6 do out[n + j] = r[j] or 0 end
  n = n + 6
end
return out
`)

// replyStride is the integers per call in windowBatchLua's reply.
const replyStride = 6

// scriptFailures names windowBatchLua's negative codes, -1 first.
var scriptFailures = [...]string{
	"holds another type (WRONGTYPE)",
	"refused a write: out of memory (OOM)",
	"failed in the script (neither WRONGTYPE nor OOM)",
}

// maxScriptKeys caps the calls one script call carries. A script blocks
// Redis while it runs (~10 µs per call it carries); the batcher's batches
// (MaxBatch, 128 by default) fit in one, and a larger one (the give-backs
// at Close) is split.
const maxScriptKeys = 256

// Arguments that are the same in every script call; a constant in an
// interface does not allocate, a string variable does (once, here).
var (
	evalshaArg any = "evalsha"
	shaArg     any = windowBatchLua.Hash()
)

// scriptBatch holds what one slidingRun sends: the script calls (one per
// slot group, on a cluster) and the memory their arguments live in, reused
// from one batch to the next (batchPool) so that a batch allocates only
// its keys' bytes and, per script call, go-redis' command and its reply.
//
// The arguments are pointers into ints and keys (go-redis writes *int64
// and *string as it writes int64 and string): an int64 or string put in an
// interface is copied to the heap, a pointer is not. ints and keys are
// sized before the first pointer is taken and never grow after.
type scriptBatch struct {
	order   []uint64 // slot<<32 | index into calls, sorted: the calls of a group are adjacent, in batch order
	keyBuf  []byte
	keyEnds []int
	keys    []string
	ints    []int64
	args    []any
	groups  []scriptGroup
}

// scriptGroup is one script call: the calls order[from:to].
type scriptGroup struct {
	from, to int
	clients  bool // the calls are of more than one client
	cmd      *redis.IntSliceCmd
}

// cmpBool orders false before true.
func cmpBool(x, y bool) int {
	switch {
	case x == y:
		return 0
	case x:
		return 1
	}
	return -1
}

var batchPool = sync.Pool{New: func() any { return new(scriptBatch) }}

// appendKey appends s.key(k) to b, then the sub-window width of window:
// the script's ring counts in sub-windows, so a reload that changes a
// tier's window starts a fresh count under a new key (in the same hash
// slot). Read in another width, a longer window's count never aged out
// (the client was locked out) and a shorter one's vanished.
func (s *redisStore) appendKey(b []byte, k string, window time.Duration) []byte {
	b = append(b, s.prefix...)
	b = append(b, ":rl:{"...)
	b = append(b, k...)
	b = append(b, "}:"...)
	w, _ := geometry(window)
	return strconv.AppendInt(b, w, 10)
}

// build makes the script calls for calls: on a cluster one per hash slot
// (a script's keys must share one), else one; either way at most
// maxScriptKeys calls in each, and with alone one call in each.
//
// On a cluster the calls that carry one client come first in the
// pipeline, those that carry several last: go-redis sends a primary's
// whole part of a pipeline again when its first command is refused with
// a retriable error, TRYAGAIN included, and only a call of several
// clients can be refused so (see slidingBatch); sent again, the calls
// after it that Redis ran would count twice.
func (b *scriptBatch) build(ctx context.Context, s *redisStore, calls []*call, nowMs int64, alone bool) {
	n := len(calls)
	b.keyBuf, b.keyEnds = b.keyBuf[:0], b.keyEnds[:0]
	for _, c := range calls {
		b.keyBuf = s.appendKey(b.keyBuf, c.key, c.rule.Window)
		b.keyEnds = append(b.keyEnds, len(b.keyBuf))
	}
	all := string(b.keyBuf) // the batch's one copy of its keys
	b.keys, b.order = b.keys[:0], b.order[:0]
	start := 0
	for i, end := range b.keyEnds {
		k := all[start:end]
		start = end
		b.keys = append(b.keys, k)
		var slot uint64
		switch {
		case alone || s.perKey:
			slot = uint64(i) // one key per script call (a Ring routes by the first key)
		case s.cluster != nil:
			slot = uint64(clusterSlot(k))
		}
		b.order = append(b.order, slot<<32|uint64(i))
	}
	if s.cluster != nil {
		slices.Sort(b.order)
	}
	b.groups = b.groups[:0]
	for from := 0; from < n; {
		to, clients := from+1, false
		first := b.keys[uint32(b.order[from])]
		for to < n && to-from < maxScriptKeys && b.order[to]>>32 == b.order[from]>>32 {
			clients = clients || b.keys[uint32(b.order[to])] != first
			to++
		}
		b.groups = append(b.groups, scriptGroup{from: from, to: to, clients: clients})
		from = to
	}
	if s.cluster != nil {
		slices.SortStableFunc(b.groups, func(x, y scriptGroup) int { return cmpBool(x.clients, y.clients) })
	}
	g := len(b.groups)
	b.ints = slices.Grow(b.ints[:0], 4*n+3*g)[:4*n+3*g]
	b.args = slices.Grow(b.args[:0], 5*n+5*g)[:0]
	ints := b.ints
	for gi := range b.groups {
		gr := &b.groups[gi]
		size := gr.to - gr.from
		ints[0], ints[1], ints[2] = int64(size), nowMs, Subwindows
		from := len(b.args)
		b.args = append(b.args, evalshaArg, shaArg, &ints[0])
		for _, o := range b.order[gr.from:gr.to] {
			b.args = append(b.args, &b.keys[uint32(o)])
		}
		b.args = append(b.args, &ints[1], &ints[2])
		ints = ints[3:]
		for _, o := range b.order[gr.from:gr.to] {
			c := calls[uint32(o)]
			x := int64(c.rule.Limit)
			if c.kind == returnUnits {
				x = c.idx
			}
			ints[0], ints[1], ints[2], ints[3] = int64(c.kind), x, c.rule.Window.Milliseconds(), int64(c.cost)
			b.args = append(b.args, &ints[0], &ints[1], &ints[2], &ints[3])
			ints = ints[4:]
		}
		gr.cmd = redis.NewIntSliceCmd(ctx, b.args[from:len(b.args):len(b.args)]...)
		gr.cmd.SetFirstKeyPos(3)
	}
}

// settle gives each call of group gr its decision or error from the
// script's reply (or err, the call's error).
func (b *scriptBatch) settle(calls []*call, gr scriptGroup, err error) {
	v := gr.cmd.Val()
	if err == nil && len(v) != replyStride*(gr.to-gr.from) {
		err = fmt.Errorf("limiter: unexpected script reply: %d integers for %d calls", len(v), gr.to-gr.from)
	}
	for j, o := range b.order[gr.from:gr.to] {
		c := calls[uint32(o)]
		if err != nil {
			c.err = err
			continue
		}
		r := v[j*replyStride : (j+1)*replyStride]
		c.err = nil // a rerun's success replaces the first try's error
		if r[0] < 0 {
			why := scriptFailures[len(scriptFailures)-1]
			if int(-r[0]) <= len(scriptFailures) {
				why = scriptFailures[-r[0]-1]
			}
			c.err = fmt.Errorf("limiter: redis key %s %s", b.keys[uint32(o)], why)
			continue
		}
		switch c.kind {
		case returnUnits:
			c.granted = int(r[4])
		default:
			c.d = Decision{Allowed: r[0] == 1, Limit: c.rule.Limit, Remaining: int(r[1]),
				RetryAfter: msDuration(r[2]), ResetAfter: msDuration(r[3])}
			if c.kind == lease {
				c.granted, c.idx = int(r[4]), r[5]
			}
		}
	}
}

// release drops the batch's references to commands and keys, so that a
// pooled batch holds no more than its buffers.
func (b *scriptBatch) release() {
	clear(b.args)
	clear(b.keys)
	clear(b.groups)
	batchPool.Put(b)
}

// clusterSlot is the Redis Cluster hash slot of key: CRC16 (XMODEM) of
// the key mod 16384, or of its hash tag, the bytes between the first '{'
// and the first '}' after it when there are any (the cluster
// specification, "Hash tags"). go-redis computes the same slot in an
// internal package.
func clusterSlot(key string) uint16 {
	for i := 0; i < len(key); i++ {
		if key[i] == '{' {
			for j := i + 1; j < len(key); j++ {
				if key[j] == '}' {
					if j > i+1 {
						key = key[i+1 : j]
					}
					return crc16(key) & 16383
				}
			}
			break
		}
	}
	return crc16(key) & 16383
}

// crc16 is CRC-16/XMODEM (polynomial 0x1021, initial value 0), the
// checksum of Redis Cluster's key hashing.
func crc16(s string) uint16 {
	var crc uint16
	for i := 0; i < len(s); i++ {
		crc = crc<<8 ^ crc16Table[byte(crc>>8)^s[i]]
	}
	return crc
}

var crc16Table = func() (t [256]uint16) {
	for i := range t {
		crc := uint16(i) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
		t[i] = crc
	}
	return t
}()

func msDuration(ms int64) time.Duration { return time.Duration(ms) * time.Millisecond }
