package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/overload"
	"github.com/sidecar-proxy/sidecar/policy"
)

// Overload protection in the request path: each test failed before the
// fix it names (found by a hostile review of the wiring).

type nopConn struct{}

func (nopConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (nopConn) Write(b []byte) (int, error)      { return len(b), nil }
func (nopConn) Close() error                     { return nil }
func (nopConn) LocalAddr() net.Addr              { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 80} }
func (nopConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 5555} }
func (nopConn) SetDeadline(time.Time) error      { return nil }
func (nopConn) SetReadDeadline(time.Time) error  { return nil }
func (nopConn) SetWriteDeadline(time.Time) error { return nil }

func overloadCtx(t *testing.T, raw string) *fasthttp.RequestCtx {
	var ctx fasthttp.RequestCtx
	ctx.Init2(nopConn{}, nil, false)
	if err := ctx.Request.Header.Read(bufio.NewReader(bytes.NewReader([]byte(raw)))); err != nil {
		t.Fatal(err)
	}
	return &ctx
}

// A request decided by the 100-continue handler (p.expect) skips
// admission.Limit in the handler; its priority comes with the handler's
// verdict. It was read from x.dec, whatever the pooled exchange last held:
// an anonymous client got the priority (and the reserved share) of the
// premium request served before it.
func TestOverloadExpectContinueKeepsItsPriority(t *testing.T) {
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys.toml")
	os.WriteFile(keys, []byte("[[keys]]\nsha256 = \""+policy.HashKey("known-key")+"\"\ntier = \"premium\"\nclient = \"acme\"\n"), 0o600)
	_, p, _ := startProxy(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }, `
[upstreams.app.overload]
min_limit = 10
max_limit = 10
initial_limit = 10
reserved = 0.1
queue_size = 0
[identity]
api_keys_file = "`+keys+`"
[tiers.premium]
limit = 1000
window = "1m"
priority = 100
[tiers.anonymous]
limit = 1000
window = "1m"
`)
	lim := p.state.Load().overload["app"].lim
	var held []overload.Token
	for range 9 { // the lower priorities' whole share
		tok, err := lim.Acquire(context.Background(), 0)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, tok)
	}
	defer func() {
		for _, tok := range held {
			tok.Ignore()
		}
	}()
	const anon = "GET /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n"
	const prem = "GET /p HTTP/1.1\r\nHost: x\r\nX-API-Key: known-key\r\n\r\n"

	c := overloadCtx(t, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
	p.Handler(c)
	t.Logf("anonymous, plain: %d %q", c.Response.StatusCode(), c.Response.Header.Peek("X-Sidecar-Fallback"))

	admitted := 0
	for range 20 {
		a := overloadCtx(t, anon)
		if s := p.expect(a); s != fasthttp.StatusContinue {
			t.Fatalf("expect: %d", s)
		}
		pc := overloadCtx(t, prem) // another client's request, between 100 Continue and the body
		p.Handler(pc)
		if pc.Response.StatusCode() != 200 {
			t.Fatalf("premium: %d", pc.Response.StatusCode())
		}
		p.Handler(a)
		if a.Response.StatusCode() == 200 {
			admitted++
		}
	}
	if admitted > 0 {
		t.Errorf("anonymous Expect: 100-continue requests admitted into the reserved slot %d of 20 times (want 0: shed)", admitted)
	}
}

// A request shed by app's overload protection and rerouted to its
// fallback upstream is served there: it stays charged to the rate limit
// (only a request answered locally is given back), and it takes a slot of
// the fallback upstream's own limit. Before, it was refunded and then
// served (the client's limit did not bind while app shed), and skipped
// alt's limiter.
func TestOverloadShedRerouteIsChargedAndTakesTheFallbacksSlot(t *testing.T) {
	hold := make(chan struct{})
	var altIn, altPeak, altServed atomic.Int64
	aln, _ := net.Listen("tcp", "127.0.0.1:0")
	asrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := altIn.Add(1)
		defer altIn.Add(-1)
		for p := altPeak.Load(); n > p && !altPeak.CompareAndSwap(p, n); p = altPeak.Load() {
		}
		time.Sleep(50 * time.Millisecond)
		altServed.Add(1)
		io.WriteString(w, "alt")
	})}
	go asrv.Serve(aln)
	t.Cleanup(func() { asrv.Close() })
	addr, p, _ := startProxy(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			<-hold
		}
		io.WriteString(w, "app")
	}, fmt.Sprintf(`
[upstreams.app.overload]
min_limit = 1
max_limit = 1
initial_limit = 1
reserved = 0.0
queue_size = 0
[upstreams.app.fallback]
upstream = "alt"
[upstreams.alt]
url = "http://%s"
[upstreams.alt.overload]
min_limit = 1
max_limit = 1
initial_limit = 1
reserved = 0.0
queue_size = 0
[tiers.anonymous]
limit = 3
window = "1m"
`, aln.Addr()))
	defer close(hold)
	go http.Get("http://" + addr + "/hold") // 1 of 3 spent, app's only slot held
	for deadline := time.Now().Add(2 * time.Second); p.state.Load().overload["app"].lim.InFlight() != 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("hold not in flight")
		}
	}
	codes := make(chan int, 10)
	for range 10 {
		go func() {
			resp, err := http.Get("http://" + addr + "/x")
			if err != nil {
				codes <- -1
				return
			}
			resp.Body.Close()
			codes <- resp.StatusCode
		}()
	}
	ok := 0
	for range 10 {
		if <-codes == 200 {
			ok++
		}
	}
	t.Logf("anonymous limit 3/min, 1 spent on /hold: %d of 10 more served (by alt); alt peak in flight %d (alt limit 1)", ok, altPeak.Load())
	if ok > 2 {
		t.Errorf("%d requests served past a limit of 3 a minute with 1 spent: shed-then-rerouted requests are refunded yet served", ok)
	}
	if altPeak.Load() > 1 {
		t.Errorf("alt had %d in flight with an overload limit of 1: rerouted requests skip alt's limiter", altPeak.Load())
	}
}

