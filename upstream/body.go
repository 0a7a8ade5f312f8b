package upstream

import (
	"errors"
	"fmt"
	"io"
	"strconv"
)

// ErrRequestBody wraps a failure to read the request body being sent: the
// sender's side (a client gone or sending garbage), not the upstream's.
var ErrRequestBody = errors.New("upstream: reading the request body failed")

// ChunkRoom is what SendBody's buffer keeps free around the data to frame
// a chunk in place: the size line before (up to 16 hex digits and CRLF)
// and CRLF after. The data area is buf[ChunkRoom : len(buf)-2].
const ChunkRoom = 18

var lastChunk = []byte("0\r\n\r\n")

// headCompany: a first read of fewer body bytes than this is held for one
// more read, so that the request head leaves with the body (see SendBody).
const headCompany = 512

// SendBody writes a request body to the connection as it arrives, each
// read in one write: as it is, or, when chunked, framed as one chunk in
// place (no copy, and one syscall per read, not three). A request head
// still in c.W leaves in the first write, with the first data; with hold,
// a first read of fewer than headCompany bytes waits for one more read to
// join it (fasthttp's read-ahead hands over one byte first). Hold only a
// body sent before the response is read: a pumped one must reach the
// upstream at once, which may answer before the body ends. The data area of
// buf (see ChunkRoom) may already hold first bytes, sent before src is
// read; eof says src has ended already.
//
// progress runs before each write with the total read so far (and with
// eof true once src has ended); an error it returns ends the copy (the
// sender's body limit, say), as does a read error of src, wrapped in
// ErrRequestBody, or a write error. It returns the bytes of body written.
func (c *Conn) SendBody(src io.Reader, buf []byte, first int, eof, chunked, hold bool, progress func(total int64, eof bool) error) (int64, error) {
	data := buf[ChunkRoom : len(buf)-2]
	send := func(n int) error {
		frame := data[:n]
		if chunked {
			var hdr [ChunkRoom]byte
			h := strconv.AppendUint(hdr[:0], uint64(n), 16)
			h = append(h, '\r', '\n')
			start := ChunkRoom - len(h)
			copy(buf[start:], h)
			buf[ChunkRoom+n], buf[ChunkRoom+n+1] = '\r', '\n'
			frame = buf[start : ChunkRoom+n+2]
		}
		if c.W.Buffered() > 0 { // the request head: it leaves with the first data
			if len(frame) <= c.W.Available() {
				_, _ = c.W.Write(frame) // into the buffer: cannot fail
				return c.W.Flush()
			}
			if err := c.W.Flush(); err != nil {
				return err
			}
		}
		_, err := c.Write(frame)
		return err
	}
	var sent int64
	write := func(n int) error {
		if err := progress(sent+int64(n), false); err != nil {
			return err
		}
		if err := send(n); err != nil {
			return err
		}
		sent += int64(n)
		return nil
	}
	if first > 0 {
		if err := write(first); err != nil {
			return sent, err
		}
	}
	held, waited := 0, false // read but not yet written, once, before the head goes
	for !eof {
		n, rerr := src.Read(data[held:])
		n += held
		held = 0
		if hold && n > 0 && n < headCompany && !waited && c.W.Buffered() > 0 && rerr == nil {
			// A first read this small is the server's read-ahead (fasthttp
			// hands over one byte before the rest): read once more before
			// the head goes, so that head and body leave in one write, not
			// three. The head waits only for the sender's next bytes.
			if err := progress(sent+int64(n), false); err != nil {
				return sent, err
			}
			held, waited = n, true
			continue
		}
		if n > 0 {
			if err := write(n); err != nil {
				return sent, err
			}
		}
		switch {
		case rerr == io.EOF:
			eof = true
		case rerr != nil:
			return sent, fmt.Errorf("%w: %w", ErrRequestBody, rerr)
		}
	}
	if err := progress(sent, true); err != nil {
		return sent, err
	}
	if chunked {
		if _, err := c.W.Write(lastChunk); err != nil {
			return sent, err
		}
	}
	return sent, c.W.Flush()
}
