package listen

import (
	"io"
	"net"
)

// Conn is a client TCP connection that can hold one write back and send
// it with the next in one writev. fasthttp flushes a streamed response's
// head on its own before the body starts; held, the head leaves in the
// same system call (and, on loopback, the same segment) as the first body
// bytes, one write and one wake-up of the client fewer per response.
//
// Holding is for a write whose successor follows at once: the caller asks
// for it (HoldNextWrite) only when the bytes of the next write are already
// at hand, and calls Flush when it may not write again. Everything that
// puts bytes on the socket by another way (ReadFrom, CloseWrite) sends a
// held write first, so the order on the wire is always the order of the
// writes. Like a net.Conn's writes, a Conn's are not for concurrent use
// while a write is held.
type Conn struct {
	*net.TCPConn

	hold bool
	held []byte      // a held write, sent with the next
	vec  [2][]byte   // held and the next write, for bufs
	bufs net.Buffers // one writev; kept here so that writing allocates nothing
}

// maxHeldCap is the largest held buffer a Conn keeps between responses;
// a larger one (a head that came with pipelined responses) is let go.
const maxHeldCap = 4 << 10

// NewConn wraps c.
func NewConn(c *net.TCPConn) *Conn { return &Conn{TCPConn: c} }

// wrap returns c as a *Conn when it is a TCP connection, else c itself.
func wrap(c net.Conn) net.Conn {
	if tc, ok := c.(*net.TCPConn); ok {
		return NewConn(tc)
	}
	return c
}

// HoldNextWrite makes the next Write return at once without writing: its
// bytes go out with the Write after it, or at Flush.
func (c *Conn) HoldNextWrite() { c.hold = true }

// Write writes p, after a held write in the same writev if there is one.
func (c *Conn) Write(p []byte) (int, error) {
	if c.hold {
		c.hold = false
		c.held = append(c.held[:0], p...)
		return len(p), nil
	}
	if len(c.held) == 0 {
		return c.TCPConn.Write(p)
	}
	return c.writeHeld(p)
}

// Flush sends a held write now, and ends a hold that no write used.
func (c *Conn) Flush() error {
	c.hold = false
	if len(c.held) == 0 {
		return nil
	}
	_, err := c.writeHeld(nil)
	return err
}

// writeHeld writes the held bytes and p in one writev and returns how much
// of p was written.
func (c *Conn) writeHeld(p []byte) (int, error) {
	held := len(c.held)
	c.vec[0], c.vec[1] = c.held, p
	c.bufs = c.vec[:]
	n, err := c.bufs.WriteTo(c.TCPConn)
	c.vec[0], c.vec[1] = nil, nil
	c.bufs = nil
	if cap(c.held) > maxHeldCap {
		c.held = nil
	} else {
		c.held = c.held[:0]
	}
	if n < int64(held) {
		// The held bytes did not all go: what follows them cannot either,
		// and the connection is broken (a write error or deadline).
		return 0, err
	}
	return int(n) - held, err
}

// ReadFrom sends a held write, then copies r with the socket's own
// ReadFrom (splice, sendfile).
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if err := c.Flush(); err != nil {
		return 0, err
	}
	return c.TCPConn.ReadFrom(r)
}

// CloseWrite sends a held write, then shuts down the writing side.
func (c *Conn) CloseWrite() error {
	if err := c.Flush(); err != nil {
		return err
	}
	return c.TCPConn.CloseWrite()
}

// NetConn returns the TCP connection, as tls.Conn.NetConn does. Writing to
// it directly skips a held write.
func (c *Conn) NetConn() net.Conn { return c.TCPConn }
