package proxy

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/policy"
)

// Benchmarks of each stage of the request path on a warm exchange, without
// the network (docs/PERFORMANCE.md has what each costs inside the whole
// request): go test -run '^$' -bench Stage -benchmem ./proxy

// stageRequest is a typical API request through a trusted proxy.
const stageRequest = "GET /api/v1/items?x=1 HTTP/1.1\r\nHost: a.example.com\r\nConnection: keep-alive\r\nUser-Agent: t\r\n" +
	"X-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\nX-Sidecar-Tier: premium\r\n\r\n"

// stage is an exchange on a proxy of the given config extra, with the
// request head read into its ctx.
type stage struct {
	p   *Proxy
	ctx fasthttp.RequestCtx
	raw []byte
	src *bytes.Reader
	br  *bufio.Reader
	x   *exchange
}

func newStage(b *testing.B, extra string) *stage {
	b.Helper()
	snap, err := policy.Parse("t", []byte(`
[server]
trusted_proxies = ["10.0.0.0/8"]
[upstreams.app]
url = "http://127.0.0.1:1"
`+extra+`
[[routes]]
host = "*.example.com"
path_prefix = "/api/"
upstream = "app"
[[routes]]
name = "app"
upstream = "app"
`))
	if err != nil {
		b.Fatal(err)
	}
	p, err := New(snap, Settings{Metrics: metrics.NewSet(), AccessLog: io.Discard})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.Close)
	s := &stage{p: p, raw: []byte(stageRequest)}
	s.ctx.Init(&fasthttp.Request{}, &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 5555}, nil)
	s.src = bytes.NewReader(s.raw)
	s.br = bufio.NewReader(s.src)
	s.read(b)
	return s
}

// read parses the request head afresh.
func (s *stage) read(b *testing.B) {
	s.ctx.Request.Header.Reset()
	s.src.Reset(s.raw)
	s.br.Reset(s.src)
	if err := s.ctx.Request.Header.Read(s.br); err != nil {
		b.Fatal(err)
	}
}

// begin takes an exchange and runs begin on the current head.
func (s *stage) begin(b *testing.B) *exchange {
	x := exchangePool.Get().(*exchange)
	x.p, x.r.ctx = s.p, &s.ctx
	x.begin()
	if x.r.rt == nil {
		b.Fatal("no route")
	}
	return x
}

const stageTiers = "[tiers.anonymous]\nlimit = 1000000000\nwindow = \"1m\"\n"

func BenchmarkStageParseHead(b *testing.B) {
	s := newStage(b, "")
	b.ReportAllocs()
	for b.Loop() {
		s.read(b)
	}
}

func BenchmarkStageRoute(b *testing.B) { // begin: request id, origin form, route
	s := newStage(b, "")
	b.ReportAllocs()
	for b.Loop() {
		s.begin(b).release()
	}
}

func BenchmarkStageIdentityNoTiers(b *testing.B) { // limit() with nothing to limit: identity only
	s := newStage(b, "")
	x := s.begin(b)
	h := &s.ctx.Request.Header
	b.ReportAllocs()
	for b.Loop() {
		if x.limit(h) != nil {
			b.Fatal("refused")
		}
	}
	x.release()
}

func BenchmarkStageLimitMemory(b *testing.B) { // identity and a memory-store sliding window
	s := newStage(b, stageTiers)
	x := s.begin(b)
	h := &s.ctx.Request.Header
	b.ReportAllocs()
	for b.Loop() {
		if x.limit(h) != nil {
			b.Fatal("refused")
		}
	}
	x.release()
}

func BenchmarkStageOverload(b *testing.B) { // a slot taken and given back with a sample
	s := newStage(b, "[upstreams.app.overload]\n")
	x := s.begin(b)
	x.r.up = x.r.rt.up
	b.ReportAllocs()
	for b.Loop() {
		if err := x.enterOverload(); err != nil {
			b.Fatal(err)
		}
		x.r.upLatency = time.Millisecond
		x.leaveOverload(time.Now())
	}
	x.release()
}

func BenchmarkStageCircuit(b *testing.B) { // the breaker's ticket: Allow, Report, Done
	s := newStage(b, "")
	x := s.begin(b)
	x.r.up = x.r.rt.up
	b.ReportAllocs()
	for b.Loop() {
		if err := x.enterCircuit(); err != nil {
			b.Fatal(err)
		}
		x.r.ticket.Report(false, time.Now())
		x.r.ticket.Done()
	}
	x.release()
}

// The head's whole way from the client's bytes to the upstream's: parse,
// route, identity (no tiers), rewrite. Less ParseHead, Route and
// IdentityNoTiers, it is prepareRequest's cost.
func BenchmarkStageHeadToUpstream(b *testing.B) {
	s := newStage(b, "")
	h := &s.ctx.Request.Header
	b.ReportAllocs()
	for b.Loop() {
		s.read(b)
		x := s.begin(b)
		if x.limit(h) != nil {
			b.Fatal("refused")
		}
		x.prepareRequest(h, 0)
		x.release()
	}
}

func BenchmarkStageRecord(b *testing.B) { // metrics of a finished request (access log off)
	s := newStage(b, "")
	x := s.begin(b)
	x.r.status = 200
	b.ReportAllocs()
	for b.Loop() {
		x.p.m.inFlight.Add(1)
		x.record(time.Now())
	}
	x.release()
}
