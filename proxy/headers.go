package proxy

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/policy"
)

// hopHeaders are the hop-by-hop fields of RFC 9110 §7.6.1 plus the legacy
// ones Go's httputil.ReverseProxy also removes. They describe one connection
// and are never forwarded, in either direction. Fields listed in Connection
// are removed as well (stripHop).
var hopHeaders = [...]string{
	"Connection",       // must stay first: stripHop reads its value
	"Proxy-Connection", // non-standard, sent by old clients
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Te",
	"Trailer",
	"Transfer-Encoding", // framing is regenerated per hop
	"Upgrade",
}

// headerDeleter is satisfied by fasthttp's RequestHeader and ResponseHeader.
type headerDeleter interface {
	Peek(key string) []byte
	Del(key string)
	DelBytes(key []byte)
}

// stripRequestHop removes hop-by-hop fields from a request head (RFC 9110
// §7.6.1), including every field named in Connection. Most messages carry
// none, so it first looks (one pass, no allocation) and deletes only what
// is there: each Del costs a key normalisation and a scan of all fields.
func stripRequestHop(h *fasthttp.RequestHeader, scratch []byte) []byte {
	var present uint16 // bit i: hopHeaders[i] is there
	for k := range h.All() {
		present |= hopBit(k)
	}
	return stripHop(h, present, scratch)
}

// stripResponseHop is stripRequestHop for a response head.
func stripResponseHop(h *fasthttp.ResponseHeader, scratch []byte) []byte {
	var present uint16
	for k := range h.All() {
		present |= hopBit(k)
	}
	return stripHop(h, present, scratch)
}

func stripHop(h headerDeleter, present uint16, scratch []byte) []byte {
	if present == 0 {
		return scratch
	}
	if present&1 != 0 { // Connection: drop the fields it lists
		scratch = append(scratch[:0], h.Peek("Connection")...) // Del mutates the storage Peek points into
		for tok := range bytes.SplitSeq(scratch, []byte{','}) {
			if tok = bytes.TrimSpace(tok); len(tok) > 0 {
				h.DelBytes(tok)
			}
		}
	}
	for i, k := range hopHeaders {
		if present&(1<<i) != 0 {
			h.Del(k)
		}
	}
	return scratch
}

// hopBit returns the bit of k in hopHeaders, or 0.
func hopBit(k []byte) uint16 {
	if i := hopIndex(k); i >= 0 {
		return 1 << i
	}
	return 0
}

// hopIndex returns k's index in hopHeaders, or -1.
func hopIndex(k []byte) int {
	if len(k) < 2 || len(k) > len("Proxy-Authorization") {
		return -1
	}
	for i, h := range hopHeaders {
		if len(h) == len(k) && bytes.EqualFold(k, []byte(h)) {
			return i
		}
	}
	return -1
}

// upgradeType returns the protocol a request asks to switch to (RFC 9110
// §7.8), or nil. Only a request whose Connection lists "upgrade" counts.
func upgradeType(h *fasthttp.RequestHeader) []byte {
	if !connectionHas(h.Peek("Connection"), "upgrade") {
		return nil
	}
	return h.Peek("Upgrade")
}

func connectionHas(v []byte, token string) bool {
	for tok := range bytes.SplitSeq(v, []byte{','}) {
		if bytes.EqualFold(bytes.TrimSpace(tok), []byte(token)) {
			return true
		}
	}
	return false
}

// peerAddr returns the socket peer's IP.
func peerAddr(ctx *fasthttp.RequestCtx) netip.Addr {
	if ta, ok := ctx.RemoteAddr().(*net.TCPAddr); ok {
		if a, ok := netip.AddrFromSlice(ta.IP); ok {
			return a.Unmap()
		}
	}
	return netip.Addr{}
}

// setForwardedHeaders rewrites X-Forwarded-For/-Proto/-Host. A trusted
// peer's values are kept and the peer is appended; from anyone else they
// are started afresh, so a client cannot plant addresses (or a scheme, or a
// host) that the upstream would believe. Forwarded (RFC 7239) is removed
// from untrusted peers for the same reason.
func setForwardedHeaders(ctx *fasthttp.RequestCtx, srv *policy.Server, peer netip.Addr, scratch []byte) []byte {
	h := &ctx.Request.Header
	trusted := peer.IsValid() && srv.Trusted(peer)
	scratch = scratch[:0]
	if trusted {
		for _, v := range h.PeekAll("X-Forwarded-For") {
			if len(scratch) > 0 {
				scratch = append(scratch, ", "...)
			}
			scratch = append(scratch, v...)
		}
	}
	if len(scratch) > 0 {
		scratch = append(scratch, ", "...)
	}
	scratch = peer.AppendTo(scratch)
	h.Del("X-Forwarded-For")
	h.SetBytesV("X-Forwarded-For", scratch)

	if !trusted || len(h.Peek("X-Forwarded-Proto")) == 0 {
		if ctx.IsTLS() {
			h.Set("X-Forwarded-Proto", "https")
		} else {
			h.Set("X-Forwarded-Proto", "http")
		}
	}
	if !trusted || len(h.Peek("X-Forwarded-Host")) == 0 {
		if host := h.Host(); len(host) > 0 {
			h.SetBytesV("X-Forwarded-Host", host)
		} else {
			h.Del("X-Forwarded-Host")
		}
	}
	if !trusted {
		h.Del("Forwarded")
	}
	return scratch
}

// requestIDs makes process-unique request ids: a random prefix chosen at
// start-up and a counter. Cheaper than a UUID per request, and unique
// across replicas with overwhelming probability.
type requestIDs struct {
	prefix [12]byte // hex of 6 random bytes
	n      atomic.Uint64
}

func newRequestIDs() *requestIDs {
	var r [6]byte
	_, _ = rand.Read(r[:])
	ids := &requestIDs{}
	hex.Encode(ids.prefix[:], r[:])
	return ids
}

func (g *requestIDs) next(dst []byte) []byte {
	dst = append(dst, g.prefix[:]...)
	dst = append(dst, '-')
	return strconv.AppendUint(dst, g.n.Add(1), 16)
}

// validRequestID accepts a client-supplied id only if it is short and made
// of visible ASCII, so it cannot inject anything into logs or headers.
func validRequestID(v []byte) bool {
	if len(v) == 0 || len(v) > 128 {
		return false
	}
	for _, c := range v {
		if c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// tokenChars marks RFC 9110 token characters (field names, methods).
var tokenChars = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// checkRawHeaders rejects what fasthttp lets through but RFC 9112 forbids
// and request smugglers use: a field name with spaces or control bytes,
// and Content-Length together with Transfer-Encoding (fasthttp drops the
// Content-Length and carries on; a front end that disagrees with the back
// end about where the body ends is how smuggling works, so refuse).
func checkRawHeaders(h *fasthttp.RequestHeader) bool {
	raw := h.RawHeaders()
	chunked := h.ContentLength() == -1
	for len(raw) > 0 {
		line := raw
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line, raw = raw[:i], raw[i+1:]
		} else {
			raw = nil
		}
		line = bytes.TrimSuffix(line, []byte{'\r'})
		if len(line) == 0 {
			continue
		}
		if line[0] == ' ' || line[0] == '\t' { // obs-fold continuation (RFC 9112 §5.2)
			continue
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return false
		}
		name := line[:colon]
		for _, c := range name {
			if !tokenChars[c] {
				return false
			}
		}
		if chunked && bytes.EqualFold(name, []byte("Content-Length")) {
			return false
		}
	}
	return true
}
