package listen

import (
	"io"
	"net"
	"syscall"
	"time"
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

	hold   bool
	abort  bool        // SetLinger(0): Close resets the connection, without lingering
	linger bool        // LingerOnClose: the client may still be sending
	held   []byte      // a held write, sent with the next
	vec    [2][]byte   // held and the next write, for bufs
	bufs   net.Buffers // one writev; kept here so that writing allocates nothing
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

// SetLinger is the socket's; SetLinger(0) also makes Close reset the
// connection at once, without lingering (see Close).
func (c *Conn) SetLinger(sec int) error {
	c.abort = sec == 0
	return c.TCPConn.SetLinger(sec)
}

// Lingering close (RFC 9112 §9.6): closing a socket that still has unread
// bytes from the client makes the kernel send a reset, and the reset makes
// the client's kernel drop what it has not read yet: the end of the
// response. That is the case of an upstream's early answer (a 413 or 401
// before it read a large upload), after which fasthttp closes the
// connection with the rest of the upload unread. So Close first ends the
// writing side (FIN after the response) and reads on, discarding, until
// the client closes too, for at most lingerTime and lingerBytes.
const (
	lingerTime  = 2 * time.Second
	lingerBytes = 64 << 20
)

// LingerOnClose says the client may still be sending (a request body the
// server did not read to its end): Close lingers even if none of it has
// arrived at that moment.
func (c *Conn) LingerOnClose() { c.linger = true }

// Close closes the connection; with client bytes unread, or after
// LingerOnClose, after a lingering close.
func (c *Conn) Close() error {
	if c.abort || !c.linger && !c.unread() {
		return c.TCPConn.Close()
	}
	// A Read waiting in another goroutine, if any, has until the same
	// deadline: this one waits for it at most that long.
	if c.TCPConn.CloseWrite() == nil && c.TCPConn.SetReadDeadline(time.Now().Add(lingerTime)) == nil {
		var buf [4 << 10]byte
		for n := 0; n < lingerBytes; {
			m, err := c.TCPConn.Read(buf[:])
			n += m
			if err != nil {
				break // the client closed too, or lingerTime passed
			}
		}
	}
	return c.TCPConn.Close()
}

// unread reports whether the client has sent bytes not read yet. It
// looks with Control, not Read: Close may be called while another
// goroutine waits in a Read (fasthttp closing idle connections at
// shutdown), which holds the socket's read lock.
func (c *Conn) unread() bool {
	rc, err := c.TCPConn.SyscallConn()
	if err != nil {
		return false
	}
	var readable bool
	_ = rc.Control(func(fd uintptr) {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		readable = err == nil && n > 0
	})
	return readable
}
