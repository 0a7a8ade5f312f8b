package proxy

import (
	"bytes"
	"crypto/hmac"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"hash"
	"io"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/VictoriaMetrics/metrics"
)

// accessEntry is one request's access-log line, copied out of the
// exchange so that the request path only hands it over.
type accessEntry struct {
	at                       time.Time
	requestID, route, method string
	protocol                 string // protocolNames
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
// own switch), and go out in batches: a line waits at most
// accessLogFlushInterval for the others that arrive meanwhile, and they go
// out in one write. A busy proxy so makes one write per interval, not one
// per request (a write and a wake-up of this goroutine per request were
// 6 % of a loaded sidecar's CPU), the way Envoy flushes its access-log
// files every second and NGINX with `buffer=`.
type accessLog struct {
	batch   bytes.Buffer
	out     io.Writer
	entries chan accessEntry
	hurry   chan struct{} // the buffer is half full: do not wait for the interval
	flushIn time.Duration // accessLogFlushInterval outside tests
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

// accessLogFlushInterval is the longest a line waits to share its write
// with others: how late it can reach the file. Short enough for a human
// following the log; at 80k lines/s the buffer fills in 100 ms, and a
// half-full buffer ends the wait early.
const accessLogFlushInterval = 100 * time.Millisecond

// accessLogBatch is the most a batch holds before it is written.
const accessLogBatch = 64 << 10

func newAccessLog(out io.Writer, set *metrics.Set, secret func() []byte) *accessLog {
	return newAccessLogFlushing(out, set, secret, accessLogFlushInterval)
}

func newAccessLogFlushing(out io.Writer, set *metrics.Set, secret func() []byte, interval time.Duration) *accessLog {
	a := &accessLog{out: out, entries: make(chan accessEntry, accessLogBuffer),
		hurry: make(chan struct{}, 1), flushIn: interval, secret: secret, stop: make(chan struct{}),
		dropped: set.GetOrCreateCounter(`sidecar_access_log_dropped_total`)}
	a.key = make([]byte, 32)
	_, _ = crand.Read(a.key)
	a.wg.Add(1)
	go a.run()
	return a
}

func (a *accessLog) offer(e accessEntry) {
	select {
	case a.entries <- e:
		if len(a.entries) >= accessLogBuffer/2 {
			select {
			case a.hurry <- struct{}{}:
			default:
			}
		}
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
	gather := time.NewTimer(a.flushIn)
	gather.Stop()
	for {
		var first accessEntry
		select {
		case first = <-a.entries:
		case <-a.stop:
			a.drain(time.Now())
			return
		}
		// Let the batch gather without being woken for each line.
		gather.Reset(a.flushIn)
		stopping := false
		select {
		case <-gather.C:
		case <-a.hurry:
			gather.Stop()
		case <-a.stop:
			gather.Stop()
			stopping = true
		}
		now := time.Now()
		a.write(first, now)
		a.drain(now)
		if stopping {
			a.drain(now) // whatever came in while the last batch was written
			return
		}
	}
}

// drain writes the lines queued now (not those arriving meanwhile, so a
// steady stream cannot keep it from returning), in writes of at most
// accessLogBatch bytes of whole lines.
func (a *accessLog) drain(now time.Time) {
	for n := len(a.entries); n > 0; n-- {
		a.write(<-a.entries, now)
		if a.batch.Len() >= accessLogBatch {
			a.flush()
		}
	}
	a.flush()
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
	return string(a.appendFingerprint(nil, client))
}

// appendFingerprint appends client's fingerprint (16 hex digits; nothing
// for no client). Only the writer goroutine calls it.
func (a *accessLog) appendFingerprint(dst []byte, client string) []byte {
	if client == "" {
		return dst
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
	return hex.AppendEncode(dst, a.macBuf[:8])
}

// write appends e to the batch as one JSON line, in the operational log's
// shape (time: when its batch is written, level, msg, then the fields). It
// is encoded by hand: slog's JSON handler was two thirds of the access
// log's CPU and three allocations per line; this is none.
func (a *accessLog) write(e accessEntry, now time.Time) {
	b := a.batch.AvailableBuffer()
	b = append(b, `{"time":"`...)
	b = now.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","level":"INFO","msg":"request","at":"`...)
	b = e.at.AppendFormat(b, time.RFC3339Nano)
	b = append(b, '"')
	b = appendJSONField(b, "request_id", e.requestID)
	b = appendJSONField(b, "route", e.route)
	b = appendJSONField(b, "method", e.method)
	b = appendJSONField(b, "protocol", e.protocol)
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(e.status), 10)
	b = appendJSONField(b, "tier", e.tier)
	b = append(b, `,"client":"`...)
	b = a.appendFingerprint(b, e.client)
	b = append(b, '"')
	b = appendJSONField(b, "limit", e.limit)
	b = appendJSONField(b, "breaker", e.breaker)
	b = appendJSONField(b, "fallback", e.fallback)
	b = appendJSONField(b, "upstream", e.endpoint)
	b = append(b, `,"duration_ms":`...)
	b = strconv.AppendFloat(b, float64(e.duration.Microseconds())/1000, 'f', -1, 64)
	b = append(b, `,"upstream_ms":`...)
	b = strconv.AppendFloat(b, float64(e.upstream.Microseconds())/1000, 'f', -1, 64)
	b = append(b, `,"bytes_in":`...)
	b = strconv.AppendInt(b, e.bytesIn, 10)
	b = append(b, `,"bytes_out":`...)
	b = strconv.AppendInt(b, e.bytesOut, 10)
	b = append(b, "}\n"...)
	a.batch.Write(b)
}

// appendJSONField appends `,"key":"value"` with value escaped for JSON;
// keys are constants that need no escaping.
func appendJSONField(b []byte, key, value string) []byte {
	b = append(b, ',', '"')
	b = append(b, key...)
	b = append(b, '"', ':', '"')
	b = appendJSONString(b, value)
	return append(b, '"')
}

// appendJSONString escapes s for inside a JSON string: quotes, backslashes
// and control bytes escaped, invalid UTF-8 replaced by U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c == '\n':
				b = append(b, '\\', 'n')
			case c == '\r':
				b = append(b, '\\', 'r')
			case c == '\t':
				b = append(b, '\\', 't')
			case c < 0x20:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, `\ufffd`...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return b
}

// accessLine hands the exchange's line to the access log, if enabled and
// sampled in; errors and denials are always logged.
func (x *exchange) accessLine(status int, now time.Time) {
	cfg := &x.r.st.snap.AccessLog
	if !cfg.Enabled {
		return
	}
	if status < 400 && cfg.Sample < 1 && rand.Float64() >= cfg.Sample {
		return
	}
	// One allocation for the three strings copied out of the exchange.
	all := string(x.reqID) + string(x.clientID) + string(x.method)
	nID, nClient := len(x.reqID), len(x.clientID)
	e := accessEntry{at: x.r.start, requestID: all[:nID], client: all[nID : nID+nClient], method: all[nID+nClient:],
		protocol: protocolNames[clientProtocol(x.r.ctx)], status: status, fallback: x.r.fallback, duration: now.Sub(x.r.start), bytesIn: x.r.sent, bytesOut: x.r.bytesOut}
	if x.r.rt != nil {
		e.route = x.r.rt.route.Name
	}
	e.tier = x.r.tier
	if x.r.rl.tier != nil {
		switch {
		case x.r.rl.shadowed:
			e.limit = "shadow_denied"
		case x.r.rl.d.Allowed:
			e.limit = "allowed"
		default:
			e.limit = "denied"
		}
	}
	if x.r.ep != nil {
		e.endpoint = x.r.ep.Addr()
	}
	if x.r.up != nil && x.r.up.brk != nil {
		b := x.r.up.brk
		if x.r.rt != nil && x.r.rt.brk != nil {
			b = x.r.rt.brk
		}
		e.breaker = b.State(now).String()
	}
	if !x.r.upStart.IsZero() {
		end := x.r.upEnd
		if end.IsZero() {
			end = now
		}
		e.upstream = end.Sub(x.r.upStart)
	}
	x.p.access.offer(e)
}
