// Command bare is the reference point of `make bench`: the naive 40-line
// fasthttp forwarder (Server + HostClient, no header work, no streaming
// care) that the issue compares the sidecar against.
package main

import (
	"flag"
	"log"

	"github.com/valyala/fasthttp"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:18082", "listen address")
	upstream := flag.String("upstream", "127.0.0.1:18081", "upstream host:port")
	flag.Parse()
	client := &fasthttp.HostClient{Addr: *upstream, MaxConns: 1024}
	handler := func(ctx *fasthttp.RequestCtx) {
		req := fasthttp.AcquireRequest()
		defer fasthttp.ReleaseRequest(req)
		ctx.Request.CopyTo(req)
		req.Header.Del("Connection")
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
