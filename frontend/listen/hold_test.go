package listen

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/tcpinfo"
)

// tcpPair returns a *Conn over the server side of a loopback TCP
// connection, and the client side.
func tcpPair(t *testing.T) (*Conn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return NewConn(server.(*net.TCPConn)), client.(*net.TCPConn)
}

// dataSegmentsIn is the number of segments with data c has received.
func dataSegmentsIn(t *testing.T, c *net.TCPConn) uint32 {
	t.Helper()
	n, err := tcpinfo.DataSegmentsIn(c)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// readExactly reads len(want) bytes from c and compares them.
func readExactly(t *testing.T, c net.Conn, want string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read: %v (got %q)", err, got)
	}
	if string(got) != want {
		t.Fatalf("read %q, want %q", got, want)
	}
}

// nothingToRead fails if c has bytes to read within a short wait.
func nothingToRead(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	var b [1]byte
	if n, err := c.Read(b[:]); n > 0 || !isTimeout(err) {
		t.Fatalf("read %q, %v: want nothing yet", b[:n], err)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func TestConnHeldWriteLeavesWithTheNext(t *testing.T) {
	c, peer := tcpPair(t)
	before := dataSegmentsIn(t, peer)
	c.HoldNextWrite()
	if n, err := c.Write([]byte("head;")); n != 5 || err != nil {
		t.Fatalf("held Write = %d, %v", n, err)
	}
	nothingToRead(t, peer)
	if n, err := c.Write([]byte("body")); n != 4 || err != nil {
		t.Fatalf("Write after the held one = %d, %v: want the length of its own bytes", n, err)
	}
	readExactly(t, peer, "head;body")
	if segs := dataSegmentsIn(t, peer) - before; segs != 1 {
		t.Errorf("held write and the next arrived in %d segments, want 1", segs)
	}
	// The hold is spent: the next write goes at once.
	if _, err := c.Write([]byte("more")); err != nil {
		t.Fatal(err)
	}
	readExactly(t, peer, "more")
}

func TestConnFlush(t *testing.T) {
	c, peer := tcpPair(t)
	if err := c.Flush(); err != nil { // nothing held
		t.Fatal(err)
	}
	c.HoldNextWrite()
	c.Write([]byte("head"))
	nothingToRead(t, peer)
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	readExactly(t, peer, "head")

	// A hold that no write used ends at Flush.
	c.HoldNextWrite()
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("direct"))
	readExactly(t, peer, "direct")
}

// Every other way onto the socket sends the held bytes first.
func TestConnKeepsOrderOnOtherWrites(t *testing.T) {
	c, peer := tcpPair(t)
	c.HoldNextWrite()
	c.Write([]byte("head;"))
	if n, err := c.ReadFrom(strings.NewReader("copied")); n != 6 || err != nil {
		t.Fatalf("ReadFrom = %d, %v", n, err)
	}
	readExactly(t, peer, "head;copied")

	c.HoldNextWrite()
	c.Write([]byte("last"))
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	rest, err := io.ReadAll(peer)
	if err != nil || string(rest) != "last" {
		t.Fatalf("after CloseWrite: %q, %v; want the held bytes, then EOF", rest, err)
	}
}

// A held write that cannot be sent fails the write that would carry it,
// which reports none of its own bytes written.
func TestConnHeldWriteFails(t *testing.T) {
	c, _ := tcpPair(t)
	c.HoldNextWrite()
	c.Write([]byte("head"))
	c.TCPConn.Close()
	if n, err := c.Write([]byte("body")); n != 0 || err == nil {
		t.Fatalf("Write on a closed conn = %d, %v", n, err)
	}
}

// A large held write (a head with pipelined responses before it) is not
// kept for the connection's life.
func TestConnLetsALargeHeldBufferGo(t *testing.T) {
	c, peer := tcpPair(t)
	big := bytes.Repeat([]byte("x"), 2*maxHeldCap)
	c.HoldNextWrite()
	c.Write(big)
	c.Write([]byte("!"))
	readExactly(t, peer, string(big)+"!")
	if c.held != nil {
		t.Errorf("kept a %d-byte held buffer", cap(c.held))
	}
	c.HoldNextWrite()
	c.Write([]byte("small"))
	c.Flush()
	readExactly(t, peer, "small")
	if cap(c.held) == 0 {
		t.Error("a small held buffer was not kept for reuse")
	}
}

// Holding a write and sending it with the next allocates nothing.
func TestConnHoldDoesNotAllocate(t *testing.T) {
	c, peer := tcpPair(t)
	go io.Copy(io.Discard, peer)
	head, body := []byte("head"), []byte("body")
	c.HoldNextWrite() // the first use sizes the held buffer
	c.Write(head)
	c.Write(body)
	if n := testing.AllocsPerRun(100, func() {
		c.HoldNextWrite()
		c.Write(head)
		c.Write(body)
	}); n != 0 {
		t.Errorf("%.1f allocations per held write", n)
	}
}

// Every HTTP/1.1 conn the splitter yields has a *Conn at the bottom: plain,
// after an h2c sniff, and under TLS.
func TestHTTP1ConnsCanHold(t *testing.T) {
	serverCfg, pool := selfSigned(t)
	for _, tc := range []struct {
		name string
		s    Settings
		dial func(addr string) (net.Conn, error)
	}{
		{"plaintext", Settings{}, func(a string) (net.Conn, error) { return net.Dial("tcp", a) }},
		{"h2c sniffed", Settings{H2C: true}, func(a string) (net.Conn, error) { return net.Dial("tcp", a) }},
		{"TLS", Settings{TLSConfig: serverCfg}, func(a string) (net.Conn, error) {
			return tls.Dial("tcp", a, &tls.Config{RootCAs: pool})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sp := newSplitter(t, tc.s)
			client, err := tc.dial(sp.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			go io.WriteString(client, "GET / HTTP/1.1\r\n\r\n") // the sniff needs bytes
			c, err := sp.HTTP1().Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			for {
				if _, ok := c.(*Conn); ok {
					return
				}
				u, ok := c.(interface{ NetConn() net.Conn })
				if !ok {
					t.Fatalf("%T has no *Conn under it", c)
				}
				c = u.NetConn()
			}
		})
	}
}

// Closing with client bytes unread is a lingering close: a FIN after what
// was written, the client's bytes read on until it closes, and no reset
// that would drop the written bytes the client has not read yet.
func TestConnLingeringClose(t *testing.T) {
	c, peer := tcpPair(t)
	if _, err := peer.Write(bytes.Repeat([]byte("u"), 64<<10)); err != nil { // an upload nobody reads
		t.Fatal(err)
	}
	answer := bytes.Repeat([]byte("a"), 200<<10)
	go func() {
		c.Write(answer)
		c.Close()
	}()
	time.Sleep(200 * time.Millisecond) // the close has happened; the client reads only now
	_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(peer)
	if err != nil || len(got) != len(answer) {
		t.Fatalf("read %d of %d bytes, %v: want all, then EOF", len(got), len(answer), err)
	}
}

// After SetLinger(0), Close resets at once.
func TestConnAbortCloseResets(t *testing.T) {
	c, peer := tcpPair(t)
	peer.Write([]byte("unread"))
	time.Sleep(20 * time.Millisecond)
	c.SetLinger(0)
	start := time.Now()
	c.Close()
	if d := time.Since(start); d > time.Second {
		t.Errorf("Close after SetLinger(0) took %v", d)
	}
	_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(peer); err == nil {
		t.Error("the peer saw a clean end, want a reset")
	}
}

// Close from another goroutine while a Read waits (fasthttp closing idle
// connections at shutdown) returns at once and ends the Read.
func TestConnCloseDuringARead(t *testing.T) {
	c, _ := tcpPair(t)
	done := make(chan error, 1)
	go func() {
		var b [1]byte
		_, err := c.Read(b[:])
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // the Read waits
	closed := make(chan struct{})
	go func() { c.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(time.Second):
		t.Fatal("Close waited for the Read")
	}
	if err := <-done; err == nil {
		t.Error("the Read did not end with the Close")
	}
}
