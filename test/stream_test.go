package test

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	gib       = 1 << 30
	rssBudget = 64 << 20 // the bound on the sidecar's peak RSS while streaming
)

// zeros is an endless reader of zero bytes that costs nothing to produce.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func TestUploadAndDownload1GiBInConstantMemory(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/upload":
			n, err := io.Copy(io.Discard, r.Body)
			if err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			fmt.Fprint(w, n)
		case "/sha256":
			h := sha256.New()
			io.Copy(h, r.Body)
			fmt.Fprintf(w, "%x", h.Sum(nil))
		case "/download":
			size, _ := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
			if r.URL.Query().Get("chunked") == "" {
				w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
			}
			io.CopyN(w, zeros{}, size)
		}
	})
	sc := startSidecar(t, "[server]\nmax_body_bytes = 0\n"+routeTo(be.url(), ""))
	baseline := sc.statusField("VmRSS")

	t.Run("upload 1GiB content-length", func(t *testing.T) {
		start := time.Now()
		req, _ := http.NewRequest("POST", sc.url("/upload"), io.LimitReader(zeros{}, gib))
		req.ContentLength = gib
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != strconv.Itoa(gib) {
			t.Fatalf("backend received %q bytes, want %d", b, gib)
		}
		t.Logf("1 GiB upload: %.0f MB/s, sidecar peak RSS %.1f MiB (baseline RSS %.1f MiB)",
			gib/time.Since(start).Seconds()/1e6, float64(sc.peakRSS())/(1<<20), float64(baseline)/(1<<20))
	})
	t.Run("upload chunked, content checked", func(t *testing.T) {
		// Odd-sized writes, so that chunk boundaries fall anywhere in the
		// sidecar's reads: the bytes must arrive intact and in order.
		data := make([]byte, 8<<20+12345)
		rand.NewChaCha8([32]byte{1}).Read(data)
		pr, pw := io.Pipe()
		go func() {
			for rest, i := data, 1; len(rest) > 0; i++ {
				n := min(len(rest), (i*7919)%70000+1)
				pw.Write(rest[:n])
				rest = rest[n:]
			}
			pw.Close()
		}()
		req, _ := http.NewRequest("POST", sc.url("/sha256"), pr)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := fmt.Sprintf("%x", sha256.Sum256(data)); string(b) != want {
			t.Fatalf("the backend's SHA-256 of a chunked upload is %q, want %s", b, want)
		}
	})
	t.Run("upload 256MiB chunked", func(t *testing.T) {
		req, _ := http.NewRequest("POST", sc.url("/upload"), io.NopCloser(io.LimitReader(zeros{}, 256<<20)))
		req.ContentLength = -1
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != strconv.Itoa(256<<20) {
			t.Fatalf("backend received %q bytes", b)
		}
	})
	for _, chunked := range []string{"", "1"} {
		t.Run("download 1GiB chunked="+chunked, func(t *testing.T) {
			start := time.Now()
			resp, err := http.Get(sc.url(fmt.Sprintf("/download?n=%d&chunked=%s", gib, chunked)))
			if err != nil {
				t.Fatal(err)
			}
			n, err := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err != nil || n != gib {
				t.Fatalf("downloaded %d bytes, err %v", n, err)
			}
			if (chunked == "") != (resp.ContentLength == gib) {
				t.Errorf("framing not kept: ContentLength %d", resp.ContentLength)
			}
			t.Logf("1 GiB download: %.0f MB/s, sidecar peak RSS %.1f MiB", gib/time.Since(start).Seconds()/1e6, float64(sc.peakRSS())/(1<<20))
		})
	}
	if peak := sc.peakRSS(); peak > rssBudget {
		t.Errorf("sidecar peak RSS %.1f MiB over the %d MiB budget", float64(peak)/(1<<20), rssBudget>>20)
	}
}

