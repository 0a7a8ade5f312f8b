// Package tcpinfo reads a TCP connection's kernel counters (TCP_INFO), for
// tests that count what crossed the wire rather than time it.
package tcpinfo

import (
	"net"

	"golang.org/x/sys/unix"
)

// DataSegmentsIn is the number of segments with data c has received
// (tcpi_data_segs_in): how many of the peer's writes reached it apart,
// whenever it reads them.
func DataSegmentsIn(c *net.TCPConn) (uint32, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var info *unix.TCPInfo
	var ierr error
	if err := rc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
		return 0, err
	}
	if ierr != nil {
		return 0, ierr
	}
	return info.Data_segs_in, nil
}
