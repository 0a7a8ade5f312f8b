// Command backend is the upstream that `make bench` measures against. It
// serves the same endpoints (/small: 13 B, /100: 100 B, /64k: 64 KiB,
// /echo: the request body back; with net/http also /bytes?n= and /sink for
// streaming) either with net/http (-kind nethttp: what a typical Go
// application is) or with fasthttp (-kind fasthttp: a backend about twice
// as fast, which leaves the proxy nowhere to hide).
package main

import (
	"flag"
	"io"
	"log"
	"net/http"
	"strconv"

	"github.com/valyala/fasthttp"
)

var (
	small = []byte("hello, world\n")
	big   = func() []byte {
		b := make([]byte, 64<<10)
		for i := range b {
			b[i] = 'a' + byte(i%26)
		}
		return b
	}()
)

func main() {
	addr := flag.String("addr", "127.0.0.1:18081", "listen address")
	kind := flag.String("kind", "nethttp", "nethttp or fasthttp")
	flag.Parse()
	switch *kind {
	case "nethttp":
		log.Fatal(http.ListenAndServe(*addr, http.HandlerFunc(netHTTP)))
	case "fasthttp":
		srv := &fasthttp.Server{Handler: fastHTTP, MaxRequestBodySize: 8 << 20, NoDefaultServerHeader: true}
		log.Fatal(srv.ListenAndServe(*addr))
	default:
		log.Fatalf("-kind: want nethttp or fasthttp, got %q", *kind)
	}
}

func netHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/small":
		w.Header().Set("Content-Type", "text/plain")
		w.Write(small)
	case "/100":
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(big[:100])
	case "/64k":
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(big)
	case "/echo":
		w.Header().Set("Content-Type", "application/octet-stream")
		if r.ContentLength >= 0 {
			w.Header().Set("Content-Length", strconv.FormatInt(r.ContentLength, 10))
		}
		io.Copy(w, r.Body)
	case "/bytes": // ?n= bytes of body, for streaming throughput
		n, _ := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		for n > 0 {
			k := min(n, int64(len(big)))
			if _, err := w.Write(big[:k]); err != nil {
				return
			}
			n -= k
		}
	case "/sink": // reads the whole body, answers its length
		n, _ := io.Copy(io.Discard, r.Body)
		io.WriteString(w, strconv.FormatInt(n, 10))
	default:
		w.WriteHeader(404)
	}
}

func fastHTTP(ctx *fasthttp.RequestCtx) {
	switch string(ctx.Path()) {
	case "/small":
		ctx.SetContentType("text/plain")
		ctx.SetBody(small)
	case "/100":
		ctx.SetContentType("application/octet-stream")
		ctx.SetBody(big[:100])
	case "/64k":
		ctx.SetContentType("application/octet-stream")
		ctx.SetBody(big)
	case "/echo":
		ctx.SetContentType("application/octet-stream")
		ctx.SetBody(ctx.PostBody())
	default:
		ctx.SetStatusCode(404)
	}
}
