package upstream

import (
	"bufio"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"syscall"
	"time"
)

// Conn is one upstream connection, held by one request between Acquire
// and Release. Its Read and Write keep a deadline ahead of them, which turns fasthttp-style absolute timeouts into progress
// timeouts: a transfer that keeps moving is never cut, a stalled one is cut
// after ReadTimeout/WriteTimeout.
type Conn struct {
	net.Conn
	// R and W buffer the connection (16 KiB each; R's size is also the
	// largest response head accepted).
	R *bufio.Reader
	W *bufio.Writer
	// Reused says the connection came from the pool (it served a request
	// before), so the upstream may have closed it meanwhile.
	Reused bool

	// ReadTimeout and WriteTimeout are the progress timeouts of the next
	// reads and writes (default Settings.IOTimeout): the proxy sets the
	// response timeout while it waits for a head, the I/O timeout while a
	// body streams. Only the goroutine that reads sets ReadTimeout; a change
	// takes effect at the next network read.
	ReadTimeout  time.Duration
	WriteTimeout time.Duration

	headWait bool // reading a response head: ReadTimeout is one deadline, set at the first read

	lastUsed      time.Time
	readDeadline  time.Time // as last set on the socket; zero: unknown
	writeDeadline time.Time
	raw           syscall.RawConn       // the TCP socket under the conn (TLS too), for peeking; nil if none
	tls           *tls.Conn             // the TLS layer, if any
	peek          func(fd uintptr) bool // peekQuiet, made once (a method value per call allocates)
	quiet         bool
	peekReady     func(fd uintptr) bool // peekReadable, made once
	readable      bool
}

// drifted reports whether the deadline on the socket (cur) is more than
// d/8 away from the one wanted, either way. Setting a deadline costs a
// timer update under a lock; on a busy connection this keeps it to one
// every d/8 instead of one per read, at the price of stall detection
// within 1/8 of the timeout.
func drifted(cur, want time.Time, d time.Duration) bool {
	diff := want.Sub(cur)
	return diff > d>>3 || diff < -(d>>3)
}

func (c *Conn) Read(p []byte) (int, error) {
	if c.headWait {
		// The wait for a response head is one timeout, not a progress
		// timeout: a head that trickles in a byte at a time must not hold
		// the request (and its slot) for hours. Only an upload's progress
		// (sendBody) and each interim response move it.
		if c.readDeadline.IsZero() {
			c.readDeadline = time.Now().Add(c.ReadTimeout)
			_ = c.Conn.SetReadDeadline(c.readDeadline)
		}
		return c.Conn.Read(p)
	}
	if now := time.Now(); drifted(c.readDeadline, now.Add(c.ReadTimeout), c.ReadTimeout) {
		c.readDeadline = now.Add(c.ReadTimeout)
		_ = c.Conn.SetReadDeadline(c.readDeadline)
	}
	return c.Conn.Read(p)
}

func (c *Conn) Write(p []byte) (int, error) {
	if now := time.Now(); drifted(c.writeDeadline, now.Add(c.WriteTimeout), c.WriteTimeout) {
		c.writeDeadline = now.Add(c.WriteTimeout)
		_ = c.Conn.SetWriteDeadline(c.writeDeadline)
	}
	return c.Conn.Write(p)
}

// Alive reports whether a pooled connection still looks open and quiet:
// nothing to read yet means yes; EOF, a reset or unsolicited bytes mean the
// upstream closed it while idle or is out of sync. It peeks at the TCP
// socket (MSG_PEEK, MSG_DONTWAIT) rather than reading under a past
// deadline, which Go answers with a timeout before looking at the socket
// at all. Under TLS both are needed: a read under a past deadline finds a
// record the TLS layer already holds (decrypted or not) without touching
// the socket, and the peek finds bytes still in the socket — either is a
// response nobody asked for, or the upstream's close_notify.
func (c *Conn) Alive() bool {
	if c.R.Buffered() > 0 {
		return false // unsolicited bytes: the connection is out of sync
	}
	if c.raw == nil {
		return true // not a socket (tests' pipes): nothing to look at
	}
	if c.tls != nil && !c.tlsQuiet() {
		return false
	}
	if now := time.Now(); !c.readDeadline.After(now) { // unknown or expired: it would fail raw reads too
		c.readDeadline = time.Time{} // Read re-arms
		_ = c.Conn.SetReadDeadline(c.readDeadline)
	}
	err := c.raw.Read(c.peek)
	return err == nil && c.quiet
}

// tlsQuiet reads from the TLS layer under a deadline already past: a
// record it holds is processed (a late session ticket is absorbed, data
// or an alert means out of sync or closed), and the socket is not touched.
// A timeout, which the TLS layer does not keep as its error, is quiet.
func (c *Conn) tlsQuiet() bool {
	_ = c.tls.SetReadDeadline(time.Unix(1, 0))
	c.readDeadline = time.Time{} // the next Read sets it anew
	var b [1]byte
	_, err := c.tls.Read(b[:])
	return errors.Is(err, os.ErrDeadlineExceeded)
}

// peekQuiet is Alive's look at the socket, made once per connection (a
// closure per call would be an allocation per request): quiet says
// nothing was there to read.
func (c *Conn) peekQuiet(fd uintptr) bool {
	var b [1]byte
	_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	c.quiet = err == syscall.EAGAIN
	return true // one look, never wait
}

// Readable reports, without waiting, whether a read would find bytes: in
// the reader's buffer, or (plain TCP) on the socket, by one non-blocking
// peek. A TLS connection answers from its buffer alone.
func (c *Conn) Readable() bool {
	if c.R.Buffered() > 0 {
		return true
	}
	if c.raw == nil || c.tls != nil {
		return false // under TLS, bytes in the socket may be half a record
	}
	if err := c.raw.Read(c.peekReady); err != nil {
		return false
	}
	return c.readable
}

// peekReadable is Readable's look at the socket.
func (c *Conn) peekReadable(fd uintptr) bool {
	var b [1]byte
	n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	c.readable = err == nil && n > 0
	return true // one look, never wait
}

// ForgetReadDeadline makes the next Read set the socket's deadline anew:
// for when something else (a pump writing the request) may have moved it.
func (c *Conn) ForgetReadDeadline() { c.readDeadline = time.Time{} }