// With the default settings (initial limit 20, reserved 0.1: 18 slots for
// priorities below the top), 18 clients that start a large download and
// stop reading hold no slot: it is released at the response head, where
// its latency is sampled. Released at the end of the body, the 18 held
// every lower-priority slot as long as they liked, and everyone else of a
// lower tier was shed.
func TestOverloadSlowReadersHoldNoSlot(t *testing.T) {
	chunk := bytes.Repeat([]byte("x"), 1<<20)
	addr, p, _ := startProxy(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/big" {
			w.Header().Set("Content-Length", strconv.Itoa(256<<20))
			for range 256 {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
			return
		}
		w.Write([]byte("ok"))
	}, "[upstreams.app.overload]\n[tiers.anonymous]\nlimit = 1000\nwindow = \"1m\"\n[tiers.premium]\nlimit = 1000\nwindow = \"1m\"\npriority = 100\n")
	lim := p.state.Load().overload["app"].lim
	for range 18 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.(*net.TCPConn).SetReadBuffer(4096)
		c.Write([]byte("GET /big HTTP/1.1\r\nHost: x\r\n\r\n"))
		buf := make([]byte, 512)
		c.Read(buf) // the head, then nothing more is read
	}
	time.Sleep(3 * time.Second)
	resp, err := http.Get("http://" + addr + "/small")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	t.Logf("limit %d, in flight %d; an anonymous GET /small 3 s later: %d %q", lim.Limit(), lim.InFlight(), resp.StatusCode, resp.Header.Get("X-Sidecar-Fallback"))
	if resp.StatusCode != 200 {
		t.Errorf("18 stalled downloads shed every other lower-priority request")
	}
}

// Reloads that resize, turn off and turn on the limiter under load leave
// no slot taken and nobody queued in any limiter they made.
func TestOverloadReloadDuringRequests(t *testing.T) {
	addr, p, _ := startProxy(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Millisecond)
		io.WriteString(w, "ok")
	}, "[upstreams.app.overload]\nqueue_timeout = \"5ms\"\n")
	url := p.Snapshot().Upstreams["app"].Endpoints[0].URL
	seen := map[*overload.Limiter]bool{}
	var mu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := http.Get("http://" + addr + "/")
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		}()
	}
	for i := range 200 {
		var ol string
		switch i % 3 {
		case 0:
			ol = fmt.Sprintf("[upstreams.app.overload]\nreserved = 0.0\nmin_limit = %d\nmax_limit = %d\nqueue_size = %d\nqueue_timeout = \"5ms\"\n", 1+i%5, 10+i%7, i%3)
		case 1:
			ol = "[upstreams.app.overload]\nenabled = false\n"
		}
		snap, err := policy.Parse("t", []byte(fmt.Sprintf("[upstreams.app]\nurl = %q\n%s[[routes]]\nname = \"app\"\nupstream = \"app\"\n", url, ol)))
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Apply(snap); err != nil {
			t.Fatal(err)
		}
		if o := p.state.Load().overload["app"]; o != nil {
			mu.Lock()
			seen[o.lim] = true
			mu.Unlock()
		}
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	time.Sleep(100 * time.Millisecond)
	for l := range seen {
		if l.InFlight() != 0 || l.Queued() != 0 {
			t.Errorf("limiter left with %d in flight, %d queued", l.InFlight(), l.Queued())
		}
	}
	t.Logf("%d limiters seen", len(seen))
}
