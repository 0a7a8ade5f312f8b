// Package listen serves HTTP/1.1 and HTTP/2 on one port by splitting one
// net.Listener into two: HTTP1 for fasthttp's Server.Serve and HTTP2 for a
// net/http Server.Serve.
//
// Each accepted connection is classified in a goroutine of its own, so a slow
// client never holds up the accept loop, and the classification is bounded by
// Settings.HandshakeTimeout:
//
//   - TLS (Settings.TLSConfig set): the splitter completes the handshake and
//     routes by the ALPN result: "h2" goes to HTTP2, anything else (including
//     no ALPN) to HTTP1. Both servers receive the *tls.Conn itself with the
//     handshake done. net/http needs exactly a *tls.Conn to serve h2 from
//     TLSNextProto, and fasthttp's second Handshake call is a no-op.
//   - Plaintext with Settings.H2C: the splitter reads the first bytes and
//     stops at the first byte that differs from the HTTP/2 client preface
//     (RFC 9113, section 3.4), so an HTTP/1.1 request waits for no more bytes
//     than it has sent. A full preface goes to HTTP2 (prior-knowledge h2c),
//     anything else to HTTP1. Either way the conn replays the bytes it read.
//   - Plaintext without H2C: HTTP1's Accept is the underlying Accept, with no
//     goroutine, and HTTP2 never yields a conn.
//
// Every TCP connection is a *Conn at the bottom (under TLS and the replay
// of sniffed bytes too): the proxy holds a streamed response's head back to
// send it with the first body bytes (Conn.HoldNextWrite).
//
// Use it like this:
//
//	sp, err := listen.New(ln, listen.Settings{TLSConfig: cfg}) // cfg.NextProtos = []string{"h2", "http/1.1"}
//	go fastSrv.Serve(sp.HTTP1())
//	h2 := &http.Server{Handler: h, Protocols: p} // p: SetHTTP2(true), SetUnencryptedHTTP2(true)
//	go h2.Serve(sp.HTTP2())
//	...
//	sp.Close()
//
// Set the TLS config on the Splitter only: leave http.Server.TLSConfig nil
// (or make its NextProtos contain "h2"), or net/http's Serve does not set up
// HTTP/2, and do not call ServeTLS on either server. For h2c the net/http
// server needs Protocols.SetUnencryptedHTTP2(true).
//
// Both listeners must be served. A conn that its server does not accept
// within HandshakeTimeout of its arrival is closed and counted in
// Stats.Dropped.
package listen

