package test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// loadResult counts what a closed-loop load saw.
type loadResult struct {
	ok, refused, dropped atomic.Int64
	closeHeaders         atomic.Int64
	dials                atomic.Int64
	// remoteCloses counts client connections the sidecar closed: a read
	// that failed on a connection the client had not closed itself. Dials
	// alone cannot show it: net/http's transport may dial a spare
	// connection when a request starts just before the previous one is
	// back in its idle pool, and then closes the spare itself.
	remoteCloses atomic.Int64
	mu           sync.Mutex
	firstDrop    error
	bodies       map[string]int
}

// runLoad runs workers sending GET path until stop is closed or a dial is
// refused (the listener is gone). A request whose connection was accepted
// and that got no complete 200 is a drop.
func runLoad(t *testing.T, addr, path string, workers int, stop <-chan struct{}) (*loadResult, *sync.WaitGroup) {
	res := &loadResult{bodies: map[string]int{}}
	tr := &http.Transport{MaxIdleConnsPerHost: workers}
	tr.Dial = func(network, a string) (net.Conn, error) {
		res.dials.Add(1)
		c, err := net.Dial(network, a)
		if err != nil {
			return nil, err
		}
		return &watchedConn{Conn: c, remoteCloses: &res.remoteCloses}, nil
	}
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := client.Get("http://" + addr + path)
				if err != nil {
					var op *net.OpError
					if errors.As(err, &op) && op.Op == "dial" {
						res.refused.Add(1)
						return
					}
					res.dropped.Add(1)
					res.mu.Lock()
					if res.firstDrop == nil {
						res.firstDrop = err
					}
					res.mu.Unlock()
					continue
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != 200 {
					res.dropped.Add(1)
					res.mu.Lock()
					if res.firstDrop == nil {
						res.firstDrop = fmt.Errorf("status %d, body %q, err %v", resp.StatusCode, b, err)
					}
					res.mu.Unlock()
					continue
				}
				res.ok.Add(1)
				if resp.Close {
					res.closeHeaders.Add(1)
				}
				res.mu.Lock()
				res.bodies[string(b)]++
				res.mu.Unlock()
			}
		}()
	}
	return res, &wg
}

// watchedConn notices when the far end closes the connection.
type watchedConn struct {
	net.Conn
	closedHere   atomic.Bool
	remoteCloses *atomic.Int64
}

func (c *watchedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil && !c.closedHere.Load() {
		c.remoteCloses.Add(1)
	}
	return n, err
}

func (c *watchedConn) Close() error {
	c.closedHere.Store(true)
	return c.Conn.Close()
}

func TestDrainUnderLoadDropsNothing(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(50 * time.Millisecond)
		io.WriteString(w, "ok")
	})
	sc := startSidecar(t, "[server]\ndrain_delay = \"500ms\"\ndrain_timeout = \"5s\"\n"+routeTo(be.url(), ""))
	stop := make(chan struct{})
	res, wg := runLoad(t, sc.Addr, "/", 16, stop)
	time.Sleep(500 * time.Millisecond)
	before := res.ok.Load()
	sc.signal(syscall.SIGTERM)

	// /readyz fails first, while the proxy still serves.
	time.Sleep(100 * time.Millisecond)
	resp, err := http.Get("http://" + sc.Admin + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 503 {
		t.Errorf("/readyz during drain = %d, want 503", resp.StatusCode)
	}
	if res.ok.Load() == before {
		time.Sleep(200 * time.Millisecond)
	}
	duringDelay := res.ok.Load() - before

	code := sc.wait(10 * time.Second)
	close(stop)
	wg.Wait()
	if code != 0 {
		t.Errorf("exit code %d after drain", code)
	}
	if res.dropped.Load() != 0 {
		t.Errorf("%d requests dropped during drain; first: %v", res.dropped.Load(), res.firstDrop)
	}
	if duringDelay == 0 {
		t.Errorf("no request served while /readyz was failing: the listener closed too early")
	}
	if res.closeHeaders.Load() == 0 {
		t.Errorf("no response during drain carried Connection: close")
	}
	t.Logf("drain under load: %d ok (%d after SIGTERM), %d with Connection: close, %d refused after close, 0 dropped",
		res.ok.Load(), res.ok.Load()-before, res.closeHeaders.Load(), res.refused.Load())
}

