package limiter

import "time"

// DefaultMaxKeys caps the memory store: at most this many clients' states
// are held (about 100 bytes to 1.7 KB each, with the heaviest sliding
// windows). Past it, expired states go first, then the least recently
// seen of a sample.
const DefaultMaxKeys = 200_000

const memShards = 64

// Memory is the in-process store: the embedded default, and the local
// fallback while Redis is unreachable. It is safe for concurrent use.
//
// Bound when an entry is evicted under the cap: that client starts afresh,
// so in the window it was evicted in it can be admitted up to twice its
// limit. Eviction takes expired entries first, so this only happens with
// more than MaxKeys clients active within one window.
type Memory struct {
	states  *shardedMap[*memEntry]
	evicted func() // called per eviction of a live entry; may be nil
}

type memEntry struct {
	buckets   []bucket
	width     int64 // the sub-window width (ms) buckets' idx counts in; 0 for none yet
	tat       float64
	expiresMs int64 // when this state no longer matters
	seenMs    int64
}

// NewMemory returns a memory store holding at most maxKeys states
// (0: DefaultMaxKeys).
func NewMemory(maxKeys int) *Memory {
	if maxKeys <= 0 {
		maxKeys = DefaultMaxKeys
	}
	return &Memory{states: newShardedMap[*memEntry](memShards, maxKeys)}
}

// Len returns the number of states held.
func (m *Memory) Len() int { return m.states.Len() }

// AllowAt decides for cost requests of key at now.
func (m *Memory) AllowAt(key string, rule Rule, now time.Time, cost int) Decision {
	nowMs := now.UnixMilli()
	s := m.states.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := getOrAdd(m.states, s, key, nowMs, m.evict)
	var d Decision
	if rule.Algorithm == GCRA {
		e.tat, d = gcra(e.tat, rule, nowMs, int64(cost))
	} else {
		e.rescale(rule.Window)
		e.buckets, d = slide(e.buckets, rule, nowMs, int64(cost))
		if cap(e.buckets) > 2*len(e.buckets)+8 {
			e.buckets = append([]bucket(nil), e.buckets...) // give back a burst's growth
		}
	}
	e.seenMs = nowMs
	e.expiresMs = nowMs + d.ResetAfter.Milliseconds() + 1
	return d
}

// evict makes room in a full shard without scanning it: of a few entries
// (map order is random, so this samples), the expired ones go, or else
// the least recently seen. Sweep does the bulk clean-up.
func (m *Memory) evict(s *mapShard[*memEntry], nowMs int64) {
	var victim string
	oldest := int64(1<<63 - 1)
	n, freed := 0, false
	for k, e := range s.m {
		if e.expiresMs <= nowMs {
			delete(s.m, k)
			freed = true
		} else if e.seenMs < oldest {
			victim, oldest = k, e.seenMs
		}
		if n++; n == 8 {
			break
		}
	}
	if freed || victim == "" {
		return
	}
	delete(s.m, victim)
	if m.evicted != nil {
		m.evicted()
	}
}

// Sweep drops expired states; the Limiter calls it periodically so that
// memory follows the active clients, not all clients ever seen.
func (m *Memory) Sweep(now time.Time) {
	nowMs := now.UnixMilli()
	m.states.sweep(func(_ string, e *memEntry) bool { return e.expiresMs > nowMs })
}

// rescale carries the buckets over to window's sub-window width when a
// reload changed the tier's window: each bucket goes to the new sub-window
// its start falls in. Left in the old width, their indexes meant other
// times: a longer window kept a full count from ever ageing out (a client
// locked out for decades), a shorter one dropped it at once.
func (e *memEntry) rescale(window time.Duration) {
	w, _ := geometry(window)
	if e.width != w && e.width != 0 {
		for i := range e.buckets {
			e.buckets[i].idx = e.buckets[i].idx * e.width / w
		}
	}
	e.width = w
}
