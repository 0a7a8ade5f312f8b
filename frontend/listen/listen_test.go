package listen

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// testServers serves sp.HTTP1 with fasthttp and sp.HTTP2 with net/http. Each
// answers with its name, the protocol it saw and what it knows of TLS, so a
// test can tell which server a request reached.
func testServers(t *testing.T, sp *Splitter) {
	t.Helper()
	fs := &fasthttp.Server{
		Logger: log.New(io.Discard, "", 0), // a 400 for "PRI *" is expected
		Handler: func(ctx *fasthttp.RequestCtx) {
			alpn := "-"
			if st := ctx.TLSConnectionState(); st != nil {
				alpn = st.NegotiatedProtocol
			}
			fmt.Fprintf(ctx, "fasthttp %s tls=%v alpn=%q body=%q", ctx.Request.Header.Protocol(), ctx.IsTLS(), alpn, ctx.PostBody())
		},
	}
	var p http.Protocols
	p.SetHTTP2(true)
	p.SetUnencryptedHTTP2(true)
	hs := &http.Server{
		Protocols: &p,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			alpn := "-"
			if r.TLS != nil {
				alpn = r.TLS.NegotiatedProtocol
			}
			body, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "net/http HTTP/%d tls=%v alpn=%q body=%q", r.ProtoMajor, r.TLS != nil, alpn, body)
		}),
	}
	fsDone := make(chan error, 1)
	hsDone := make(chan error, 1)
	go func() { fsDone <- fs.Serve(sp.HTTP1()) }()
	go func() { hsDone <- hs.Serve(sp.HTTP2()) }()
	t.Cleanup(func() {
		_ = hs.Close()
		_ = fs.Shutdown()
		_ = sp.Close()
		if err := <-hsDone; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("net/http Serve: %v", err)
		}
		if err := <-fsDone; err != nil {
			t.Errorf("fasthttp Serve: %v", err)
		}
	})
}

func newSplitter(t *testing.T, s Settings) *Splitter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sp, err := New(ln, s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sp.Close() })
	return sp
}

func protocols(h1, h2, h2c bool) *http.Protocols {
	var p http.Protocols
	p.SetHTTP1(h1)
	p.SetHTTP2(h2)
	p.SetUnencryptedHTTP2(h2c)
	return &p
}

func get(t *testing.T, tr *http.Transport, method, url, body string) (string, *http.Response) {
	t.Helper()
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b), resp
}

func TestH2CSamePort(t *testing.T) {
	sp := newSplitter(t, Settings{H2C: true})
	testServers(t, sp)
	url := "http://" + sp.Addr().String() + "/"

	for _, tc := range []struct {
		name   string
		protos *http.Protocols
		method string
		body   string
		want   string
		major  int
	}{
		{"h1 GET", protocols(true, false, false), "GET", "", `fasthttp HTTP/1.1 tls=false alpn="-" body=""`, 1},
		{"h1 POST", protocols(true, false, false), "POST", "hello", `fasthttp HTTP/1.1 tls=false alpn="-" body="hello"`, 1},
		{"h1 PATCH", protocols(true, false, false), "PATCH", "x", `fasthttp HTTP/1.1 tls=false alpn="-" body="x"`, 1},
		{"h2c GET", protocols(false, false, true), "GET", "", `net/http HTTP/2 tls=false alpn="-" body=""`, 2},
		{"h2c POST", protocols(false, false, true), "POST", strings.Repeat("b", 100_000), `net/http HTTP/2 tls=false alpn="-" body="` + strings.Repeat("b", 100_000) + `"`, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, resp := get(t, &http.Transport{Protocols: tc.protos}, tc.method, url, tc.body)
			if got != tc.want {
				t.Errorf("got %.100q, want %.100q", got, tc.want)
			}
			if resp.ProtoMajor != tc.major {
				t.Errorf("client saw HTTP/%d, want %d", resp.ProtoMajor, tc.major)
			}
		})
	}
	if st := sp.Stats(); st.HTTP1 != 3 || st.HTTP2 != 2 || st.Accepted != 5 {
		t.Errorf("stats %+v, want 3 HTTP1 and 2 HTTP2 of 5", st)
	}
}