import (
	"bytes"
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultHandshakeTimeout is the HandshakeTimeout used when Settings leaves
// it zero.
const DefaultHandshakeTimeout = 10 * time.Second

// preface is the HTTP/2 client connection preface (RFC 9113, section 3.4).
var preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

// Settings configures a Splitter. The zero value is a plaintext splitter
// without h2c: every conn goes to HTTP1.
type Settings struct {
	// TLSConfig, if non-nil, makes every accepted conn a TLS server conn.
	// Its NextProtos decide what clients may negotiate: offer "h2" (and
	// "http/1.1") for HTTP/2. The splitter does not change it. It needs a
	// certificate (Certificates, GetCertificate or GetConfigForClient).
	// Default nil: plaintext.
	TLSConfig *tls.Config

	// H2C makes a plaintext splitter send conns that start with the
	// HTTP/2 client preface (prior-knowledge h2c, RFC 9113 section 3.3) to
	// HTTP2. It may not be combined with TLSConfig. The HTTP/1.1 Upgrade:
	// h2c dance is not supported (RFC 9113 deprecates it). Default false.
	H2C bool

	// HandshakeTimeout bounds the time from accept to hand-off: the TLS
	// handshake or the preface read, and then the wait for the server to
	// accept the conn. A conn over it is closed. With H2C it also bounds the
	// wait for a new conn's first byte, so a client that opens a conn and
	// sends its first request later (a pre-connecting pool) loses the conn
	// after it; net/http's own h2c check is bounded by ReadHeaderTimeout the
	// same way. It has no effect on a plaintext splitter without H2C.
	// Default DefaultHandshakeTimeout (10s).
	HandshakeTimeout time.Duration
}

// Stats counts what a Splitter did with its conns. Every field but Pending
// only grows.
type Stats struct {
	Accepted uint64 // conns accepted from the underlying listener
	HTTP1    uint64 // conns handed to HTTP1's Accept
	HTTP2    uint64 // conns handed to HTTP2's Accept
	TimedOut uint64 // closed: HandshakeTimeout passed during the handshake or preface read
	Failed   uint64 // closed: the handshake or the read failed, EOF included (a TCP health probe counts here)
	Dropped  uint64 // closed: classified, but not accepted in time or the target was closed
	Pending  int64  // conns being classified or waiting to be accepted now
}

// Splitter splits one listener into HTTP1 and HTTP2. Create it with New.
type Splitter struct {
	ln      net.Listener
	tls     *tls.Config
	h2c     bool
	timeout time.Duration

	h1, h2 *child

	closeOnce sync.Once
	done      chan struct{} // closed by Close
	closeErr  error

	acceptDone chan struct{} // closed when the accept loop ends by itself
	acceptErr  error         // why it ended; set before acceptDone is closed

	mu      sync.Mutex
	pending map[net.Conn]struct{} // raw conns being classified; nil once closed
	wg      sync.WaitGroup        // the accept loop and the classifiers

	accepted, timedOut, failed, dropped atomic.Uint64
	nPending                            atomic.Int64
}

// New returns a Splitter that owns ln: closing the Splitter closes ln. With
// TLSConfig or H2C it starts accepting at once; without them, HTTP1's Accept
// calls ln.Accept directly.
func New(ln net.Listener, s Settings) (*Splitter, error) {
	if ln == nil {
		return nil, errors.New("listen: nil listener")
	}
	if s.HandshakeTimeout < 0 {
		return nil, errors.New("listen: HandshakeTimeout is negative")
	}
	if s.TLSConfig != nil && s.H2C {
		return nil, errors.New("listen: H2C is for plaintext listeners, not with TLSConfig")
	}
	if c := s.TLSConfig; c != nil && len(c.Certificates) == 0 && c.GetCertificate == nil && c.GetConfigForClient == nil {
		return nil, errors.New("listen: TLSConfig has no certificate")
	}
	if s.HandshakeTimeout == 0 {
		s.HandshakeTimeout = DefaultHandshakeTimeout
	}
	sp := &Splitter{
		ln:         ln,
		tls:        s.TLSConfig,
		h2c:        s.H2C,
		timeout:    s.HandshakeTimeout,
		done:       make(chan struct{}),
		acceptDone: make(chan struct{}),
		pending:    make(map[net.Conn]struct{}),
	}
	sp.h1 = newChild(sp)
	sp.h2 = newChild(sp)
	if sp.passThrough() {
		return sp, nil
	}
	sp.wg.Add(1)
	go sp.acceptLoop()
	return sp, nil
}

// HTTP1 returns the listener of HTTP/1.x conns, for fasthttp's Server.Serve.
// Its conns are *tls.Conn (TLS), a replaying wrapper (H2C) or the accepted
// conn itself (plaintext without H2C).
func (sp *Splitter) HTTP1() net.Listener { return sp.h1 }

// HTTP2 returns the listener of HTTP/2 conns, for net/http's Server.Serve.
// Its conns are *tls.Conn (TLS) or a replaying wrapper (H2C).
func (sp *Splitter) HTTP2() net.Listener { return sp.h2 }

// Addr returns the underlying listener's address.
func (sp *Splitter) Addr() net.Addr { return sp.ln.Addr() }

// Close closes the underlying listener and every conn not yet handed off,
// makes both Accepts return net.ErrClosed, and waits for its goroutines to
// end. Conns already handed off belong to their servers. Close returns the
// error of closing the underlying listener; later calls return the same.
func (sp *Splitter) Close() error {
	sp.closeOnce.Do(func() {
		close(sp.done)
		sp.closeErr = sp.ln.Close()
		sp.mu.Lock()
		for c := range sp.pending {
			_ = c.Close()
		}
		sp.pending = nil
		sp.mu.Unlock()
		sp.wg.Wait()
	})
	return sp.closeErr
}

// Stats returns the counters. Fields are read one by one, so a snapshot
// taken while conns arrive may be off by a conn between fields.
func (sp *Splitter) Stats() Stats {
	return Stats{
		Accepted: sp.accepted.Load(),
		HTTP1:    sp.h1.handedOff.Load(),
		HTTP2:    sp.h2.handedOff.Load(),
		TimedOut: sp.timedOut.Load(),
		Failed:   sp.failed.Load(),
		Dropped:  sp.dropped.Load(),
		Pending:  sp.nPending.Load(),
	}
}

func (sp *Splitter) passThrough() bool { return sp.tls == nil && !sp.h2c }

// childClosed closes the Splitter once no listener that can still receive
// conns is open: both, or HTTP1 alone when HTTP2 can never get one. This lets
// http.Server.Shutdown and fasthttp's Shutdown, which close their listeners,
// release the port between them.
func (sp *Splitter) childClosed() {
	if sp.h1.isClosed() && (sp.h2.isClosed() || sp.passThrough()) {
		_ = sp.Close()
	}
}

func (sp *Splitter) acceptLoop() {
	defer sp.wg.Done()
	var backoff time.Duration
	for {
		c, err := sp.ln.Accept()
		if err != nil {
			if isTemporary(err) {
				// As net/http does (e.g. EMFILE): back off, up to 1s.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				select {
				case <-time.After(backoff):
					continue
				case <-sp.done:
					return
				}
			}
			select {
			case <-sp.done:
				sp.acceptErr = net.ErrClosed
			default:
				sp.acceptErr = err
			}
			close(sp.acceptDone)
			return
		}
		backoff = 0
		sp.accepted.Add(1)
		c = wrap(c)
		if !sp.track(c) {
			_ = c.Close()
			return
		}
		sp.wg.Add(1)
		go sp.classify(c)
	}
}

