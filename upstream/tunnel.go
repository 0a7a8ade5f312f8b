package upstream

import (
	"io"
	"net"
	"sync"
	"time"
)

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// Tunnel completes a protocol upgrade (RFC 9110 §7.8): it copies bytes
// both ways between the connection and client until either side closes
// (each direction half-closes the other side when it ends), every read and
// write under the progress timeout idle. Bytes already read past the 101
// head (in R) go first. It returns the bytes sent to the upstream and to
// the client; the caller releases the connection (not reusable).
func (c *Conn) Tunnel(client net.Conn, idle time.Duration) (up, down int64) {
	c.ReadTimeout = idle
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // client → upstream
		defer wg.Done()
		up, _ = CopyIdle(c.Conn, client, idle)
		closeWrite(c.Conn)
	}()
	down, _ = CopyIdle(client, c.R, idle) // upstream → client
	closeWrite(client)
	wg.Wait()
	return up, down
}

// WriteIdle writes b to c under a write deadline idle from now.
func WriteIdle(c net.Conn, b []byte, idle time.Duration) (int, error) {
	_ = c.SetWriteDeadline(time.Now().Add(idle))
	return c.Write(b)
}

// CopyIdle copies src to dst through a pooled 32 KiB buffer; a read (when
// src is a net.Conn; other readers keep their own deadlines) or a write
// that makes no progress for idle ends it. EOF ends it without an error.
func CopyIdle(dst net.Conn, src io.Reader, idle time.Duration) (int64, error) {
	bufp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bufp)
	if rc, ok := src.(net.Conn); ok {
		src = idleReader{rc, idle}
	}
	return Copy(idleWriter{dst, idle}, src, *bufp)
}

// Copy copies src to dst through buf, one write per read, until src ends
// (EOF: no error) or either side fails. Unlike io.CopyBuffer it never
// hands the copy to src's WriteTo or dst's ReadFrom, so the reads and
// writes, and their deadlines, stay the caller's.
func Copy(dst io.Writer, src io.Reader, buf []byte) (int64, error) {
	return CopyGathered(dst, src, buf, nil)
}

// CopyGathered is Copy, except that after a read, while more reports that
// a read would find bytes now (nil: never), they are read into the same
// buffer before the write: each write carries what has arrived, and the
// copy never waits for more than the first read.
func CopyGathered(dst io.Writer, src io.Reader, buf []byte, more func() bool) (int64, error) {
	var total int64
	for {
		n, err := src.Read(buf)
		for more != nil && err == nil && n < len(buf) && more() {
			var m int
			m, err = src.Read(buf[n:])
			n += m
		}
		if n > 0 {
			m, werr := dst.Write(buf[:n])
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

// idleReader and idleWriter arm a progress deadline before each read or
// write of their connection.
type idleReader struct {
	c    net.Conn
	idle time.Duration
}

func (r idleReader) Read(p []byte) (int, error) {
	_ = r.c.SetReadDeadline(time.Now().Add(r.idle))
	return r.c.Read(p)
}

type idleWriter struct {
	c    net.Conn
	idle time.Duration
}

func (w idleWriter) Write(p []byte) (int, error) { return WriteIdle(w.c, p, w.idle) }

// closeWrite half-closes a TCP connection so the peer sees EOF while the
// other direction keeps flowing.
func closeWrite(c net.Conn) {
	type closeWriter interface{ CloseWrite() error }
	raw := c
	if h, ok := c.(interface{ UnsafeConn() net.Conn }); ok {
		raw = h.UnsafeConn() // fasthttp's hijacked connection hides the TCP (or TLS) one
	}
	if cw, ok := raw.(closeWriter); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}
