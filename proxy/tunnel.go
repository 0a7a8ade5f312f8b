package proxy

import (
	"net"
	"time"

	"github.com/sidecar-proxy/sidecar/upstream"
)

// tunnel completes a protocol upgrade (RFC 9110 §7.8, e.g. WebSocket): the
// upstream's 101 head goes to the client without its hop-by-hop fields,
// with Connection: Upgrade, its Upgrade and the request id, then bytes are
// copied both ways until either side closes, each direction under the
// idle timeout. fasthttp hands the client connection over after the
// handler returns (Hijack), without writing a response of its own.
func (x *exchange) tunnel() {
	// The upgrade is answered: a tunnel, which may last hours, holds no
	// slot of the concurrency limit.
	x.leaveOverload(time.Now())
	rh := &x.up.Response.Header
	x.scratch = append(x.scratch[:0], rh.Peek("Upgrade")...)
	protocol := string(x.scratch) // one per upgrade: Del below reuses the storage it points into
	x.scratch = stripResponseHop(rh, x.scratch)
	rh.SetProtocol(http11) // an HTTP/1.0 upstream's 101 too: the client asked in HTTP/1.1
	rh.ResetConnectionClose()
	rh.Set("Connection", "Upgrade")
	rh.Set("Upgrade", protocol)
	rh.SetBytesV(x.r.srv.RequestIDHeader, x.reqID)
	head := append([]byte(nil), rh.Header()...) // the response is reset before the hijack runs
	x.hijack(head, func(client net.Conn, idle time.Duration) error {
		up, down := x.up.Tunnel(client, idle)
		x.r.sent += up // finish adds any request body sent before the 101
		x.r.bytesOut += down
		return nil
	})
}

// closeDelimited sends a body of unknown length to an HTTP/1.0 client,
// which cannot read chunked framing (RFC 9112 §7.1): the head goes without
// Content-Length, the body follows, and closing the connection ends it.
func (x *exchange) closeDelimited() {
	x.leaveOverload(time.Now()) // as for a streamed body (respond)
	rh := &x.r.ctx.Response.Header
	rh.SetConnectionClose()
	rh.SetContentLength(-2)
	rh.Del("Transfer-Encoding")
	x.hijack(rh.AppendBytes(nil), func(client net.Conn, idle time.Duration) error {
		_, err := upstream.CopyIdle(client, x, idle)
		if err != nil {
			// Closing is what ends the body, so a FIN would say it is
			// complete: a body cut upstream (or a failed write) ends with
			// a reset instead, which the client sees as an error.
			resetConn(client)
		}
		return err
	})
}

// hijack has fasthttp hand the client connection over once the handler
// returns, without a response of its own: head is written to it, then run
// has it, and the exchange ends (and is released) when run returns.
func (x *exchange) hijack(head []byte, run func(client net.Conn, idle time.Duration) error) {
	idle := x.r.srv.IdleTimeout
	x.r.ctx.HijackSetNoResponse(true)
	x.r.handedOff = true
	x.r.ctx.Hijack(func(client net.Conn) {
		_, err := upstream.WriteIdle(client, head, idle)
		if err == nil {
			err = run(client, idle)
		}
		x.finish(err)
		x.release()
	})
}

// resetConn closes c with a TCP reset (SO_LINGER 0) rather than a FIN. The
// TCP connection itself is closed, beneath TLS: tls.Conn's Close sends a
// close_notify first, which says "complete" as a FIN does (RFC 9112 §9.8).
func resetConn(c net.Conn) {
	raw := c
	if h, ok := raw.(interface{ UnsafeConn() net.Conn }); ok { // fasthttp's hijacked connection
		raw = h.UnsafeConn()
	}
	for {
		if tc, ok := raw.(interface{ SetLinger(sec int) error }); ok { // frontend/listen.Conn, *net.TCPConn
			_ = tc.SetLinger(0)
			_ = raw.Close()
			break
		}
		u, ok := raw.(interface{ NetConn() net.Conn }) // TLS, the replay of sniffed bytes
		if !ok {
			break
		}
		raw = u.NetConn()
	}
	_ = c.Close() // the wrappers' own state; the socket is gone already
}