func TestTLSSamePort(t *testing.T) {
	serverCfg, pool := selfSigned(t)
	serverCfg.NextProtos = []string{"h2", "http/1.1"}
	sp := newSplitter(t, Settings{TLSConfig: serverCfg})
	testServers(t, sp)
	url := "https://" + sp.Addr().String() + "/"

	h1 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, NextProtos: []string{"http/1.1"}}, Protocols: protocols(true, false, false)}
	got, resp := get(t, h1, "POST", url, "one")
	if want := `fasthttp HTTP/1.1 tls=true alpn="http/1.1" body="one"`; got != want {
		t.Errorf("HTTP/1.1 client: got %q, want %q", got, want)
	}
	if resp.ProtoMajor != 1 {
		t.Errorf("HTTP/1.1 client saw HTTP/%d", resp.ProtoMajor)
	}

	h2 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	got, resp = get(t, h2, "POST", url, "two")
	if want := `net/http HTTP/2 tls=true alpn="h2" body="two"`; got != want {
		t.Errorf("HTTP/2 client: got %q, want %q", got, want)
	}
	if resp.ProtoMajor != 2 {
		t.Errorf("HTTP/2 client saw HTTP/%d", resp.ProtoMajor)
	}

	// A client that offers no ALPN at all speaks HTTP/1.1.
	c, err := tls.Dial("tcp", sp.Addr().String(), &tls.Config{RootCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got = roundTrip(t, c, "GET / HTTP/1.1\r\nHost: a\r\n\r\n")
	if want := `fasthttp HTTP/1.1 tls=true alpn="" body=""`; !strings.HasSuffix(got, want) {
		t.Errorf("no-ALPN client: got %q, want a body %q", got, want)
	}
}

// TestShortRequestNotDelayed shows the preface read stops at the first byte
// that differs: each request is shorter than the preface or only shares a
// prefix with it, the client keeps its conn open and waits, and the answer
// comes long before HandshakeTimeout would end a wait for 24 bytes.
func TestShortRequestNotDelayed(t *testing.T) {
	sp := newSplitter(t, Settings{H2C: true, HandshakeTimeout: time.Hour})
	testServers(t, sp)
	for _, tc := range []struct{ req, want string }{
		{"PUT / HTTP/1.1\r\nHost: a\r\n\r\n", "200 OK"},
		{"GET / HTTP/1.0\r\n\r\n", "200 OK"},   // 18 bytes
		{"PUT / HTTP/1.0\r\n\r\n", "200 OK"},   // differs at byte 2
		{"PATCH / HTTP/1.0\r\n\r\n", "200 OK"}, // differs at byte 2
		{"PRI / HTTP/1.0\r\n\r\n", "200 OK"},   // differs at byte 5
		// Differs at byte 12; fasthttp refuses "*" for any method but
		// OPTIONS, and answers at once.
		{"PRI * HTTP/1.1\r\nHost: a\r\n\r\n", "400 Bad Request"},
	} {
		t.Run(strings.Fields(tc.req)[0]+strings.Fields(tc.req)[2], func(t *testing.T) {
			c, err := net.Dial("tcp", sp.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			got := roundTrip(t, c, tc.req)
			if !strings.HasPrefix(got, "HTTP/1.1 "+tc.want+"\r\n") {
				t.Errorf("got %q, want %s", got, tc.want)
			}
			if tc.want == "200 OK" && !strings.Contains(got, "fasthttp HTTP/1.") {
				t.Errorf("got %q, want an answer from fasthttp", got)
			}
		})
	}
	if st := sp.Stats(); st.HTTP1 != 6 {
		t.Errorf("stats %+v, want 6 HTTP1", st)
	}
}

// roundTrip writes req to c, leaves c open and reads one response, waiting at
// most 10s.
func roundTrip(t *testing.T, c net.Conn, req string) string {
	t.Helper()
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading the response to %q: %v", req, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("HTTP/1.1 %s\r\n\r\n%s", resp.Status, body)
}

// TestSilentConnTimesOut: a conn that sends nothing is closed after
// HandshakeTimeout, and a conn behind it in the accept queue is served while
// the first one still waits.
func TestSilentConnTimesOut(t *testing.T) {
	serverCfg, pool := selfSigned(t)
	serverCfg.NextProtos = []string{"h2", "http/1.1"}
	for _, tc := range []struct {
		name     string
		settings Settings
		client   *http.Transport
		scheme   string
	}{
		{"h2c", Settings{H2C: true}, &http.Transport{Protocols: protocols(true, false, false)}, "http"},
		{"tls", Settings{TLSConfig: serverCfg}, &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}, "https"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.settings.HandshakeTimeout = time.Second
			sp := newSplitter(t, tc.settings)
			testServers(t, sp)

			silent, err := net.Dial("tcp", sp.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer silent.Close()
			start := time.Now()
			_, _ = get(t, tc.client, "GET", tc.scheme+"://"+sp.Addr().String()+"/", "")
			if st := sp.Stats(); st.TimedOut != 0 {
				t.Fatalf("the second conn was served only after the silent one timed out (%v): %+v", time.Since(start), st)
			}

			_ = silent.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := silent.Read(make([]byte, 1))
			if n != 0 || !errors.Is(err, io.EOF) {
				t.Fatalf("silent conn: read %d, %v; want the server to close it", n, err)
			}
			if d := time.Since(start); d < 900*time.Millisecond {
				t.Errorf("silent conn closed after %v, before HandshakeTimeout", d)
			}
			if st := sp.Stats(); st.TimedOut != 1 || st.Pending != 0 {
				t.Errorf("stats %+v, want 1 timed out, 0 pending", st)
			}
		})
	}
}

// TestDroppedWhenNotAccepted: a conn classified for a listener nobody
// serves is closed after HandshakeTimeout instead of waiting forever.
func TestDroppedWhenNotAccepted(t *testing.T) {
	sp := newSplitter(t, Settings{H2C: true, HandshakeTimeout: 200 * time.Millisecond})
	c, err := net.Dial("tcp", sp.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(preface); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("read: %v, want EOF", err)
	}
	if st := sp.Stats(); st.Dropped != 1 || st.HTTP2 != 0 {
		t.Errorf("stats %+v, want 1 dropped", st)
	}
}

func TestCloseEndsAccept(t *testing.T) {
	serverCfg, _ := selfSigned(t)
	for _, tc := range []struct {
		name string
		s    Settings
	}{
		{"plain", Settings{}},
		{"h2c", Settings{H2C: true}},
		{"tls", Settings{TLSConfig: serverCfg}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sp := newSplitter(t, tc.s)
			errs := make(chan error, 2)
			for _, l := range []net.Listener{sp.HTTP1(), sp.HTTP2()} {
				go func() {
					c, err := l.Accept()
					if c != nil {
						_ = c.Close()
					}
					errs <- err
				}()
			}
			// A conn stuck in classification (or, plain, accepted) while
			// Close runs.
			silent, err := net.Dial("tcp", sp.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer silent.Close()
			want := 2 // Accepts to end with net.ErrClosed
			if tc.s == (Settings{}) {
				// Plain: HTTP1's Accept takes the conn itself.
				if err := <-errs; err != nil {
					t.Fatalf("plain Accept: %v", err)
				}
				want = 1
			} else {
				// Wait until the splitter has the conn, so Close has to
				// interrupt its classification.
				for sp.Stats().Pending == 0 {
					time.Sleep(time.Millisecond)
				}
			}
			if err := sp.Close(); err != nil {
				t.Fatal(err)
			}
			if st := sp.Stats(); st.Pending != 0 {
				t.Errorf("Pending %d after Close", st.Pending)
			}
			for range want {
				select {
				case err := <-errs:
					if !errors.Is(err, net.ErrClosed) {
						t.Errorf("Accept: %v, want net.ErrClosed", err)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("Accept still blocked after Close")
				}
			}
			for _, l := range []net.Listener{sp.HTTP1(), sp.HTTP2()} {
				if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
					t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
				}
			}
			_ = silent.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := silent.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
				t.Errorf("pending conn after Close: %v, want EOF", err)
			}
			if c, err := net.Dial("tcp", sp.Addr().String()); err == nil {
				c.Close()
				t.Error("port still accepts after Close")
			}
			checkNoGoroutines(t)
		})
	}
}