func TestSlowClientSlowsUpstreamRead(t *testing.T) {
	var written atomic.Int64
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(gib))
		buf := make([]byte, 32<<10)
		for written.Load() < gib {
			n, err := w.Write(buf)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	d := net.Dialer{Control: nil}
	c, err := d.Dial("tcp", sc.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetReadBuffer(64 << 10)
	io.WriteString(c, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
	// Read at 64 KiB/s for 10 s: 16 KiB every 250 ms.
	buf := make([]byte, 16<<10)
	var got int64
	start := time.Now()
	for time.Since(start) < 10*time.Second {
		n, err := io.ReadFull(c, buf)
		got += int64(n)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	peak, upstreamSent := sc.peakRSS(), written.Load()
	t.Logf("client read %d KiB in 10 s; upstream had written %.1f MiB; sidecar peak RSS %.1f MiB",
		got>>10, float64(upstreamSent)/(1<<20), float64(peak)/(1<<20))
	if peak > rssBudget {
		t.Errorf("peak RSS %.1f MiB over budget", float64(peak)/(1<<20))
	}
	// Without backpressure the proxy would read the upstream at loopback
	// speed (GB/s) and the backend would be done. With it, the upstream is
	// ahead of the client by socket buffers only.
	if upstreamSent > 48<<20 {
		t.Errorf("upstream wrote %.1f MiB while the client read %.1f MiB: the proxy read ahead of the client", float64(upstreamSent)/(1<<20), float64(got)/(1<<20))
	}
}

func TestFirstChunkArrivesBeforeUpstreamSendsTheNext(t *testing.T) {
	release := make(chan struct{})
	var chunk1At atomic.Int64 // unix nanoseconds
	var sentSecond atomic.Bool
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "chunk-1;")
		http.NewResponseController(w).Flush()
		chunk1At.Store(time.Now().UnixNano())
		select {
		case <-release:
		case <-time.After(10 * time.Second):
		}
		sentSecond.Store(true)
		io.WriteString(w, "chunk-2;")
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	resp, err := http.Get(sc.url("/sse"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	buf := make([]byte, 8)
	if _, err := io.ReadFull(resp.Body, buf); err != nil || string(buf) != "chunk-1;" {
		t.Fatalf("first chunk %q %v", buf, err)
	}
	latency := time.Since(time.Unix(0, chunk1At.Load()))
	if sentSecond.Load() {
		t.Fatal("chunk 1 reached the client only after the upstream sent chunk 2: the response was buffered")
	}
	close(release)
	rest, _ := io.ReadAll(resp.Body)
	if string(rest) != "chunk-2;" {
		t.Errorf("rest %q", rest)
	}
	t.Logf("chunk 1 reached the client %v after the upstream flushed it", latency)
}

func TestIdleTimeoutsCutStallsNotLongTransfers(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/trickle": // 10 chunks 300 ms apart: 3 s in all, never idle for 1 s
			for i := 0; i < 10; i++ {
				fmt.Fprintf(w, "%d;", i)
				http.NewResponseController(w).Flush()
				time.Sleep(300 * time.Millisecond)
			}
		case "/stall": // one chunk, then silence
			io.WriteString(w, "partial")
			http.NewResponseController(w).Flush()
			time.Sleep(4 * time.Second)
			io.WriteString(w, "never")
		case "/upload":
			n, err := io.Copy(io.Discard, r.Body)
			fmt.Fprintf(w, "%d %v", n, err)
		}
	})
	sc := startSidecar(t, "[server]\nidle_timeout = \"1s\"\nheader_timeout = \"1s\"\n"+routeTo(be.url(), `response_timeout = "1s"`))

	t.Run("moving download outlives idle timeout", func(t *testing.T) {
		resp, err := http.Get(sc.url("/trickle"))
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || string(b) != "0;1;2;3;4;5;6;7;8;9;" {
			t.Errorf("got %q %v", b, err)
		}
	})
	t.Run("moving upload outlives idle and header timeouts", func(t *testing.T) {
		pr, pw := io.Pipe()
		go func() {
			for i := 0; i < 10; i++ {
				pw.Write([]byte("0123456789"))
				time.Sleep(300 * time.Millisecond)
			}
			pw.Close()
		}()
		resp, err := http.Post(sc.url("/upload"), "application/octet-stream", pr)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "100 <nil>" {
			t.Errorf("backend got %q", b)
		}
	})
	t.Run("stalled download is cut visibly", func(t *testing.T) {
		start := time.Now()
		resp, err := http.Get(sc.url("/stall"))
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil {
			t.Errorf("a stalled chunked body looked complete: %q", b)
		}
		t.Logf("stalled stream cut after %v (idle_timeout 1s): %v", time.Since(start).Round(time.Millisecond), err)
	})
	t.Run("stalled upload is cut", func(t *testing.T) {
		c, err := net.Dial("tcp", sc.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		start := time.Now()
		out, _ := io.ReadAll(c)
		if time.Since(start) > 4*time.Second {
			t.Errorf("stalled upload not cut: %q", out)
		}
		t.Logf("stalled upload answered/cut after %v: %q", time.Since(start).Round(time.Millisecond), firstLine(string(out)))
	})
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\r\n")
	return l
}

func TestHTTP10ClientNeverGetsChunked(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/len" {
			w.Header().Set("Content-Length", "5")
			io.WriteString(w, "fixed")
			return
		}
		for i := 0; i < 3; i++ {
			fmt.Fprintf(w, "part%d.", i)
			http.NewResponseController(w).Flush()
		}
	})
	sc := startSidecar(t, routeTo(be.url(), ""))
	out := rawRequest(t, sc.Addr, "GET /stream HTTP/1.0\r\n\r\n", 5*time.Second)
	head, body, _ := strings.Cut(out, "\r\n\r\n")
	if strings.Contains(strings.ToLower(head), "transfer-encoding") || body != "part0.part1.part2." {
		t.Errorf("HTTP/1.0 response of unknown length: %q", out)
	}
	if !strings.Contains(head, "Connection: close") {
		t.Errorf("close-delimited body without Connection: close: %q", head)
	}
	out = rawRequest(t, sc.Addr, "GET /len HTTP/1.0\r\n\r\n", 5*time.Second)
	if head, body, _ := strings.Cut(out, "\r\n\r\n"); !strings.Contains(head, "Content-Length: 5") || body != "fixed" {
		t.Errorf("HTTP/1.0 response of known length: %q", out)
	}
}