func TestDrainDeadlineCutsStreamsVisibly(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		n := 5
		if r.URL.Path == "/long" {
			n = 100
		}
		for i := 0; i < n; i++ {
			fmt.Fprintf(w, "%d;", i)
			http.NewResponseController(w).Flush()
			time.Sleep(100 * time.Millisecond)
		}
	})
	sc := startSidecar(t, "[server]\ndrain_timeout = \"1500ms\"\n"+routeTo(be.url(), ""))
	type result struct {
		body string
		err  error
	}
	get := func(path string) chan result {
		ch := make(chan result, 1)
		go func() {
			resp, err := http.Get(sc.url(path))
			if err != nil {
				ch <- result{err: err}
				return
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			ch <- result{string(b), err}
		}()
		return ch
	}
	short, long := get("/short"), get("/long")
	time.Sleep(150 * time.Millisecond)
	start := time.Now()
	sc.signal(syscall.SIGTERM)
	s, l := <-short, <-long
	if s.err != nil || s.body != "0;1;2;3;4;" {
		t.Errorf("a stream that ends within the drain deadline was not completed: %q %v", s.body, s.err)
	}
	if l.err == nil {
		t.Errorf("a stream cut at the drain deadline looked complete: %q", l.body)
	}
	if code := sc.wait(5 * time.Second); code != 0 {
		t.Errorf("exit code %d", code)
	}
	t.Logf("exited %v after SIGTERM (drain_timeout 1.5s); long stream cut with %v", time.Since(start).Round(time.Millisecond), l.err)
}

func TestReloadUnderLoad(t *testing.T) {
	a := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "A") })
	b := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "B") })
	sc := startSidecar(t, routeTo(a.url(), ""))
	stop := make(chan struct{})
	res, wg := runLoad(t, sc.Addr, "/", 4, stop)
	stopped := false
	stopLoad := func() {
		if !stopped {
			stopped = true
			close(stop)
			wg.Wait()
		}
	}
	defer stopLoad()

	waitBody := func(want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			resp, err := http.Get(sc.url("/"))
			if err == nil {
				got, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if string(got) == want {
					return
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("traffic never moved to %s", want)
	}
	time.Sleep(200 * time.Millisecond)
	before := sc.metric(`sidecar_requests_total{route="app",method="GET",status_class="2xx",tier="anonymous"}`)

	// SIGHUP with a new upstream.
	sc.writeConfig(routeTo(b.url(), ""))
	sc.signal(syscall.SIGHUP)
	waitBody("B")

	// A bad config is rejected; the last good one keeps serving.
	sc.writeConfig(routeTo(a.url(), "bogus_key = 1"))
	sc.signal(syscall.SIGHUP)
	time.Sleep(300 * time.Millisecond)
	waitBody("B")
	if !strings.Contains(sc.logs.String(), "config reload rejected") || !strings.Contains(sc.logs.String(), "bogus_key") {
		t.Errorf("rejected reload not logged with its reason:\n%s", sc.logs.String())
	}
	if v := sc.metric(`sidecar_config_reloads_total{result="failure"}`); v < 1 {
		t.Errorf("failed reloads counted %v", v)
	}

	// A change of the file alone (a ConfigMap update) reloads too.
	sc.writeConfig(routeTo(a.url(), ""))
	waitBody("A")

	// Many reloads in a row under load.
	for i := 0; i < 10; i++ {
		up := a.url()
		if i%2 == 0 {
			up = b.url()
		}
		sc.writeConfig(routeTo(up, ""))
		sc.signal(syscall.SIGHUP)
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	stopLoad()
	after := sc.metric(`sidecar_requests_total{route="app",method="GET",status_class="2xx",tier="anonymous"}`)
	if after < before || before < 1 {
		t.Errorf("route counter went from %v to %v across reloads: must carry over", before, after)
	}
	if res.dropped.Load() != 0 {
		t.Errorf("%d requests failed during reloads; first: %v", res.dropped.Load(), res.firstDrop)
	}
	if n := res.remoteCloses.Load(); n != 0 {
		t.Errorf("the sidecar closed %d client connections during reloads", n)
	}
	t.Logf("reloads under load: %d requests ok, %d client connections (none closed by the sidecar), 0 failed; bodies %v", res.ok.Load(), res.dials.Load(), res.bodies)
}

// A reload that changes restart-only settings applies the rest and warns,
// naming each key it could not apply.
func TestReloadNamesRestartOnlyKeys(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	sc := startSidecar(t, "[server]\n"+routeTo(be.url(), ""))
	reloads := sc.metric(`sidecar_config_reloads_total{result="success"}`)
	sc.writeConfig("[server]\nreuse_port = true\nadmin_pprof = true\nidle_timeout = \"30s\"\n" + routeTo(be.url(), ""))
	deadline := time.Now().Add(5 * time.Second)
	for sc.metric(`sidecar_config_reloads_total{result="success"}`) == reloads && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	logs := sc.logs.String()
	for _, key := range []string{"server.reuse_port", "server.admin_pprof", "server.idle_timeout"} {
		if !strings.Contains(logs, "needs a restart") || !strings.Contains(logs, key) {
			t.Errorf("reload warning does not name %s:\n%s", key, logs)
		}
	}
}