// TestClosingBothChildrenReleasesPort: servers close their own listeners on
// Shutdown; once both have, the port is free.
func TestClosingBothChildrenReleasesPort(t *testing.T) {
	for _, s := range []Settings{{}, {H2C: true}} {
		sp := newSplitter(t, s)
		addr := sp.Addr().String()
		if err := sp.HTTP1().Close(); err != nil {
			t.Fatal(err)
		}
		if !s.H2C {
			// Plain: HTTP2 can never get a conn, so HTTP1 alone decides.
			if c, err := net.Dial("tcp", addr); err == nil {
				c.Close()
				t.Error("plain: port open after HTTP1 closed")
			}
			continue
		}
		if _, err := sp.HTTP1().Accept(); !errors.Is(err, net.ErrClosed) {
			t.Errorf("closed HTTP1 Accept: %v", err)
		}
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("h2c: port closed with HTTP2 still open: %v", err)
		}
		c.Close()
		if err := sp.HTTP2().Close(); err != nil {
			t.Fatal(err)
		}
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			t.Error("h2c: port open after both closed")
		}
	}
}

// TestReplayConn checks what a wrapped HTTP/1 conn keeps: the replayed
// bytes, addresses, deadlines, CloseWrite and NetConn.
func TestReplayConn(t *testing.T) {
	sp := newSplitter(t, Settings{H2C: true})
	client, err := net.Dial("tcp", sp.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := io.WriteString(client, "GET / HTTP/1.1\r\n"); err != nil {
		t.Fatal(err)
	}
	c, err := sp.HTTP1().Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	if _, ok := c.RemoteAddr().(*net.TCPAddr); !ok {
		t.Errorf("RemoteAddr is %T, want *net.TCPAddr", c.RemoteAddr())
	}
	if c.RemoteAddr().String() != client.LocalAddr().String() || c.LocalAddr().String() != client.RemoteAddr().String() {
		t.Errorf("addresses %v<-%v, want %v<-%v", c.LocalAddr(), c.RemoteAddr(), client.RemoteAddr(), client.LocalAddr())
	}
	if nc, ok := c.(interface{ NetConn() net.Conn }); !ok {
		t.Error("no NetConn")
	} else if hc, ok := nc.NetConn().(*Conn); !ok {
		t.Errorf("NetConn is %T, want *Conn", nc.NetConn())
	} else if _, ok := hc.NetConn().(*net.TCPConn); !ok {
		t.Errorf("the Conn's NetConn is %T, want *net.TCPConn", hc.NetConn())
	}
	if _, ok := c.(io.ReaderFrom); !ok {
		t.Error("no ReadFrom")
	}

	// The sniffer's deadline is gone: a Read waits for the client, and a
	// deadline set on the wrapper applies.
	got := make([]byte, len("GET / HTTP/1.1\r\n"))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "GET / HTTP/1.1\r\n" {
		t.Fatalf("replayed %q, %v", got, err)
	}
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := c.Read(got); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past deadline: %v, want a timeout", err)
	}
	_ = c.SetReadDeadline(time.Time{})

	// Half-close: the client sees EOF and can still send.
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		t.Fatal("no CloseWrite over a *net.TCPConn")
	}
	if err := cw.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Errorf("client read after CloseWrite: %v, want EOF", err)
	}
	if _, err := io.WriteString(client, "more"); err != nil {
		t.Fatal(err)
	}
	if err := client.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(c)
	if err != nil || string(rest) != "more" {
		t.Errorf("after half-close read %q, %v; want \"more\"", rest, err)
	}

	// ReadFrom goes to the socket: a write after CloseWrite fails there.
	if _, err := c.(io.ReaderFrom).ReadFrom(strings.NewReader("x")); err == nil {
		t.Error("ReadFrom after CloseWrite succeeded")
	}
}

