// Package demo is the built-in demo upstream that `sidecar -demo` puts
// behind the proxy, so a newcomer sees it work with nothing else installed.
// It is a plain net/http server with a few endpoints that show what the
// proxy does with fast, slow, streaming and failing backends.
package demo

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"
)

// Endpoints lists what the demo upstream serves, for the start-up log.
const Endpoints = "/ (hello), /slow?ms=500, /stream?n=5&every=200ms, /fail, /echo (POST), /bytes?n=65536"

// hello is the body of the demo upstream's "/" answer.
type hello struct {
	Hello     string `json:"hello"`
	Path      string `json:"path"`
	RequestID string `json:"request_id"`
}

// Handler returns the demo upstream's handler.
func Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		// encoding/json, not %q: Go quoting is not JSON quoting (a control
		// byte or invalid UTF-8 in the path became \x.., which no JSON
		// parser accepts).
		enc := json.NewEncoder(w)
		enc.SetEscapeHTML(false) // a JSON body, not HTML: "&" stays "&"
		_ = enc.Encode(hello{Hello: "from the demo upstream", Path: r.URL.Path, RequestID: r.Header.Get("X-Request-Id")})
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		if ms <= 0 || ms > 60000 {
			ms = 500
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		fmt.Fprintf(w, "slept %dms\n", ms)
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		if n <= 0 || n > 10000 {
			n = 5
		}
		every, err := time.ParseDuration(r.URL.Query().Get("every"))
		if err != nil || every <= 0 || every > time.Minute {
			every = 200 * time.Millisecond
		}
		w.Header().Set("Content-Type", "text/event-stream")
		fl := http.NewResponseController(w)
		for i := 1; i <= n; i++ {
			fmt.Fprintf(w, "data: event %d of %d at %s\n\n", i, n, time.Now().Format(time.RFC3339Nano))
			if fl.Flush() != nil {
				return
			}
			if i < n {
				select {
				case <-time.After(every):
				case <-r.Context().Done():
					return
				}
			}
		}
	})
	mux.HandleFunc("/fail", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, `{"error":"the demo upstream fails on purpose"}`, http.StatusServiceUnavailable)
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(w).EnableFullDuplex()
		if ct := r.Header.Get("Content-Type"); ct != "" {
			w.Header().Set("Content-Type", ct)
		}
		if r.ContentLength >= 0 {
			w.Header().Set("Content-Length", strconv.FormatInt(r.ContentLength, 10))
		}
		_, _ = io.Copy(w, r.Body)
	})
	mux.HandleFunc("/bytes", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.Atoi(r.URL.Query().Get("n"))
		if err != nil || n < 0 || n > 1<<30 {
			n = 64 << 10
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(n))
		buf := make([]byte, 32<<10)
		for i := range buf {
			buf[i] = 'a' + byte(i%26)
		}
		for n > 0 {
			k := min(n, len(buf))
			if _, err := w.Write(buf[:k]); err != nil {
				return
			}
			n -= k
		}
	})
	return mux
}

// Start serves the demo upstream on ln until the returned server is closed.
func Start(ln net.Listener) *http.Server {
	srv := &http.Server{Handler: Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	return srv
}

// Config is the embedded configuration `sidecar -demo` runs: the proxy on
// 127.0.0.1:8080, admin on 127.0.0.1:9090, everything to the demo upstream.
func Config(upstreamURL string) []byte {
	return fmt.Appendf(nil, `# sidecar -demo: the embedded default configuration.
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"

[upstreams.demo]
url = %q

[upstreams.demo.fallback]
status = 503
content_type = "application/json"
body = '{"error":"the demo upstream is failing; the sidecar answers for it"}'

[[routes]]
name = "demo"
path_prefix = "/"
upstream = "demo"

# Anonymous clients (everyone, in the demo): 120 requests per minute.
[tiers.anonymous]
limit = 120
window = "1m"
`, upstreamURL)
}
