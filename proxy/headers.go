package proxy

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync/atomic"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/internal/httpsyntax"
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
	PeekAll(key string) [][]byte
	Del(key string)
	DelBytes(key []byte)
}

// fieldSet is a set of field names compared as CGI-style backends (WSGI,
// PHP, Rack) see them: case-insensitively and with '_' read as '-', since
// they map X_Sidecar_Tier and X-Sidecar-Tier to the same variable.
type fieldSet struct {
	byLen [][][]byte // folded names by length, up to the longest
}

func newFieldSet(names ...string) *fieldSet {
	fs := &fieldSet{}
	for _, n := range names {
		if len(n) >= len(fs.byLen) {
			fs.byLen = append(fs.byLen, make([][][]byte, len(n)+1-len(fs.byLen))...)
		}
		f := make([]byte, len(n))
		for i := range len(n) {
			f[i] = foldByte(n[i])
		}
		fs.byLen[len(n)] = append(fs.byLen[len(n)], f)
	}
	return fs
}

func foldByte(c byte) byte {
	switch {
	case c == '_':
		return '-'
	case 'A' <= c && c <= 'Z':
		return c + 'a' - 'A'
	}
	return c
}

func (fs *fieldSet) has(k []byte) bool {
	if fs == nil || len(k) >= len(fs.byLen) {
		return false
	}
next:
	for _, f := range fs.byLen[len(k)] {
		for i, c := range k {
			if foldByte(c) != f[i] {
				continue next
			}
		}
		return true
	}
	return false
}

// requestFilter says which fields stripRequest removes besides the
// hop-by-hop ones. It is built once per policy snapshot.
type requestFilter struct {
	// written are the fields the sidecar writes itself (identity,
	// X-Forwarded-*, request id): every client copy goes, whatever its
	// spelling, and a Connection token naming one is ignored.
	written *fieldSet
	// trustedOnly (server.trusted_only_headers) go unless the peer is a
	// trusted proxy.
	trustedOnly *fieldSet
}

func newRequestFilter(snap *policy.Snapshot) *requestFilter {
	id := &snap.Identity
	return &requestFilter{
		written: newFieldSet(id.ClientHeader, id.TierHeader, snap.Server.RequestIDHeader,
			"X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"),
		trustedOnly: newFieldSet(snap.Server.TrustedOnlyHeaders...),
	}
}

// stripRequest removes from a request head the hop-by-hop fields (RFC 9110
// §7.6.1), including every field named in Connection, and the fields
// rf says go (trustedPeer: the peer is a trusted proxy). It looks first
// (one pass, no allocation) and deletes only what is there: each Del
// costs a key normalisation and a scan of all fields.
func stripRequest(h *fasthttp.RequestHeader, rf *requestFilter, trustedPeer bool, scratch []byte) []byte {
	var present uint16 // bit i: hopHeaders[i] is there
	scratch = scratch[:0]
	for k := range h.All() {
		if b := hopBit(k); b != 0 {
			present |= b
			continue
		}
		if rf.written.has(k) || (!trustedPeer && rf.trustedOnly.has(k)) {
			scratch = append(append(scratch, k...), 0) // Del mutates what All yields: delete after
		}
	}
	for rest := scratch; len(rest) > 0; {
		i := bytes.IndexByte(rest, 0)
		h.DelBytes(rest[:i])
		rest = rest[i+1:]
	}
	return stripHop(h, present, scratch)
}

// stripResponseHop removes hop-by-hop fields from a response head.
func stripResponseHop(h *fasthttp.ResponseHeader, scratch []byte) []byte {
	var present uint16
	for k := range h.All() {
		present |= hopBit(k)
	}
	return stripHop(h, present, scratch)
}

