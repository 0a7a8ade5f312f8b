package proxy

import (
	"bufio"
	"bytes"
	"testing"

	"github.com/valyala/fasthttp"
)

// FuzzRequestHead runs made-up request heads through the header checks and
// rewrites the proxy applies: no panic, and a head that passes the checks
// keeps no hop-by-hop field after stripping.
func FuzzRequestHead(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nConnection: X-A, close\r\nX-A: 1\r\n\r\n"))
	f.Add([]byte("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\n\r\n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		var h fasthttp.RequestHeader
		if err := h.Read(bufio.NewReader(bytes.NewReader(raw))); err != nil {
			return
		}
		if !checkRawHeaders(&h) {
			return
		}
		stripRequestHop(&h, nil)
		for _, k := range hopHeaders {
			if len(h.Peek(k)) > 0 {
				t.Fatalf("%s survived stripping in %q", k, raw)
			}
		}
		_ = validRequestID(h.Peek("X-Request-Id"))
	})
}
