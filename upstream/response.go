package upstream

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/internal/httpsyntax"
)

// ReadError maps a failure while reading a response (or its body) to
// ErrTimeout, ErrReset or ErrProtocol, joined to the original.
func ReadError(err error) error {
	var ne net.Error
	switch {
	case errors.Is(err, fasthttp.ErrTimeout), errors.As(err, &ne) && ne.Timeout(), errors.Is(err, os.ErrDeadlineExceeded):
		return errors.Join(ErrTimeout, err)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, net.ErrClosed):
		return errors.Join(ErrReset, err)
	default:
		return errors.Join(ErrProtocol, err)
	}
}

// MaxInterim bounds the interim responses read before the final one.
const MaxInterim = 16

var (
	errTooManyInterim = errors.New("upstream: more than 16 interim (1xx) responses")
	errBadStatus      = errors.New("upstream: status code not in 100-599")
	errHTTP10Coding   = errors.New("upstream: an HTTP/1.0 response with Transfer-Encoding")
	errFieldName      = errors.New("upstream: a response field name that is not a token")
)

// http10Coding looks at the response head at the start of r, if it is an
// HTTP/1.0 one, for a Transfer-Encoding field: its framing is faulty (RFC
// 9112 §6.1), and fasthttp would frame it by Content-Length, dropping the
// field unseen. Only what is in r's buffer is looked at: when the head's
// end is not there yet (it came in pieces), unsure says so, and the
// connection is not reused after it.
func http10Coding(r *bufio.Reader) (coding, unsure bool) {
	b, _ := r.Peek(r.Buffered())
	if !bytes.HasPrefix(b, []byte("HTTP/1.0 ")) {
		return false, false
	}
	if end := bytes.Index(b, []byte("\r\n\r\n")); end >= 0 {
		b = b[:end]
	} else {
		unsure = true
	}
	for {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return false, unsure
		}
		b = b[i+1:]
		if len(b) >= 18 && bytes.EqualFold(b[:18], []byte("transfer-encoding:")) {
			return true, false
		}
	}
}

// tokenFieldNames reports whether every field name of h is a token (RFC
// 9110 §5.1): "X Foo: bar" is not, and strict clients (Go's) refuse the
// whole response; a request with one gets a 400.
func tokenFieldNames(h *fasthttp.ResponseHeader) bool {
	for k := range h.All() {
		if !httpsyntax.IsToken(k) {
			return false
		}
	}
	return true
}

// badStatusLine reports whether the status line at the head of r is not
// "HTTP/1.x", one space, a three-digit status code from 100 to 599, then a
// space or the line's end (RFC 9112 §4). fasthttp reads "000" as 0, which
// its StatusCode reports as 200, and takes "+200" and " 200" for 200: a
// backend and the clients behind the sidecar may read such a line
// differently. A head is longer than the 13 bytes peeked, so the peek
// waits for nothing a head does not need.
func badStatusLine(r *bufio.Reader) bool {
	b, _ := r.Peek(13)
	if len(b) < 13 {
		return false // shorter than any head: fasthttp's own error
	}
	digit := func(c byte) bool { return c >= '0' && c <= '9' }
	return string(b[:7]) != "HTTP/1." || !digit(b[7]) || b[8] != ' ' ||
		b[9] < '1' || b[9] > '5' || !digit(b[10]) || !digit(b[11]) ||
		b[12] != ' ' && b[12] != '\r' && b[12] != '\n'
}

// ReadResponse reads the response head into resp and sets up its body
// stream (resp.StreamBody must be set; a HEAD answer sets resp.SkipBody).
// Each interim response (1xx other than 101, which is final for an
// upgrade) is handed to interim as it comes, in order; an error interim
// returns ends the read with it. Errors of the connection itself are the
// caller's to classify (ReadError).
func (c *Conn) ReadResponse(resp *fasthttp.Response, interim func(*fasthttp.ResponseHeader) error) error {
	resp.ResetBody()
	for n := 0; ; n++ {
		if badStatusLine(c.R) {
			return errBadStatus
		}
		coding, unsure := http10Coding(c.R)
		if coding {
			return errHTTP10Coding
		}
		if err := resp.Header.Read(c.R); err != nil {
			return err
		}
		if unsure {
			resp.Header.SetConnectionClose() // a Transfer-Encoding may have gone unseen: not reused
		}
		if !tokenFieldNames(&resp.Header) {
			return errFieldName
		}
		status := resp.Header.StatusCode()
		if status > 599 { // RFC 9110 §15: no class to read it by
			return errBadStatus
		}
		if status < 100 || status > 199 || status == fasthttp.StatusSwitchingProtocols {
			break
		}
		if n >= MaxInterim {
			return errTooManyInterim
		}
		if err := interim(&resp.Header); err != nil {
			return err
		}
	}
	status := resp.Header.StatusCode()
	if resp.SkipBody || status < 200 || status == fasthttp.StatusNoContent || status == fasthttp.StatusNotModified {
		return nil
	}
	return resp.ReadBody(c.R, 0) // StreamBody: only sets up the stream
}