// stripHop deletes the hop-by-hop fields present says are there, and the
// fields Connection names but Host (routing and the upstream must see the
// same authority). Fields the sidecar writes are written after this, so
// naming them in Connection cannot make them vanish either.
func stripHop(h headerDeleter, present uint16, scratch []byte) []byte {
	if present == 0 {
		return scratch
	}
	if present&1 != 0 { // Connection: drop the fields it lists
		// Every Connection line: they are one list (RFC 9110 §5.3). Copied
		// first, as Del mutates the storage the values point into.
		scratch = scratch[:0]
		for _, v := range h.PeekAll("Connection") {
			scratch = append(append(scratch, v...), ',')
		}
		for tok := range bytes.SplitSeq(scratch, []byte{','}) {
			if tok = bytes.TrimSpace(tok); len(tok) > 0 && !bytes.EqualFold(tok, []byte("Host")) {
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
	if !h.IsHTTP11() {
		return nil // an HTTP/1.0 request's Upgrade is ignored (RFC 9110 §7.8)
	}
	for _, v := range h.PeekAll("Connection") { // every line: one list (RFC 9110 §5.3)
		if connectionHas(v, "upgrade") {
			return h.Peek("Upgrade")
		}
	}
	return nil
}

// upgrade returns the protocol list a request asks to switch to when every
// protocol in it is in server.allowed_upgrades (a copy: the head is
// rewritten before it is used), and false when one is not. A request that
// asks for none, or only for h2c, gets nil and true: h2c's upgrade is
// ignored and the request served as HTTP/1.1 (RFC 9110 §7.8 lets a server
// ignore Upgrade; RFC 9113 §3.1 deprecates that upgrade), which is what
// `curl --http2` on a plain URL expects.
func (st *state) upgrade(h *fasthttp.RequestHeader) ([]byte, bool) {
	up := bytes.TrimSpace(upgradeType(h))
	if len(up) == 0 {
		return nil, true
	}
	allowed, onlyH2C := true, true
	for tok := range bytes.SplitSeq(up, []byte{','}) {
		name, _, _ := bytes.Cut(bytes.TrimSpace(tok), []byte{'/'}) // protocol-name[/protocol-version]
		if len(name) == 0 {
			continue
		}
		onlyH2C = onlyH2C && bytes.EqualFold(name, []byte("h2c"))
		allowed = allowed && slices.ContainsFunc(st.snap.Server.AllowedUpgrades, func(a string) bool {
			return bytes.EqualFold(name, []byte(a))
		})
	}
	switch {
	case allowed:
		return append([]byte(nil), up...), true
	case onlyH2C:
		return nil, true
	}
	return nil, false
}

// originForm turns an absolute-form request target ("GET http://host/x",
// RFC 9112 §3.2.2) into origin-form with the target's authority as Host,
// as RFC 9112 §3.2.2 and RFC 9110 §7.2 have a recipient do: routing,
// limits, Host and X-Forwarded-Host then all use the one authority the
// client named, whatever its Host field said. It returns false for an
// absolute target that cannot be honoured: another scheme, no authority,
// or userinfo (RFC 9110 §4.2.4).
func originForm(req *fasthttp.Request) bool {
	uri := req.Header.RequestURI()
	if len(uri) > 0 && uri[0] == '/' {
		// No request-target has a fragment (RFC 9112 §3.2). fasthttp
		// routes on the path before a '#', a backend may not: for
		// "/public/x#/../../secret" Go's FileServer serves /secret.
		return bytes.IndexByte(uri, '#') < 0
	}
	if len(uri) == 0 || uri[0] == '*' {
		return true
	}
	i := bytes.Index(uri, []byte("://"))
	if i <= 0 {
		return true // not absolute-form (CONNECT's authority-form)
	}
	scheme, rest := uri[:i], uri[i+3:]
	if !bytes.EqualFold(scheme, []byte("http")) && !bytes.EqualFold(scheme, []byte("https")) {
		return false
	}
	end := bytes.IndexAny(rest, "/?#")
	if end < 0 {
		end = len(rest)
	}
	authority, target := rest[:end], rest[end:]
	if len(authority) == 0 || bytes.IndexByte(authority, '@') >= 0 {
		return false
	}
	for _, c := range authority {
		if !tokenChars[c] && c != ':' && c != '[' && c != ']' {
			return false
		}
	}
	if i := bytes.IndexByte(target, '#'); i >= 0 {
		target = target[:i] // a fragment is never sent (RFC 9110 §4.2.5)
	}
	// Both alias the URI buffer that the setters overwrite.
	buf := make([]byte, 0, len(authority)+len(target)+1)
	buf = append(buf, authority...)
	if len(target) == 0 || target[0] != '/' {
		buf = append(buf, '/')
	}
	buf = append(buf, target...)
	req.Header.SetHostBytes(buf[:len(authority)])
	req.SetRequestURIBytes(buf[len(authority):])
	return true
}

// offered reports whether every protocol in an upstream's 101 Upgrade is
// one of those the client asked for (asked: its Upgrade list), compared by
// name and version, case-insensitively. An empty Upgrade is not an answer.
func offered(asked, answered []byte) bool {
	some := false
	for tok := range bytes.SplitSeq(answered, []byte{','}) {
		if tok = bytes.TrimSpace(tok); len(tok) == 0 {
			continue
		}
		some = true
		found := false
		for a := range bytes.SplitSeq(asked, []byte{','}) {
			if bytes.EqualFold(bytes.TrimSpace(a), tok) {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return some
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

// forwardedIn is what a trusted peer said in X-Forwarded-For, -Proto and
// -Host, copied before stripRequest removes every client copy of them.
type forwardedIn struct {
	buf               []byte // for, then proto, then host
	forLen, protoLen  int
	trusted, captured bool
}

func (f *forwardedIn) capture(h *fasthttp.RequestHeader) {
	b := f.buf[:0]
	for _, v := range h.PeekAll("X-Forwarded-For") {
		if len(b) > 0 {
			b = append(b, ", "...)
		}
		b = append(b, v...)
	}
	f.forLen = len(b)
	b = append(b, h.Peek("X-Forwarded-Proto")...)
	f.protoLen = len(b) - f.forLen
	f.buf = append(b, h.Peek("X-Forwarded-Host")...)
	f.captured = true
}

func (f *forwardedIn) reset() { *f = forwardedIn{buf: f.buf[:0]} }

// setForwardedHeaders writes X-Forwarded-For/-Proto/-Host, once each. A
// trusted peer's values (in) are kept and the peer is appended; from anyone
// else they are started afresh, so a client cannot plant addresses (or a
// scheme, or a host) that the upstream would believe.
func setForwardedHeaders(ctx *fasthttp.RequestCtx, in *forwardedIn, peer netip.Addr, scratch []byte) []byte {
	h := &ctx.Request.Header
	var forIn, protoIn, hostIn []byte
	if in.trusted && in.captured {
		forIn, protoIn, hostIn = in.buf[:in.forLen], in.buf[in.forLen:in.forLen+in.protoLen], in.buf[in.forLen+in.protoLen:]
	}
	scratch = append(scratch[:0], forIn...)
	if len(scratch) > 0 {
		scratch = append(scratch, ", "...)
	}
	scratch = peer.AppendTo(scratch)
	h.SetBytesV("X-Forwarded-For", scratch)

	switch {
	case len(protoIn) > 0:
		h.SetBytesV("X-Forwarded-Proto", protoIn)
	case ctx.IsTLS():
		h.Set("X-Forwarded-Proto", "https")
	default:
		h.Set("X-Forwarded-Proto", "http")
	}
	if len(hostIn) > 0 {
		h.SetBytesV("X-Forwarded-Host", hostIn)
	} else if host := h.Host(); len(host) > 0 {
		h.SetBytesV("X-Forwarded-Host", host)
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
var tokenChars = httpsyntax.Token

// checkRawHeaders rejects what fasthttp lets through but RFC 9112 forbids
// and request smugglers use: a field name with spaces or control bytes,
// a second Host or one that is not host[:port], Content-Length together
// with Transfer-Encoding (fasthttp drops the Content-Length and carries
// on), and a Transfer-Encoding that is not chunked (fasthttp reads
// "identity" as no body and the bytes after the head as the next request;
// RFC 9112 §6.3 has a server refuse a request whose final coding is not
// chunked). A front end that disagrees with the back end about where the
// body ends is how smuggling works, so refuse.
func checkRawHeaders(h *fasthttp.RequestHeader) bool {
	raw := h.RawHeaders()
	chunked := h.ContentLength() == -1
	hosts, codings := 0, false
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
		codings = codings || bytes.EqualFold(name, []byte("Transfer-Encoding"))
		if bytes.EqualFold(name, []byte("Host")) {
			if hosts++; hosts > 1 {
				return false // RFC 9112 §3.2: more than one Host is a 400
			}
		}
	}
	if codings && !chunked {
		return false
	}
	return len(h.Host()) == 0 || validHost(h.Host())
}

// validHost reports whether v is uri-host [ ":" port ] (RFC 9110 §7.2,
// RFC 3986 §3.2.2): an IP literal in brackets, or a name of unreserved,
// percent-encoded and sub-delim characters, then an optional port of
// digits. An invalid Host is a 400 (RFC 9112 §3.2): "a.test:80@evil.com"
// would route as a.test (the port cut at the last colon) and reach a
// backend that reads its host as evil.com.
func validHost(v []byte) bool {
	host, port := v, []byte(nil)
	if len(v) > 0 && v[0] == '[' {
		end := bytes.IndexByte(v, ']')
		if end < 0 {
			return false
		}
		for _, c := range v[1:end] {
			if !hostChars[c] && c != ':' {
				return false
			}
		}
		host, port = nil, v[end+1:]
		if len(port) > 0 {
			if port[0] != ':' {
				return false
			}
			port = port[1:]
		}
	} else if i := bytes.IndexByte(v, ':'); i >= 0 {
		host, port = v[:i], v[i+1:]
	}
	for _, c := range host {
		if !hostChars[c] {
			return false
		}
	}
	for _, c := range port {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// hostChars are a reg-name's characters (RFC 3986 §3.2.2): unreserved,
// '%' of percent-encoding, and sub-delims.
var hostChars = httpsyntax.AlnumAnd("-._~%!$&'()*+,;=")