func TestEarlyUpstreamAnswerReachesClient(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		http.Error(w, `{"error":"who are you"}`, http.StatusUnauthorized) // without reading the body
	})
	sc := startSidecar(t, "[server]\nmax_body_bytes = 0\n"+routeTo(be.url(), ""))
	for _, framing := range []string{"Content-Length: 67108864", "Transfer-Encoding: chunked"} {
		c, err := net.Dial("tcp", sc.Addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: x\r\n"+framing+"\r\n\r\n")
		go func() { // keep uploading until the connection is closed
			chunk := make([]byte, 64<<10)
			prefix := []byte(fmt.Sprintf("%x\r\n", len(chunk)))
			for i := 0; i < 1024; i++ {
				if strings.HasPrefix(framing, "Transfer") {
					c.Write(prefix)
				}
				if _, err := c.Write(chunk); err != nil {
					return
				}
				if strings.HasPrefix(framing, "Transfer") {
					c.Write([]byte("\r\n"))
				}
			}
		}()
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("%s: %v", framing, err)
		}
		if resp.StatusCode != 401 {
			t.Errorf("%s: early 401 became %d", framing, resp.StatusCode)
		}
		c.Close()
	}
}

func TestFullDuplexEcho(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		rc.EnableFullDuplex()
		w.WriteHeader(200)
		rc.Flush()
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				w.Write(buf[:n])
				rc.Flush()
			}
			if err != nil {
				return
			}
		}
	})
	sc := startSidecar(t, "[server]\nmax_body_bytes = 0\n"+routeTo(be.url(), ""))

	t.Run("lockstep", func(t *testing.T) {
		// The client sends message i+1 only after reading the echo of
		// message i: impossible unless the response streams while the
		// request body is still being read. (The first message goes with
		// the head: the sidecar reads the first body bytes before it
		// contacts the upstream, as fasthttp does for Content-Length
		// bodies, so that a malformed body forwards nothing.)
		c, err := net.Dial("tcp", sc.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
		br := bufio.NewReader(c)
		var resp *http.Response
		for i := 0; i < 10; i++ {
			msg := fmt.Sprintf("message %d\n", i)
			fmt.Fprintf(c, "%x\r\n%s\r\n", len(msg), msg)
			if resp == nil {
				if resp, err = http.ReadResponse(br, nil); err != nil {
					t.Fatal(err)
				}
			}
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(resp.Body, got); err != nil || string(got) != msg {
				t.Fatalf("echo of %q: %q %v", msg, got, err)
			}
		}
		io.WriteString(c, "0\r\n\r\n")
		if rest, err := io.ReadAll(resp.Body); err != nil || len(rest) != 0 {
			t.Errorf("end of echo: %q %v", rest, err)
		}
	})
	t.Run("1GiB", func(t *testing.T) {
		sc.resetPeakRSS()
		pr, pw := io.Pipe()
		go func() {
			io.CopyN(pw, zeros{}, gib)
			pw.Close()
		}()
		req, _ := http.NewRequest("POST", sc.url("/echo"), pr)
		var wg sync.WaitGroup
		wg.Add(1)
		var n int64
		var err error
		go func() {
			defer wg.Done()
			resp, e := http.DefaultClient.Do(req)
			if e != nil {
				err = e
				return
			}
			n, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(120 * time.Second):
			t.Fatal("1 GiB echo deadlocked")
		}
		if err != nil || n != gib {
			t.Fatalf("echoed %d bytes, err %v", n, err)
		}
		if peak := sc.peakRSS(); peak > rssBudget {
			t.Errorf("peak RSS %.1f MiB during 1 GiB echo", float64(peak)/(1<<20))
		}
	})
}

func TestRequestHeaderSizeLimit(t *testing.T) {
	be := startBackend(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, routeTo(be.url(), ""))
	for _, c := range []struct {
		size int
		want string
	}{{15 << 10, "HTTP/1.1 200"}, {17 << 10, "HTTP/1.1 431"}} {
		req := "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", c.size) + "\r\nConnection: close\r\n\r\n"
		if out := rawRequest(t, sc.Addr, req, 5*time.Second); !strings.HasPrefix(out, c.want) {
			t.Errorf("%d KiB header: %q", c.size>>10, firstLine(out))
		}
	}
}
