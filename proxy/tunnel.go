package proxy

import (
	"io"
	"net"
	"sync"
	"time"
)

// tunnel completes a protocol upgrade (RFC 9110 §7.8, e.g. WebSocket): the
// upstream's 101 head goes to the client as it came, then bytes are copied
// both ways until either side closes, each direction under the idle
// timeout. fasthttp hands the client connection over after the handler
// returns (Hijack), without writing a response of its own.
func (x *exchange) tunnel() {
	x.joinPump() // an upgrade request has no body; nothing to wait for in practice
	head := x.resp.Header.Header()
	head = append([]byte(nil), head...) // the response is reset before the hijack runs
	c := x.r.conn
	x.r.conn = nil
	idle := x.r.srv.IdleTimeout
	c.ReadTimeout = idle
	x.r.ctx.HijackSetNoResponse(true)
	x.r.ctx.Hijack(func(client net.Conn) {
		defer x.finish(nil)
		defer x.r.ep.Release(c, false, time.Now())
		if _, err := writeWithDeadline(client, head, idle); err != nil {
			return
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { // client → upstream
			defer wg.Done()
			n, _ := copyIdle(c.Conn, client, idle)
			x.r.sent += n
			closeWrite(c.Conn)
		}()
		n, _ := copyIdle(client, c.R, idle) // upstream → client; c.R holds bytes read past the head
		x.r.bytesOut += n
		closeWrite(client)
		wg.Wait()
	})
}

// closeDelimited sends a body of unknown length to an HTTP/1.0 client,
// which cannot read chunked framing (RFC 9112 §7.1): the head goes without
// Content-Length, the body follows, and closing the connection ends it.
func (x *exchange) closeDelimited() {
	rh := &x.r.ctx.Response.Header
	rh.SetConnectionClose()
	rh.SetContentLength(-2)
	rh.Del("Transfer-Encoding")
	head := rh.AppendBytes(nil)
	idle := x.r.srv.IdleTimeout
	x.r.ctx.HijackSetNoResponse(true)
	x.r.ctx.Hijack(func(client net.Conn) {
		_, err := writeWithDeadline(client, head, idle)
		if err == nil {
			_, err = copyIdle(client, x, idle)
		}
		if err != nil {
			// Closing is what ends the body, so a FIN would say it is
			// complete: a body cut upstream (or a failed write) ends with
			// a reset instead, which the client sees as an error.
			resetConn(client)
		}
		x.finish(err)
	})
}

// resetConn closes c with a TCP reset (SO_LINGER 0) rather than a FIN.
func resetConn(c net.Conn) {
	raw := c
	if h, ok := raw.(interface{ UnsafeConn() net.Conn }); ok { // fasthttp's hijacked connection
		raw = h.UnsafeConn()
	}
	if t, ok := raw.(interface{ NetConn() net.Conn }); ok { // TLS
		raw = t.NetConn()
	}
	if tc, ok := raw.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

func writeWithDeadline(c net.Conn, b []byte, d time.Duration) (int, error) {
	_ = c.SetWriteDeadline(time.Now().Add(d))
	return c.Write(b)
}

// copyIdle copies src to dst; a read or write that makes no progress for
// idle ends it.
func copyIdle(dst net.Conn, src io.Reader, idle time.Duration) (int64, error) {
	bufp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bufp)
	buf := *bufp
	var total int64
	rc, _ := src.(net.Conn)
	for {
		if rc != nil {
			_ = rc.SetReadDeadline(time.Now().Add(idle))
		}
		n, err := src.Read(buf)
		if n > 0 {
			m, werr := writeWithDeadline(dst, buf[:n], idle)
			total += int64(m)
			if werr != nil {
				return total, werr
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// closeWrite half-closes a TCP connection so the peer sees EOF while the
// other direction keeps flowing.
func closeWrite(c net.Conn) {
	type closeWriter interface{ CloseWrite() error }
	if cw, ok := c.(closeWriter); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}
