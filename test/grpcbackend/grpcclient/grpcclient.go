// Package grpcclient drives the grpcbackend test program from tests: it
// builds and starts the binary, dials it (directly or through a proxy) and
// streams data through FullDuplexCall. It also names the metadata the
// backend understands, so the program and its tests share one list.
//
// Only tests import it: it pulls in google.golang.org/grpc, which the
// sidecar binary must not.
package grpcclient

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
)

// Request metadata the backend acts on.
const (
	WantStatus      = "x-want-status"       // a status code number to end the call with
	WantMessage     = "x-want-message"      // the grpc-message for WantStatus (printable ASCII, as metadata is; a request's response_status carries any text)
	WantStatusAfter = "x-want-status-after" // response messages to send before WantStatus; default 0
	DelayMS         = "x-delay-ms"          // milliseconds to wait before answering
	EchoPrefix      = "x-echo-"             // request metadata with this prefix comes back as headers
	TrailersOnly    = "x-trailers-only"     // any value: send no headers, put them in the trailer, so an early status is trailers-only
)

// Response metadata the backend sends.
const (
	HeaderName           = "x-backend-name"           // header: the -name flag
	HeaderDeadlineMS     = "x-backend-deadline-ms"    // header and trailer: ms left of the deadline on arrival, or "none"
	HeaderAuthority      = "x-backend-authority"      // header: the :authority the backend saw
	TrailerMethod        = "x-backend-trailer"        // trailer: the method name, e.g. "UnaryCall"
	TrailerReceivedBytes = "x-backend-received-bytes" // trailer: payload bytes the backend received
)

// PackagePath is the import path of the grpcbackend program.
const PackagePath = "github.com/sidecar-proxy/sidecar/test/grpcbackend"

// Build compiles the grpcbackend program into dir and returns the binary's
// path. Call it once, from TestMain.
func Build(dir string) (string, error) {
	bin := filepath.Join(dir, "grpcbackend")
	cmd := exec.Command("go", "build", "-o", bin, PackagePath)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("grpcclient: building %s: %w", PackagePath, err)
	}
	return bin, nil
}

// Backend is a running grpcbackend process.
type Backend struct {
	Addr string // host:port it listens on
	cmd  *exec.Cmd
	done chan struct{}
	err  error // from Wait; read after done
}

// Start runs bin with args (e.g. "-name", "b1"), waits at most 10s for the
// address on its first stdout line, and stops it when the test ends. The
// backend's stderr goes to the test's stderr.
func Start(t testing.TB, bin string, args ...string) *Backend {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	b := &Backend{cmd: cmd, done: make(chan struct{})}
	addr := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		addr <- strings.TrimSpace(line)
		_, _ = io.Copy(io.Discard, out) // keep the pipe drained until exit
	}()
	go func() { b.err = cmd.Wait(); close(b.done) }()
	t.Cleanup(b.Stop)
	select {
	case b.Addr = <-addr:
		if b.Addr == "" {
			<-b.done
			t.Fatalf("grpcbackend exited before listening: %v", b.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("grpcbackend printed no address within 10s")
	}
	return b
}

// Stop sends SIGTERM, waits up to 10s for a graceful exit, then kills the
// process. It is safe to call more than once.
func (b *Backend) Stop() {
	select {
	case <-b.done:
		return
	default:
	}
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(10 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.done
	}
}

// Dial returns a TestService client for target (host:port): h2c with
// prior knowledge when tlsConf is nil, TLS with ALPN h2 otherwise. The
// connection closes when the test ends. Messages up to 16 MiB pass.
func Dial(t testing.TB, target string, tlsConf *tls.Config) testpb.TestServiceClient {
	t.Helper()
	creds := insecure.NewCredentials()
	if tlsConf != nil {
		creds = credentials.NewTLS(tlsConf)
	}
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.MaxCallSendMsgSize(16<<20)),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return testpb.NewTestServiceClient(conn)
}

// EchoResult is what Echo measured.
type EchoResult struct {
	Sent, Received int64         // payload bytes
	Elapsed        time.Duration // from the first send to the trailers
	Trailer        metadata.MD
}

// Echo streams total bytes through FullDuplexCall in messages of chunk
// bytes, reading the echo while it sends, and checks that every byte comes
// back in order. It holds a few chunks in memory, whatever total is.
func Echo(ctx context.Context, c testpb.TestServiceClient, total, chunk int64) (EchoResult, error) {
	if chunk <= 0 || total < 0 {
		return EchoResult{}, errors.New("grpcclient: Echo needs chunk > 0 and total >= 0")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	stream, err := c.FullDuplexCall(ctx)
	if err != nil {
		return EchoResult{}, err
	}
	var res EchoResult
	sendErr := make(chan error, 1)
	go func() {
		defer close(sendErr)
		buf := make([]byte, chunk)
		for res.Sent < total {
			n := min(chunk, total-res.Sent)
			fill(buf[:n], res.Sent)
			if err := stream.Send(&testpb.StreamingOutputCallRequest{Payload: &testpb.Payload{Body: buf[:n]}}); err != nil {
				sendErr <- err // the receive side reports the status
				return
			}
			res.Sent += n
		}
		sendErr <- stream.CloseSend()
	}()
	want := make([]byte, chunk)
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			cancel()
			<-sendErr
			return res, err
		}
		body := resp.GetPayload().GetBody()
		w := want[:min(int64(len(body)), chunk)]
		fill(w, res.Received)
		if len(body) > len(w) || !bytes.Equal(body, w) {
			cancel()
			<-sendErr
			return res, fmt.Errorf("grpcclient: echo differs at byte %d..%d", res.Received, res.Received+int64(len(body)))
		}
		res.Received += int64(len(body))
	}
	if err := <-sendErr; err != nil {
		return res, err
	}
	res.Elapsed = time.Since(start)
	res.Trailer = stream.Trailer()
	if res.Received != total {
		return res, fmt.Errorf("grpcclient: echo returned %d of %d bytes", res.Received, total)
	}
	return res, nil
}

// pattern repeats the bytes 0..250; the period 251 (a prime) makes a
// shifted or repeated chunk show.
var pattern = func() []byte {
	b := make([]byte, 251*256)
	for i := range b {
		b[i] = byte(i % 251)
	}
	return b
}()

// fill writes the pattern bytes for stream offsets off, off+1, ... into b.
func fill(b []byte, off int64) {
	for len(b) > 0 {
		n := copy(b, pattern[off%251:])
		b = b[n:]
		off += int64(n)
	}
}
