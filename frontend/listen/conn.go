package listen

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// replayConn is a net.Conn whose first Reads return the bytes the splitter
// read while sniffing. Everything else, deadlines and addresses included, is
// the underlying conn's.
//
// What a wrapper costs (this one, and Conn under it), against handing
// fasthttp the *net.TCPConn itself: fasthttp's single-writev response path
// (vectorWriter, for a body it holds that is larger than its write buffer;
// the proxy's buffered bodies are smaller) and its SetKeepAlive call
// (Server.TCPKeepalive) look for *net.TCPConn and keepAliveConn, so they do
// not apply; net.Listen's conns have keep-alive on already. Kept: RemoteAddr stays a *net.TCPAddr (fasthttp's per-IP limits and
// RemoteIP), ReadFrom reaches the socket's (sendfile and splice), NetConn
// unwraps as tls.Conn's does, and CloseWrite exists when the underlying conn
// has it (replayConnCW).
type replayConn struct {
	net.Conn

	drained atomic.Bool // set once buf is empty: Reads go straight through
	mu      sync.Mutex  // guards buf; net.Conn allows concurrent Reads
	buf     []byte
}

// replayConnCW is a replayConn over a conn with CloseWrite (*net.TCPConn,
// *net.UnixConn), for half-closing tunnels.
type replayConnCW struct {
	*replayConn
}

type closeWriter interface{ CloseWrite() error }

// newReplayConn returns c that first reads buf. The result has CloseWrite if
// c has.
func newReplayConn(c net.Conn, buf []byte) net.Conn {
	rc := &replayConn{Conn: c, buf: buf}
	rc.drained.Store(len(buf) == 0)
	if _, ok := c.(closeWriter); ok {
		return replayConnCW{rc}
	}
	return rc
}

func (c *replayConn) Read(p []byte) (int, error) {
	if c.drained.Load() {
		return c.Conn.Read(p)
	}
	c.mu.Lock()
	if len(c.buf) == 0 {
		c.mu.Unlock()
		return c.Conn.Read(p)
	}
	n := copy(p, c.buf)
	c.buf = c.buf[n:]
	if len(c.buf) == 0 {
		c.buf = nil
		c.drained.Store(true)
	}
	c.mu.Unlock()
	return n, nil
}

// ReadFrom writes r to the underlying conn with its ReadFrom when it has
// one, so sendfile and splice still apply.
func (c *replayConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(writerOnly{c.Conn}, r)
}

// NetConn returns the underlying conn, as tls.Conn.NetConn does, so code
// that unwraps to a *net.TCPConn (e.g. for SetLinger) still reaches it.
// Reading from it directly skips bytes not yet replayed.
func (c *replayConn) NetConn() net.Conn { return c.Conn }

// CloseWrite shuts down the writing side of the underlying conn.
func (c replayConnCW) CloseWrite() error { return c.Conn.(closeWriter).CloseWrite() }

// writerOnly hides every method but Write, so io.Copy cannot call back into
// replayConn.ReadFrom.
type writerOnly struct{ io.Writer }
