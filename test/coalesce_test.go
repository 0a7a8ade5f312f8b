package test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-proxy/sidecar/internal/tcpinfo"
)

// A streamed Content-Length response whose first body bytes came with its
// head leaves in one write: head and body reach the client in one TCP
// segment (on loopback, whose segments hold 64 KiB), not the head alone
// and then the body; and a body of up to 64 KiB that came at once leaves
// whole in that write, not in two through the 32 KiB copy buffer. The
// client counts the data segments it received (TCP_INFO's
// tcpi_data_segs_in), which does not depend on when it reads.
func TestStreamedHeadLeavesWithTheFirstBodyBytes(t *testing.T) {
	for _, size := range []int{20 << 10, 40 << 10} { // above the upstream reader's 16 KiB: streamed, not buffered
		t.Run(fmt.Sprintf("%d KiB", size>>10), func(t *testing.T) {
			body := strings.Repeat("b", size)
			upstream := rawBackend(t, func(c net.Conn) {
				br := bufio.NewReader(c)
				for {
					if _, err := readRequestHead(br); err != nil {
						return
					}
					// Head and body in one write: all of it is there when
					// the sidecar reads the head.
					io.WriteString(c, fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", size, body))
				}
			})
			sc := startSidecar(t, routeTo(upstream, ""))
			c, err := net.Dial("tcp", sc.Addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			br := bufio.NewReader(c)
			for i := range 4 { // the first over a new upstream connection, whose window may split what the upstream sent: not counted
				before := dataSegmentsIn(t, c)
				c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
					t.Fatal(err)
				}
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(resp.Body)
				if err != nil || string(got) != body {
					t.Fatalf("request %d: %d bytes, %v", i, len(got), err)
				}
				if segs := dataSegmentsIn(t, c) - before; segs != 1 && i > 0 {
					t.Errorf("request %d: the response came in %d data segments, want 1", i, segs)
				}
			}
		})
	}
}

// dataSegmentsIn is the number of segments with data c has received.
func dataSegmentsIn(t *testing.T, c net.Conn) uint32 {
	t.Helper()
	n, err := tcpinfo.DataSegmentsIn(c.(*net.TCPConn))
	if err != nil {
		t.Fatal(err)
	}
	return n
}