// track records raw as pending so Close can close it. It reports false if
// the Splitter is closed.
func (sp *Splitter) track(raw net.Conn) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.pending == nil {
		return false
	}
	sp.pending[raw] = struct{}{}
	sp.nPending.Add(1)
	return true
}

// untrack removes raw from pending. It reports false if Close has taken
// over (and closed raw).
func (sp *Splitter) untrack(raw net.Conn) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.pending == nil {
		return false
	}
	delete(sp.pending, raw)
	return true
}

func (sp *Splitter) classify(raw net.Conn) {
	defer sp.wg.Done()
	deadline := time.Now().Add(sp.timeout)
	c, to, err := sp.sniff(raw, deadline)
	if err == nil {
		err = raw.SetDeadline(time.Time{}) // the servers set their own
	}
	if !sp.untrack(raw) {
		sp.nPending.Add(-1)
		return // closed by Close
	}
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			sp.timedOut.Add(1)
		} else {
			sp.failed.Add(1)
		}
		sp.nPending.Add(-1) // before the peer can see the close
		_ = raw.Close()
		return
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case to.conns <- c:
		return // counted by Accept
	case <-to.done:
	case <-sp.done:
	case <-t.C:
	}
	sp.dropped.Add(1)
	sp.nPending.Add(-1)
	_ = c.Close()
}

// sniff classifies raw within deadline and returns the conn to hand off and
// the listener it goes to.
func (sp *Splitter) sniff(raw net.Conn, deadline time.Time) (net.Conn, *child, error) {
	if err := raw.SetDeadline(deadline); err != nil {
		return nil, nil, err
	}
	if sp.tls != nil {
		tc := tls.Server(raw, sp.tls)
		// The deadline bounds the handshake; Close interrupts it by
		// closing raw.
		if err := tc.Handshake(); err != nil {
			return nil, nil, err
		}
		if tc.ConnectionState().NegotiatedProtocol == "h2" {
			return tc, sp.h2, nil
		}
		return tc, sp.h1, nil
	}
	buf, isH2, err := readPreface(raw)
	if err != nil {
		return nil, nil, err
	}
	if isH2 {
		return newReplayConn(raw, buf), sp.h2, nil
	}
	return newReplayConn(raw, buf), sp.h1, nil
}

// readPreface reads from c until what it read differs from the HTTP/2
// client preface or is the whole preface, never more than len(preface)
// bytes. A read error before either is returned, even with bytes read: an
// HTTP/1.1 request cannot be a prefix of the preface.
func readPreface(c net.Conn) (buf []byte, isH2 bool, err error) {
	buf = make([]byte, 0, len(preface))
	for {
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if !bytes.HasPrefix(preface, buf) {
			return buf, false, nil
		}
		if len(buf) == len(preface) {
			return buf, true, nil
		}
		if err != nil {
			return nil, false, err
		}
	}
}

func isTemporary(err error) bool {
	ne, ok := err.(interface{ Temporary() bool })
	return ok && ne.Temporary() && !errors.Is(err, net.ErrClosed)
}

// child is one of the two listeners a Splitter yields.
type child struct {
	sp        *Splitter
	handedOff atomic.Uint64 // conns Accept returned
	conns     chan net.Conn // unbuffered: a conn is handed off only to a taker
	done      chan struct{}
	closeOnce sync.Once
}

func newChild(sp *Splitter) *child {
	return &child{sp: sp, conns: make(chan net.Conn), done: make(chan struct{})}
}

// Accept waits for the next conn of this kind. After Close of the child or
// of the Splitter it returns net.ErrClosed; if the underlying listener failed
// for good it returns that error.
func (c *child) Accept() (net.Conn, error) {
	if c.sp.passThrough() && c == c.sp.h1 {
		return c.acceptDirect()
	}
	select {
	case conn := <-c.conns:
		// Counted here, before the server can answer on conn.
		c.handedOff.Add(1)
		c.sp.nPending.Add(-1)
		return conn, nil
	case <-c.done:
	case <-c.sp.done:
	case <-c.sp.acceptDone:
		return nil, c.sp.acceptErr
	}
	return nil, net.ErrClosed
}

func (c *child) acceptDirect() (net.Conn, error) {
	conn, err := c.sp.ln.Accept()
	if err != nil {
		if c.isClosed() || errors.Is(err, net.ErrClosed) {
			return nil, net.ErrClosed
		}
		return nil, err
	}
	c.sp.accepted.Add(1)
	c.handedOff.Add(1)
	return wrap(conn), nil
}

// Close stops this listener; conns classified for it from now on are
// dropped. Once every listener that can receive conns is closed, the
// Splitter closes too (see Splitter.Close).
func (c *child) Close() error {
	c.closeOnce.Do(func() {
		close(c.done)
		c.sp.childClosed()
	})
	return nil
}

func (c *child) isClosed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// Addr returns the underlying listener's address.
func (c *child) Addr() net.Addr { return c.sp.ln.Addr() }
