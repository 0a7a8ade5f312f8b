package limiter

import (
	"hash/maphash"
	"sync"
)

// shardedMap is a map from client keys to V, split into shards that each
// have their own mutex, so that decisions for different clients seldom
// wait for each other. Each shard holds at most perShard entries; what
// happens at that cap (evict, or refuse the new key) is the caller's.
// It backs the memory store, the lease table and the deny cache.
type shardedMap[V any] struct {
	seed     maphash.Seed
	perShard int
	shards   []mapShard[V]
}

// mapShard is one shard: m may be read or written only with mu held.
type mapShard[V any] struct {
	mu sync.Mutex
	m  map[string]V
}

// newShardedMap returns a map of n shards holding at most maxKeys
// entries in all: maxKeys/n per shard, and at least one.
func newShardedMap[V any](n, maxKeys int) *shardedMap[V] {
	m := &shardedMap[V]{seed: maphash.MakeSeed(), perShard: max(1, maxKeys/n), shards: make([]mapShard[V], n)}
	for i := range m.shards {
		m.shards[i].m = make(map[string]V)
	}
	return m
}

// shard returns the shard holding key; lock its mu to use it.
func (m *shardedMap[V]) shard(key string) *mapShard[V] {
	return &m.shards[maphash.String(m.seed, key)%uint64(len(m.shards))]
}

// full reports whether s, locked, has no room for another key.
func (m *shardedMap[V]) full(s *mapShard[V]) bool { return len(s.m) >= m.perShard }

// getOrAdd returns key's entry in s, a shard of m that the caller holds
// locked, adding a zero entry when there is none; when s is full it first
// calls evict(s, nowMs) to make room.
func getOrAdd[E any](m *shardedMap[*E], s *mapShard[*E], key string, nowMs int64, evict func(*mapShard[*E], int64)) *E {
	e := s.m[key]
	if e == nil {
		if m.full(s) {
			evict(s, nowMs)
		}
		e = new(E)
		s.m[key] = e
	}
	return e
}

// Len returns the number of entries held.
func (m *shardedMap[V]) Len() int {
	n := 0
	for i := range m.shards {
		s := &m.shards[i]
		s.mu.Lock()
		n += len(s.m)
		s.mu.Unlock()
	}
	return n
}

// sweep calls keep for every entry, one shard at a time with that shard
// locked, and deletes the entries it returns false for. keep may change
// the entry it is given (through a pointer V).
func (m *shardedMap[V]) sweep(keep func(key string, v V) bool) {
	for i := range m.shards {
		s := &m.shards[i]
		s.mu.Lock()
		for k, v := range s.m {
			if !keep(k, v) {
				delete(s.m, k)
			}
		}
		s.mu.Unlock()
	}
}