func TestNewRejects(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f := func(s Settings, want string) {
		t.Helper()
		_, err := New(ln, s)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("New(%+v) = %v, want an error with %q", s, err, want)
		}
	}
	f(Settings{HandshakeTimeout: -1}, "negative")
	f(Settings{TLSConfig: &tls.Config{}}, "no certificate")
	cfg, _ := selfSigned(t)
	f(Settings{TLSConfig: cfg, H2C: true}, "H2C")
	if _, err := New(nil, Settings{}); err == nil {
		t.Error("New(nil) succeeded")
	}
}

func TestReadPreface(t *testing.T) {
	f := func(chunks []string, wantBuf string, wantH2 bool) {
		t.Helper()
		server, client := net.Pipe()
		defer server.Close()
		go func() {
			for _, c := range chunks {
				if _, err := io.WriteString(client, c); err != nil {
					return
				}
			}
			// Not closed: readPreface must not need EOF to decide.
		}()
		defer client.Close()
		buf, isH2, err := readPreface(server)
		if err != nil || string(buf) != wantBuf || isH2 != wantH2 {
			t.Errorf("readPreface(%q) = %q, %v, %v; want %q, %v", chunks, buf, isH2, err, wantBuf, wantH2)
		}
	}
	p := string(preface)
	f([]string{p}, p, true)
	f([]string{p[:1], p[1:3], p[3:20], p[20:]}, p, true)
	f([]string{p + "extra frames"}, p, true)
	f([]string{"G"}, "G", false)
	f([]string{"P", "U"}, "PU", false)
	f([]string{"PRI * HTTP/1.1\r\n"}, "PRI * HTTP/1.1\r\n", false)
	f([]string{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r"}, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r", false)
	f([]string{strings.Repeat("G", 100)}, strings.Repeat("G", 24), false)

	// A prefix of the preface, then EOF: an error, not a guess.
	server, client := net.Pipe()
	go func() { _, _ = io.WriteString(client, "PRI *"); client.Close() }()
	if _, _, err := readPreface(server); !errors.Is(err, io.EOF) {
		t.Errorf("prefix then EOF: %v, want EOF", err)
	}
}

// selfSigned returns a server config with a fresh self-signed certificate
// for 127.0.0.1 and a pool that trusts it.
func selfSigned(t *testing.T) (*tls.Config, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "listen test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}}}, pool
}

// TestFasthttpHijack: a tunnel through fasthttp's Hijack reaches the
// splitter's conn with UnsafeConn, and can half-close it there (fasthttp's
// own hijacked conn has no CloseWrite).
func TestFasthttpHijack(t *testing.T) {
	serverCfg, pool := selfSigned(t)
	serverCfg.NextProtos = []string{"h2", "http/1.1"}
	for _, tc := range []struct {
		name string
		s    Settings
		dial func(addr string) (net.Conn, error)
		want string // the type UnsafeConn returns
	}{
		{"h2c", Settings{H2C: true}, func(a string) (net.Conn, error) { return net.Dial("tcp", a) }, "listen.replayConnCW"},
		{"tls", Settings{TLSConfig: serverCfg}, func(a string) (net.Conn, error) {
			return tls.Dial("tcp", a, &tls.Config{RootCAs: pool, NextProtos: []string{"http/1.1"}})
		}, "*tls.Conn"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sp := newSplitter(t, tc.s)
			got := make(chan string, 1)
			fs := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
				ctx.Hijack(func(c net.Conn) {
					raw := c.(interface{ UnsafeConn() net.Conn }).UnsafeConn()
					_, hasCW := raw.(interface{ CloseWrite() error })
					_, _ = io.WriteString(c, "tunnel")
					if hasCW {
						_ = raw.(interface{ CloseWrite() error }).CloseWrite()
					}
					rest, _ := io.ReadAll(c)
					got <- fmt.Sprintf("%T cw=%v read=%q", raw, hasCW, rest)
				})
			}}
			go func() { _ = fs.Serve(sp.HTTP1()) }()
			defer func() { _ = fs.Shutdown() }()

			c, err := tc.dial(sp.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: a\r\n\r\n"); err != nil {
				t.Fatal(err)
			}
			resp, err := io.ReadAll(c) // ends at the server's CloseWrite
			if err != nil || !strings.HasSuffix(string(resp), "tunnel") {
				t.Fatalf("client read %q, %v; want the response then \"tunnel\" then EOF", resp, err)
			}
			if _, err := io.WriteString(c, "bye"); err != nil {
				t.Fatal(err)
			}
			_ = c.(interface{ CloseWrite() error }).CloseWrite()
			if s, want := <-got, tc.want+` cw=true read="bye"`; s != want {
				t.Errorf("hijack handler saw %s, want %s", s, want)
			}
		})
	}
}

