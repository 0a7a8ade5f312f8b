package policy

// The closed sets of values config keys take, as types: decided once when
// the file is read, never compared as strings per request. String gives
// the name used in the file (and in logs and /status).

// Store is rate_limit.store.
type Store uint8

const (
	StoreMemory Store = iota // per process
	StoreRedis               // shared through Redis
)

// Algorithm is rate_limit.algorithm and a tier's algorithm.
type Algorithm uint8

const (
	SlidingWindow Algorithm = iota
	GCRA
)

// FailMode is rate_limit.on_store_error: what decides while Redis fails.
type FailMode uint8

const (
	FailLocal FailMode = iota // each replica its share, in memory
	FailAllow
	FailDeny
)

// RedisMode is redis.mode.
type RedisMode uint8

const (
	RedisSingle RedisMode = iota
	RedisCluster
	RedisSentinel
)

// Protocol is an upstream's protocol.
type Protocol uint8

const (
	HTTP1 Protocol = iota // HTTP/1.1, over TCP or TLS (http:// or https://)
	H2C                   // HTTP/2 with prior knowledge over plain TCP (http://): gRPC in a pod
	H2                    // HTTP/2 over TLS by ALPN (https://)
)

var (
	protocolNames  = []string{"http1", "h2c", "h2"}
	storeNames     = []string{"memory", "redis"}
	algorithmNames = []string{"sliding_window", "gcra"}
	failModeNames  = []string{"local", "allow", "deny"}
	redisModeNames = []string{"single", "cluster", "sentinel"}
)

func (p Protocol) String() string  { return protocolNames[p] }
func (s Store) String() string     { return storeNames[s] }
func (a Algorithm) String() string { return algorithmNames[a] }
func (f FailMode) String() string  { return failModeNames[f] }
func (m RedisMode) String() string { return redisModeNames[m] }

// MarshalText writes the file's name, so that /status and JSON show it.
func (s Store) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// MarshalText writes the file's name, so that /status and JSON show it.
func (p Protocol) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// enum validates a config value against the names of an enum, in order.
func enum[E ~uint8](v *validator, key, got string, names []string) E {
	for i, n := range names {
		if got == n {
			return E(i)
		}
	}
	v.addf(key, "want one of %q, got %q", names, got)
	return 0
}
