package proxy

import (
	"bytes"
	"context"
	"crypto/hmac"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"hash"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// accessEntry is one request's access-log line, copied out of the
// exchange so that the request path only hands it over.
type accessEntry struct {
	at                       time.Time
	requestID, route, method string
	status                   int
	tier, client             string // client: the raw id; fingerprinted by the writer
	limit, fallback, breaker string
	endpoint                 string
	duration, upstream       time.Duration
	bytesIn, bytesOut        int64
}

// accessLog writes access-log lines from a bounded buffer on its own
// goroutine: logging never blocks a request; when the buffer is full the
// line is dropped and counted. Lines are JSON in the operational log's
// format, at level INFO whatever -log-level says (the access log has its
// own switch), and go out in batches: the lines queued while one batch was
// written go together in one write, so a busy proxy makes one write per
// batch, not per request, and an idle one writes each line at once.
type accessLog struct {
	log     *slog.Logger // encodes into batch
	batch   bytes.Buffer
	out     io.Writer
	entries chan accessEntry
	dropped *metrics.Counter
	key     []byte // default HMAC key, random per process
	secret  func() []byte
	stop    chan struct{}
	wg      sync.WaitGroup

	// mac is reused by the writer goroutine (the only caller of
	// fingerprint) while the key stays the same: a new HMAC per line was
	// half of the allocations of a request with the access log on.
	mac    hash.Hash
	macKey []byte
	macBuf []byte // the client id going in, then the sum coming out
}

const accessLogBuffer = 8192

// accessLogBatch is the most a batch holds before it is written.
const accessLogBatch = 64 << 10

func newAccessLog(out io.Writer, set *metrics.Set, secret func() []byte) *accessLog {
	a := &accessLog{out: out, entries: make(chan accessEntry, accessLogBuffer), secret: secret, stop: make(chan struct{}),
		dropped: set.GetOrCreateCounter(`sidecar_access_log_dropped_total`)}
	a.log = slog.New(slog.NewJSONHandler(&a.batch, nil))
	a.key = make([]byte, 32)
	_, _ = crand.Read(a.key)
	a.wg.Add(1)
	go a.run()
	return a
}

func (a *accessLog) offer(e accessEntry) {
	select {
	case a.entries <- e:
	default:
		a.dropped.Inc()
	}
}

func (a *accessLog) close() {
	close(a.stop)
	a.wg.Wait()
}

func (a *accessLog) run() {
	defer a.wg.Done()
	for {
		select {
		case e := <-a.entries:
			a.write(e)
			if len(a.entries) == 0 || a.batch.Len() >= accessLogBatch {
				a.flush()
			}
		case <-a.stop:
			for {
				select {
				case e := <-a.entries:
					a.write(e)
				default:
					a.flush()
					return
				}
			}
		}
	}
}

// flush writes the batch of whole lines in one call.
func (a *accessLog) flush() {
	if a.batch.Len() > 0 {
		_, _ = a.out.Write(a.batch.Bytes())
		a.batch.Reset()
	}
}

// fingerprint is a keyed hash of the client id: stable for one key, and
// not reversible to an IP address or API key by brute force without it.
func (a *accessLog) fingerprint(client string) string {
	if client == "" {
		return ""
	}
	key := a.secret()
	if key == nil {
		key = a.key
	}
	if a.mac == nil || !bytes.Equal(key, a.macKey) {
		a.mac, a.macKey = hmac.New(sha256.New, key), bytes.Clone(key)
	}
	a.mac.Reset()
	a.macBuf = append(a.macBuf[:0], client...)
	a.mac.Write(a.macBuf)
	a.macBuf = a.mac.Sum(a.macBuf[:0])
	var out [16]byte
	hex.Encode(out[:], a.macBuf[:8])
	return string(out[:])
}

func (a *accessLog) write(e accessEntry) {
	a.log.LogAttrs(context.Background(), slog.LevelInfo, "request",
		slog.Time("at", e.at),
		slog.String("request_id", e.requestID),
		slog.String("route", e.route),
		slog.String("method", e.method),
		slog.Int("status", e.status),
		slog.String("tier", e.tier),
		slog.String("client", a.fingerprint(e.client)),
		slog.String("limit", e.limit),
		slog.String("breaker", e.breaker),
		slog.String("fallback", e.fallback),
		slog.String("upstream", e.endpoint),
		slog.Float64("duration_ms", float64(e.duration.Microseconds())/1000),
		slog.Float64("upstream_ms", float64(e.upstream.Microseconds())/1000),
		slog.Int64("bytes_in", e.bytesIn),
		slog.Int64("bytes_out", e.bytesOut),
	)
}

// accessLine hands the exchange's line to the access log, if enabled and
// sampled in; errors and denials are always logged.
func (x *exchange) accessLine(status int, now time.Time) {
	cfg := &x.st.snap.AccessLog
	if !cfg.Enabled {
		return
	}
	if status < 400 && cfg.Sample < 1 && rand.Float64() >= cfg.Sample {
		return
	}
	// One allocation for the three strings copied out of the exchange.
	all := string(x.reqID) + string(x.clientID) + string(x.method)
	nID, nClient := len(x.reqID), len(x.clientID)
	e := accessEntry{at: x.start, requestID: all[:nID], client: all[nID : nID+nClient], method: all[nID+nClient:],
		status: status, fallback: x.fallback, duration: now.Sub(x.start), bytesIn: x.sent, bytesOut: x.bytesOut}
	if x.rt != nil {
		e.route = x.rt.route.Name
	}
	e.tier = x.tier
	if x.rl.tier != nil {
		switch {
		case x.rl.shadowed:
			e.limit = "shadow_denied"
		case x.rl.d.Allowed:
			e.limit = "allowed"
		default:
			e.limit = "denied"
		}
	}
	if x.ep != nil {
		e.endpoint = x.ep.addr
	}
	if x.up != nil && x.up.brk != nil {
		b := x.up.brk
		if x.rt != nil && x.rt.brk != nil {
			b = x.rt.brk
		}
		e.breaker = [...]string{"closed", "open", "half_open"}[b.State(now)]
	}
	if !x.upStart.IsZero() {
		end := x.upEnd
		if end.IsZero() {
			end = now
		}
		e.upstream = end.Sub(x.upStart)
	}
	x.p.access.offer(e)
}