// checkNoGoroutines fails if a goroutine is still in a Splitter's or
// child's code. Close waits for them (WaitGroup), but a goroutine that has
// run its deferred wg.Done can still show for a moment until it returns, so
// this retries briefly, as goleak does.
func checkNoGoroutines(t *testing.T) {
	t.Helper()
	buf := make([]byte, 1<<20)
	var st string
	for start := time.Now(); time.Since(start) < 2*time.Second; time.Sleep(5 * time.Millisecond) {
		st = string(buf[:runtime.Stack(buf, true)])
		if !strings.Contains(st, "listen.(*Splitter)") && !strings.Contains(st, "listen.(*child)") {
			return
		}
	}
	t.Errorf("goroutines left after Close:\n%s", st)
}

// fakeListener returns the errors it is given, one per Accept.
type fakeListener struct {
	net.Listener
	errs chan error
}

func (l fakeListener) Accept() (net.Conn, error) { return nil, <-l.errs }

type tempErr struct{}

func (tempErr) Error() string   { return "temporary" }
func (tempErr) Timeout() bool   { return false }
func (tempErr) Temporary() bool { return true }

// TestAcceptError: a temporary error (EMFILE, say) is retried after a
// pause; a permanent one ends both Accepts with it.
func TestAcceptError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := fakeListener{Listener: ln, errs: make(chan error, 2)}
	sp, err := New(fl, Settings{H2C: true})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	permanent := errors.New("permanent")
	fl.errs <- tempErr{}
	fl.errs <- permanent
	for _, l := range []net.Listener{sp.HTTP1(), sp.HTTP2()} {
		if _, err := l.Accept(); err != permanent {
			t.Errorf("Accept: %v, want %v", err, permanent)
		}
	}
	if len(fl.errs) != 0 {
		t.Error("the temporary error ended the loop")
	}
}
