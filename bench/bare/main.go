// Command bare is the reference point of `make bench`: the naive 40-line
// fasthttp forwarder (Server + HostClient, no header work, no streaming
// care) that the issue compares the sidecar against. With -headers it
// also sends the six headers the sidecar adds to every upstream request
// (client, tier, X-Forwarded-For/-Proto/-Host, request id), with fixed
// values: what those cost the backend, apart from any proxy work.
package main

import (
	"flag"
	"log"
	"net/http"
	_ "net/http/pprof" // -pprof: profiles for docs/PERFORMANCE.md
	"time"

	"github.com/valyala/fasthttp"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:18082", "listen address")
	upstream := flag.String("upstream", "127.0.0.1:18081", "upstream host:port")
	headers := flag.Bool("headers", false, "add the sidecar's six upstream headers to each request")
	pprof := flag.String("pprof", "", "serve /debug/pprof on this address (off by default)")
	flag.Parse()
	if *pprof != "" {
		go func() {
			srv := &http.Server{Addr: *pprof, ReadHeaderTimeout: 10 * time.Second}
			log.Print(srv.ListenAndServe())
		}()
	}
	client := &fasthttp.HostClient{Addr: *upstream, MaxConns: 1024}
	handler := func(ctx *fasthttp.RequestCtx) {
		req := fasthttp.AcquireRequest()
		defer fasthttp.ReleaseRequest(req)
		ctx.Request.CopyTo(req)
		req.Header.Del("Connection")
		if *headers {
			req.Header.Set("X-Sidecar-Client", "ip:10.0.0.1")
			req.Header.Set("X-Sidecar-Tier", "anonymous")
			req.Header.Set("X-Forwarded-For", "10.0.0.1")
			req.Header.Set("X-Forwarded-Proto", "http")
			req.Header.Set("X-Forwarded-Host", "bench")
			req.Header.Set("X-Request-Id", "3e12f4283e5c-1")
		}
		resp := &ctx.Response
		if err := client.Do(req, resp); err != nil {
			ctx.Error("bad gateway", fasthttp.StatusBadGateway)
			return
		}
		resp.Header.Del("Connection")
	}
	srv := &fasthttp.Server{Handler: handler, MaxRequestBodySize: 8 << 20, NoDefaultServerHeader: true}
	log.Fatal(srv.ListenAndServe(*addr))
}
